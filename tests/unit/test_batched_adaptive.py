"""The adaptive attack (attacks/adaptive.py) in the batched engine against the per-agent engine.

Both call the same kernels (mtl_node.kernels.attacks: adaptive_test, adaptive_direction,
radius_step, budget_step, along; the balance and CS+ radii of mtl_node.kernels.decentralized) with
the same inputs: the victim's model as the attack node finds it, the attacker's (or, omniscient,
the victim's) samples for the loss test's bisection, the victim's radius, direction ``away``'s
honest mean summed in neighbour-id order as the attack sums it. Every number is equal bit for bit
(TOL); with a pool attacker (alie, ipm: summed in slot order) in the network, to POOL_TOL.

The network is test_batched.attack_configs (four attackers, two of which fetch from each other) with
one rule for every agent, as in a run: ctx.rule is what decides the attack's test.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from test_batched import POOL_TOL, TOL, assert_same_runs, attack_configs
from test_batched_attackers import assigned

from mtl_node.aggregation import RuleParams
from mtl_node.batched import run_batched, run_many, supports, unsupported_reason
from mtl_node.config import NodeConfig
from mtl_node.engine import run_agents
from mtl_node.recorder import MemoryRecorder

PARAMS = RuleParams(f=1, nu=0.2, clip_tau=1.0, balance_gamma=0.5, balance_kappa=1.0, balance_rounds=30)


def run_configs(rule: str, params: dict[str, Any], isolated: bool = False) -> list[NodeConfig]:
    """attack_configs with ``rule`` everywhere; ``isolated``: attackers list no other attacker."""
    configs = [
        c.model_copy(update={"rule": rule, "rule_params": PARAMS}) for c in attack_configs("adaptive", params)
    ]
    if isolated:
        bad = {c.id for c in configs if c.attack}
        configs = [
            c.model_copy(update={"neighbors": {n: v for n, v in c.neighbors.items() if n not in bad}})
            if c.attack
            else c
            for c in configs
        ]
    return configs


def attacker_decisions(configs: list[NodeConfig], reference: dict[str, MemoryRecorder]) -> Counter[str]:
    """How normal agents decided on the attackers' models: decision and the reason's first word."""
    bad = {c.id for c in configs if c.attack}
    return Counter(
        f"{d.decision} {d.reason.split(' ')[0]}".strip()
        for agent, rec in reference.items()
        if agent not in bad
        for r in rec.records
        for d in r.decisions
        if d.agent_id in bad
    )


# (rule, attack parameters, what the attackers' models must meet at the victims)
CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    # loss test: bisection on the attacker's own samples; some pass the filter, some do not
    ("loss-filtered", {}, {"accepted", "filtered ema"}),
    ("loss-filtered", {"direction": "goal", "goal": [30.0, 1.0], "window": 3, "slack": 0.9}, {"accepted"}),
    ("loss-filtered", {"omniscient": True}, {"accepted", "filtered ema"}),
    ("loss-filtered", {"omniscient": True, "window": 2, "iters": 7}, {"accepted"}),
    ("ubar", {}, {"accepted", "filtered loss"}),
    ("loss-filtered-median", {"window": 2}, {"accepted"}),
    # radius: exactly at the victim's radius (within margin)
    ("self-clipping", {}, {"accepted"}),
    ("self-clipping", {"margin": 0.0, "direction": "goal"}, {"accepted"}),
    ("balance", {}, {"accepted"}),
    # no test: max_step
    ("average", {}, {"accepted"}),
    ("median", {"max_step": 0.7}, set()),
    ("average", {"test": "loss", "slack": 1.2}, {"accepted"}),
    ("loss-filtered", {"test": "none", "max_step": 0.3}, {"accepted"}),
]


@pytest.mark.parametrize(("rule", "params", "seen"), CASES, ids=lambda x: str(x))
def test_adaptive_same_as_per_agent_engine(rule: str, params: dict[str, Any], seen: set[str]) -> None:
    configs = run_configs(rule, params)
    bad = {c.id for c in configs if c.attack}
    assert any(set(c.neighbors) & bad for c in configs if c.attack), "attackers must fetch from attackers"
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)
    decided = attacker_decisions(configs, reference)
    assert seen <= set(decided), decided


FETCH_CASES: list[tuple[str, dict[str, Any]]] = [
    ("clipped-gossip", {}),
    ("average", {"direction": "away"}),
    ("loss-filtered", {"direction": "away"}),
    ("loss-filtered", {"direction": "away", "omniscient": True}),
    ("balance", {"direction": "away"}),
    ("clipped-gossip", {"direction": "away"}),
    ("self-clipping", {"direction": "away"}),
]


@pytest.mark.parametrize(("rule", "params"), FETCH_CASES, ids=lambda x: str(x))
def test_adaptive_reading_its_fetch(rule: str, params: dict[str, Any]) -> None:
    """direction away (the honest mean) and clipped-gossip's radius estimate read last round's fetch: two such
    attackers fetching from each other are refused (which asks first decides what both get), as
    dissensus is; with attackers listing no attacker both engines agree."""
    assert "which asks first" in (unsupported_reason(run_configs(rule, params)) or "")
    if params.get("direction") != "away":
        # the other radius rules read no fetch: the same network is supported
        assert supports(run_configs("balance", params))
    configs = run_configs(rule, params, isolated=True)
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)


def test_on_off_adaptive_reads_the_runs_rule() -> None:
    """on-off passes the run's rule to its inner attack: an on-off adaptive under loss-filtered
    runs the loss test in its attack rounds, in both engines."""
    on_off = {"honest_rounds": 3, "attack_rounds": 2, "then": "adaptive", "then_params": {"window": 2}}
    configs = [
        c.model_copy(update={"rule": "loss-filtered", "rule_params": PARAMS})
        for c in attack_configs("on-off", on_off)
    ]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)


def test_adaptive_with_pool_attackers_as_requesters() -> None:
    """Pool attackers (alie m01, ipm m10) fetch from the adaptive attackers m06 (away: it reads its
    fetch) and m04, which craft against what those serve them (attack_configs: m01 and m06 list
    each other, m04 lists m10 and m01)."""
    configs = assigned(
        {
            "m01": ("alie", {"z": 1.5}),
            "m06": ("adaptive", {"direction": "away"}),
            "m04": ("adaptive", {"window": 2}),
            "m10": ("ipm", {"epsilon": 0.5}),
        }
    )
    configs = [c.model_copy(update={"rule": "loss-filtered", "rule_params": PARAMS}) for c in configs]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), POOL_TOL)


def test_stacked_adaptive_runs_equal_separate_runs() -> None:
    """Sweeps stack runs (run_many): the adaptive attackers of each run craft within their own run."""
    runs = [
        run_configs("loss-filtered", {"omniscient": True}),
        run_configs("balance", {"direction": "away"}, isolated=True),
        run_configs("self-clipping", {"direction": "goal", "goal": [12.0, -3.0]}),
    ]
    for configs, got in zip(runs, run_many(runs, keep_models=True), strict=True):
        alone = run_batched(configs, keep_models=True)
        np.testing.assert_array_equal(got.models, alone.models)
        np.testing.assert_array_equal(got.loss, alone.loss)
