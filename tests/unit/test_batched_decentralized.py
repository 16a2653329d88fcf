"""The batched engine against the per-agent engine for the decentralized defenses of issue 13
(ubar, balance, clipped-gossip, ios): both call ``mtl_node.kernels.decentralized`` (the agent's rule
with one row of present members, the engine with all rows padded and masked), so per-round
metrics, counts, decisions with their reasons and final models are equal bit for bit.

The helpers (the oracle comparison and the scenarios) are those of test_batched.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_batched import (
    ATTACK_CASES,
    TOL,
    assert_same_runs,
    attack_configs,
    decision_counts,
    edge_configs,
    reasons,
    same,
)

from mtl_node.aggregation import RuleParams
from mtl_node.aggregation.decentralized import DECENTRALIZED_RULES
from mtl_node.batched import run_batched, run_many, supports, unsupported_reason
from mtl_node.config import NodeConfig
from mtl_node.engine import IN_PROCESS, run_agents

NEW = list(DECENTRALIZED_RULES)
ATTACKERS = (2, 5, 9)


def new_rule_configs(
    rule: str | list[str], n: int = 12, rounds: int = 30, seed: int = 21
) -> list[NodeConfig]:
    """Neighbourhoods of 1 to 8 (some listing a ghost: a missing member every round), f of 0, 1 or 2
    (so that clipped-gossip and ios have too few members on some agents), one agent whose
    neighbours are all Byzantine, three two-faced constant attackers, and each rule's parameters
    varying per agent (balance's radius shrinking within the run, so its round counter matters)."""
    rng = random.Random(seed)
    ids = [f"d{k:02d}" for k in range(n)]
    bad = [ids[k] for k in ATTACKERS]
    configs = []
    for k, agent in enumerate(ids):
        if k == 0:
            neighbours = [*bad, "ghost"]  # every member that answers is Byzantine
        else:
            # agents 4 and 8 (f=1, f=2) have two neighbours: too few for clipped-gossip and ios
            size = 2 if k in (4, 8) else rng.randint(1, 8)
            neighbours = rng.sample([b for b in ids if b != agent], size)
            if k % 4 == 1:
                neighbours.append("ghost")
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={b: IN_PROCESS for b in neighbours},
                rule=rule[k % len(rule)] if isinstance(rule, list) else rule,
                rule_params=RuleParams(
                    f=k % 3,
                    alpha=(0.2, 0.5, 0.9)[k % 3],
                    ubar_rho=(0.3, 0.6, 1.0)[k % 3],
                    balance_gamma=(0.05, 0.3, 2.0)[k % 3],
                    balance_kappa=(0.0, 1.0, 4.0)[k % 3],
                    balance_rounds=(10, 25, 100)[k % 3],
                ),
                rounds=rounds,
                seed=seed,
                task_params={"target": (10.0, 10.0) if k % 2 else (20.0, 10.0)},
                attack="constant" if agent in bad else None,
                attack_params={"redraw": "request"} if agent in bad else {},
            )
        )
    return configs


# What each rule's decisions must show in new_rule_configs, so that every code path is compared.
MARKERS = {
    "ubar": ("not among the", "loss "),
    "balance": ("distance ",),
    "clipped-gossip": ("pull clipped to tau=", "clipped-gossip needs"),
    "ios": ("dropped: farthest from the mean", "ios needs"),
}


@pytest.mark.parametrize("rule", NEW)
def test_new_rules_same_as_per_agent_engine(rule: str) -> None:
    configs = new_rule_configs(rule)
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)
    seen = reasons(reference)
    for marker in MARKERS[rule]:
        assert any(r.startswith(marker) for r in seen), (rule, marker, seen)
    counts = decision_counts(reference)
    assert counts["accepted"] > 0 and counts["filtered"] > 0 and counts["missing"] > 0
    # the all-Byzantine neighbourhood: d00 hears only attackers (and a ghost)
    d00 = [d for r in reference["d00"].records for d in r.decisions[1:]]
    assert {d.decision for d in d00 if d.agent_id == "ghost"} == {"missing"}


def test_balance_round_counter_changes_the_decisions() -> None:
    """The radius gamma * exp(-kappa i / T) shrinks with the rounds the rule has aggregated: a
    neighbour accepted early is filtered later, in both engines alike."""
    configs = [
        c.model_copy(
            update={"rule_params": RuleParams(balance_gamma=2.0, balance_kappa=6.0, balance_rounds=20)}
        )
        for c in new_rule_configs("balance", rounds=30)
    ]
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)
    for_round = [
        sum(r.accepted for rec in reference.values() for r in rec.records if r.round == i) for i in (1, 30)
    ]
    assert for_round[0] > for_round[1], for_round


def test_new_rules_mixed_in_one_run_with_the_others() -> None:
    configs = new_rule_configs([*NEW, "loss-filtered", "median", "self-clipping", "average"], rounds=25)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)


@pytest.mark.parametrize("rule", NEW)
def test_new_rules_on_non_finite_and_huge_models(rule: str) -> None:
    # f=0 so that every neighbourhood of 3 is enough; crafted 1e200 models overflow the maths
    configs = [
        c.model_copy(update={"rule": rule, "rule_params": RuleParams(f=0)}) for c in edge_configs(rule)
    ]
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)
    assert "non-finite: w: contains NaN or Inf" in reasons(reference)


# Attacks that bite differently: crafted around the victim (requester models are not used by
# these), pool statistics, a lagging copy, and omission.
ATTACKS: list[tuple[str, dict[str, Any]]] = [
    case
    for case in ATTACK_CASES
    if case[0] in ("alie", "min-max", "distance-capture", "loss-budget", "omission", "sign-flip", "nan")
]


@pytest.mark.parametrize(("attack", "params"), ATTACKS, ids=lambda x: str(x))
def test_new_rules_under_attacks(attack: str, params: dict[str, Any]) -> None:
    configs = [
        c.model_copy(update={"rule": NEW[k % len(NEW)]}) if not c.attack else c
        for k, c in enumerate(attack_configs(attack, params))
    ]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    pooled = attack in ("alie", "min-max")
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), 1e-9 if pooled else TOL)


def test_stacked_runs_with_new_rules_equal_separate_runs() -> None:
    runs = [new_rule_configs(rule, rounds=12) for rule in NEW]
    together = run_many(runs, record_decisions=True)
    for configs, got in zip(runs, together, strict=True):
        alone = run_batched(configs, record_decisions=True)
        for a, b in zip(got.decision_rows(), alone.decision_rows(), strict=True):
            assert {k: v for k, v in a.items() if k != "weight"} == {
                k: v for k, v in b.items() if k != "weight"
            }
            assert same(a["weight"], b["weight"]), (a, b)
        assert (got.final_models == alone.final_models).all()
