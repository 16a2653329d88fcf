"""The batched engine against the per-agent engine it replaces for sweeps.

``mtl_node.engine.run_agents`` (one Agent per agent, the same code the daemons run) is the oracle:
for the same configs both must give the same per-round metrics, counts, per-neighbour decisions and
final models, bit for bit (see TOL).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from mtl_node.aggregation import RuleParams
from mtl_node.aggregation.robust import ROBUST_RULES
from mtl_node.batched import ATTACKS, BatchedResult, run_batched, run_many, supports, unsupported_reason
from mtl_node.config import NodeConfig
from mtl_node.engine import IN_PROCESS, run_agents
from mtl_node.recorder import MemoryRecorder

RULES = ["none", "average", "loss", "loss-filtered", "distance"]
ROBUST = list(ROBUST_RULES)
# Both engines run the same kernels (mtl_node/kernels: the task's LMS step, residual and test loss,
# the rules, the attacks' formulas, the combination, slot sums in slot order), so every number is
# equal bit for bit: TOL is 0. The exception is ipm, alie, min-max and min-sum, whose pool
# statistics the attack sums over the models it knows by neighbour id and the engine in slot order:
# equal to POOL_TOL.
TOL = 0.0
POOL_TOL = 1e-9
EXACT = TOL


def sparse_configs(
    rule: str | list[str],
    redraw: str,
    ema_init: float | None = 10.0,
    n: int = 12,
    rounds: int = 60,
    seed: int = 11,
) -> list[NodeConfig]:
    """A sparse directed graph (1-4 in-neighbours each, some listing an agent that does not run),
    targets in two groups, and two constant attackers."""
    rng = random.Random(seed)
    ids = [f"a{k:02d}" for k in range(n)]
    configs = []
    for k, agent in enumerate(ids):
        neighbours = rng.sample([b for b in ids if b != agent], rng.randint(1, 4))
        if k % 5 == 0:
            neighbours.append("ghost")  # never answers: counted as missing by cooperating rules
        attacker = k in (3, 7)
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={b: IN_PROCESS for b in neighbours},
                rule=rule[k % len(rule)] if isinstance(rule, list) else rule,
                rule_params=RuleParams(ema_init=ema_init, nu=0.1 + 0.05 * (k % 3)),
                rounds=rounds,
                seed=seed,
                task_params={"target": (10.0, 10.0) if k % 2 else (20.0, 10.0)},
                attack="constant" if attacker else None,
                attack_params={"redraw": redraw} if attacker else {},
            )
        )
    return configs


def same(a: float, b: float, tol: float = TOL) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(1.0, abs(a))


def assert_same_runs(
    configs: list[NodeConfig], reference: dict[str, MemoryRecorder], got: BatchedResult, tol: float = TOL
) -> None:
    records = got.records()
    for k, cfg in enumerate(configs):
        ref_rows, rows = reference[cfg.id].records, records[cfg.id]
        assert len(ref_rows) == len(rows) == cfg.rounds
        for want, have in zip(ref_rows, rows, strict=True):
            where = f"{cfg.id} round {want.round}"
            assert (have.round, have.role, have.rule) == (want.round, want.role, want.rule), where
            assert (have.accepted, have.filtered, have.missing) == (
                want.accepted,
                want.filtered,
                want.missing,
            ), where
            assert same(have.metrics.loss, want.metrics.loss, tol), (where, have.metrics, want.metrics)
            assert want.metrics.test_loss is not None and have.metrics.test_loss is not None
            assert same(have.metrics.test_loss, want.metrics.test_loss, tol), (
                where,
                have.metrics,
                want.metrics,
            )
            assert len(have.decisions) == len(want.decisions), where
            for dw, dh in zip(want.decisions, have.decisions, strict=True):
                assert (dh.agent_id, dh.decision, dh.reason) == (dw.agent_id, dw.decision, dw.reason), where
                for field in ("weight", "ema", "loss"):
                    assert same(getattr(dh, field), getattr(dw, field), tol), (where, field, dw, dh)
        final = reference[cfg.id].models[-1]["w"].numpy()
        assert all(same(float(a), float(b), tol) for a, b in zip(final, got.final_models[k], strict=True)), (
            cfg.id
        )


def decision_counts(reference: dict[str, MemoryRecorder]) -> Counter[str]:
    return Counter(d.decision for rec in reference.values() for r in rec.records for d in r.decisions[1:])


@pytest.mark.parametrize("redraw", ["never", "round", "request"])
@pytest.mark.parametrize("rule", RULES)
def test_same_as_per_agent_engine(rule: str, redraw: str) -> None:
    configs = sparse_configs(rule, redraw)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), EXACT)
    counts = decision_counts(reference)
    assert counts["missing" if rule != "none" else "filtered"] > 0  # the ghost / non-cooperation show
    if rule == "loss-filtered":
        assert counts["filtered"] > 0, "the scenario must make the filter drop someone"


@pytest.mark.parametrize("rule", ["loss", "loss-filtered", "distance"])
def test_ema_starting_at_first_observation(rule: str) -> None:
    configs = sparse_configs(rule, "request", ema_init=None, rounds=40)
    assert_same_runs(
        configs, run_agents(configs, keep_models=True), run_batched(configs, record_decisions=True), EXACT
    )


def test_mixed_rules_in_one_run() -> None:
    configs = sparse_configs(RULES, "round", rounds=40)
    assert_same_runs(
        configs, run_agents(configs, keep_models=True), run_batched(configs, record_decisions=True)
    )


def edge_configs(rule: str) -> list[NodeConfig]:
    """Non-finite values on purpose: a model of inf (its psi is NaN: left out as non-finite), one
    of 1e200 (its losses overflow: own score not finite, neighbours' scores not finite) and an
    attacker serving 1e200."""
    ids = [f"e{k}" for k in range(8)]
    configs = []
    for k, agent in enumerate(ids):
        task: dict[str, Any] = {}
        if k == 1:
            task = {"init": (math.inf, math.inf)}
        elif k == 2:
            task = {"init": (1e200, 1e200)}
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={ids[(k + j) % len(ids)]: IN_PROCESS for j in (1, 2, 3)},
                rule=rule,
                rounds=15,
                seed=3,
                task_params=task,
                attack="constant" if k == 5 else None,
                attack_params={"low": 1e200, "high": 1e200, "redraw": "request"} if k == 5 else {},
            )
        )
    return configs


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_models_and_scores(rule: str) -> None:
    configs = edge_configs(rule)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True))
    reasons = {d.reason.split(":")[0] for rec in reference.values() for r in rec.records for d in r.decisions}
    if rule in ("loss", "loss-filtered", "distance"):
        assert {"non-finite", "score not finite", "own score not finite; keeping own model"} <= reasons


def dense_configs(rule: str, n: int = 12, rounds: int = 40, seed: int = 5) -> list[NodeConfig]:
    """Neighbourhoods of 2 to 8 (some listing a ghost), f of 0, 1 or 2 per agent (so some agents
    have too few members for their rule), three two-faced constant attackers, clipping radii and
    Weiszfeld iterations varying per agent."""
    rng = random.Random(seed)
    ids = [f"d{k:02d}" for k in range(n)]
    configs = []
    for k, agent in enumerate(ids):
        neighbours = rng.sample([b for b in ids if b != agent], rng.randint(2, 8))
        if k % 4 == 0:
            neighbours.append("ghost")
        attacker = k in (2, 5, 9)
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={b: IN_PROCESS for b in neighbours},
                rule=rule,
                rule_params=RuleParams(f=k % 3, clip_tau=(0.3, 2.0, 20.0)[k % 3], weiszfeld_iters=5 + k),
                rounds=rounds,
                seed=seed,
                task_params={"target": (10.0, 10.0) if k % 2 else (20.0, 10.0)},
                attack="constant" if attacker else None,
                attack_params={"redraw": "request"} if attacker else {},
            )
        )
    return configs


def reasons(reference: dict[str, MemoryRecorder]) -> Counter[str]:
    return Counter(d.reason for rec in reference.values() for r in rec.records for d in r.decisions)


@pytest.mark.parametrize("rule", ROBUST)
def test_robust_rules_same_as_per_agent_engine(rule: str) -> None:
    configs = dense_configs(rule)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), EXACT)
    seen = reasons(reference)
    if rule != "self-clipping":  # it has no size assumption
        assert any("needs" in r and "keeping own model" in r for r in seen), "some agent must have too few"
    counts = decision_counts(reference)
    assert counts["accepted"] > 0 and counts["missing"] > 0
    if rule == "krum":
        assert any(r.startswith("krum selected") for r in seen)
    if rule == "self-clipping":
        assert any(r.startswith("pull clipped") for r in seen)


@pytest.mark.parametrize("rule", ROBUST)
def test_robust_rules_on_non_finite_and_huge_models(rule: str) -> None:
    configs = [c.model_copy(update={"rule_params": RuleParams(f=0)}) for c in edge_configs(rule)]
    if rule == "self-clipping":
        # e4 starts at -1e308 and e5 serves +1e308: e4's pull towards e5 overflows (left out)
        configs[4] = configs[4].model_copy(update={"task_params": {"init": (-1e308, -1e308)}})
        configs[5] = configs[5].model_copy(update={"attack_params": {"low": 1e308, "high": 1e308}})
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True))
    seen = reasons(reference)
    assert "non-finite: w: contains NaN or Inf" in seen
    if rule in ("trimmed-mean", "geometric-median", "self-clipping"):
        assert "combined model not finite; keeping own model" in seen
    if rule == "self-clipping":
        assert "pull not finite" in seen


# Every attack the batched engine reproduces, with parameters that make it bite in a short run.
ATTACK_CASES: list[tuple[str, dict[str, Any]]] = [
    ("constant", {"redraw": "request"}),
    ("constant", {"redraw": "never"}),
    ("gaussian", {"redraw": "request", "std": 5.0}),
    ("gaussian", {}),
    ("small-perturbation", {}),
    ("scaled", {"redraw": "never"}),
    ("nan", {}),
    ("omission", {}),
    ("sign-flip", {"scale": 2.0}),
    ("ipm", {"epsilon": 0.5}),
    ("alie", {"z": 1.5}),
    ("mimic", {}),
    ("mimic", {"target": "m03"}),
    ("min-max", {}),
    ("min-max", {"direction": "unit"}),
    ("min-sum", {"direction": "sign", "gamma_init": 3.0, "iters": 20}),
    ("echo", {}),
    ("distance-capture", {"r": 0.3}),
    ("distance-capture", {"r": 0.3, "goal": [12.0, -3.0]}),
    ("loss-budget", {}),
    ("loss-budget", {"window": 3, "slack": 0.9, "goal": [30.0, 1.0]}),
    ("adaptive", {}),  # mtl_node/batched/adaptive_sender.py; every variant: test_batched_adaptive.py
    ("adaptive", {"test": "loss", "window": 2, "direction": "goal", "goal": [30.0, 1.0]}),
    ("low-loss", {"steps": 5}),
    ("stale", {"lag": 3}),
    ("on-off", {"honest_rounds": 5, "attack_rounds": 3, "then": "alie"}),
    ("on-off", {"honest_rounds": 10, "then": "constant"}),
]
MIXED = ["loss-filtered", "average", "median", "loss", "self-clipping", "distance", "krum", "none"]


def attack_configs(attack: str, params: dict[str, Any], n: int = 12, rounds: int = 25) -> list[NodeConfig]:
    """Every rule in one network (3 to 7 neighbours each, some listing a ghost) and four attackers,
    some of which fetch from each other (what pool attacks are built from)."""
    rng = random.Random(9)
    ids = [f"m{k:02d}" for k in range(n)]
    configs = []
    for k, agent in enumerate(ids):
        neighbours = rng.sample([b for b in ids if b != agent], rng.randint(3, 7))
        if k % 5 == 0:
            neighbours.append("ghost")
        bad = k in (1, 4, 6, 10)
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={b: IN_PROCESS for b in neighbours},
                rule=MIXED[k % len(MIXED)],
                rule_params=RuleParams(f=1, nu=0.2),
                rounds=rounds,
                seed=9,
                task_params={"target": (10.0, 10.0) if k % 2 else (20.0, 10.0)},
                attack=attack if bad else None,
                attack_params=params if bad else {},
            )
        )
    return configs


# Built from the requester's model and the attacker's fetch: attackers must not fetch from each other.
VICTIM_CASES: list[tuple[str, dict[str, Any]]] = [
    ("dissensus", {}),
    ("dissensus", {"eps": 1.5, "byzantine": 2}),
    ("rop", {}),
    ("rop", {"z": 3.0, "angle": 45.0, "relocation": 0.5}),
]


def test_every_batched_attack_has_a_case() -> None:
    assert {a for a, _ in ATTACK_CASES + VICTIM_CASES} == set(ATTACKS)


@pytest.mark.parametrize(("attack", "params"), VICTIM_CASES, ids=lambda x: str(x))
def test_victim_and_pool_attacks_same_as_per_agent_engine(attack: str, params: dict[str, Any]) -> None:
    configs = attack_configs(attack, params)
    bad = {c.id for c in configs if c.attack}
    assert "fetches from" in (unsupported_reason(configs) or ""), "attackers fetching attackers: a race"
    configs = [
        c.model_copy(update={"neighbors": {n: v for n, v in c.neighbors.items() if n not in bad}})
        if c.attack
        else c
        for c in configs
    ]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), POOL_TOL)


@pytest.mark.parametrize(("attack", "params"), ATTACK_CASES, ids=lambda x: str(x))
def test_attacks_same_as_per_agent_engine(attack: str, params: dict[str, Any]) -> None:
    configs = attack_configs(attack, params)
    bad = {c.id for c in configs if c.attack}
    assert any(set(c.neighbors) & bad for c in configs if c.attack), "attackers must fetch from attackers"
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    pooled = attack in ("ipm", "alie", "min-max", "min-sum") or params.get("then") in ("ipm", "alie")
    tol = POOL_TOL if pooled else TOL
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), tol)


HARDENED = ["loss-filtered-capped", "loss-filtered-clipped"]


@pytest.mark.parametrize("attack", ["distance-capture", "loss-budget", "echo", "low-loss"])
@pytest.mark.parametrize("rule", HARDENED)
def test_hardened_rules_same_as_per_agent_engine(rule: str, attack: str) -> None:
    # every other agent runs the hardened rule, with caps of 0.5, 1.5 and 2.5 x own weight
    configs = [
        c.model_copy(
            update={
                "rule": rule if k % 2 else c.rule,
                "rule_params": RuleParams(nu=0.2, weight_cap=0.5 + k % 3, clip_scale=1.0 + k % 2),
            }
        )
        for k, c in enumerate(attack_configs(attack, {}))
    ]
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True))
    seen = reasons(reference)
    marker = "weight capped" if rule.endswith("capped") else "pull clipped"
    assert any(r.startswith(marker) for r in seen), "the hardening must bind in this scenario"


@pytest.mark.parametrize("rule", HARDENED)
def test_hardened_rules_on_non_finite_and_huge_models(rule: str) -> None:
    configs = edge_configs(rule)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True))


def test_attacks_it_cannot_reproduce_are_refused() -> None:
    hang = attack_configs("omission", {"mode": "hang"})
    assert "hang" in (unsupported_reason(hang) or "")
    # two dissensus attackers fetching from each other (m01, m06) would see a race
    assert "which asks first" in (unsupported_reason(attack_configs("dissensus", {})) or "")


def test_stacked_runs_equal_separate_runs() -> None:
    runs = [
        attack_configs("alie", {"z": 1.0}),
        attack_configs("echo", {}),  # the same ids and data, another attack
        dense_configs("krum"),
        sparse_configs("loss-filtered", "request", rounds=25),
    ]
    runs[2] = [c.model_copy(update={"rounds": 25}) for c in runs[2]]
    together = run_many(runs, record_decisions=True, keep_models=True)
    for configs, got in zip(runs, together, strict=True):
        # Padding to the widest run adds exact zeros to slot sums taken in slot order: equal.
        alone = run_batched(configs, record_decisions=True, keep_models=True)
        assert got.agents == alone.agents and got.slots == alone.slots
        for field in ("loss", "test_loss", "final_models"):
            np.testing.assert_allclose(getattr(got, field), getattr(alone, field), rtol=TOL, atol=TOL)
        for field in ("accepted", "filtered", "missing"):
            np.testing.assert_array_equal(getattr(got, field), getattr(alone, field))
        for a, b in zip(got.decision_rows(), alone.decision_rows(), strict=True):
            assert {k: v for k, v in a.items() if k not in ("weight", "ema", "loss")} == {
                k: v for k, v in b.items() if k not in ("weight", "ema", "loss")
            }
            for k in ("weight", "ema", "loss"):
                assert same(math.nan if a[k] is None else a[k], math.nan if b[k] is None else b[k]), (a, b)
    with pytest.raises(ValueError, match="different numbers of rounds"):
        run_many([runs[0], sparse_configs("loss", "round", rounds=3)])


def test_rows_for_results_files() -> None:
    configs = sparse_configs("loss-filtered", "round", rounds=5)
    result = run_batched(configs, record_decisions=True, keep_models=True)
    metrics = list(result.metrics_rows())
    assert len(metrics) == 5 * len(configs)
    assert set(metrics[0]) == {
        "round",
        "agent",
        "role",
        "rule",
        "loss",
        "test_loss",
        "test_accuracy",
        "attack_success",  # backdoor's metric (torch tasks); None here
        "accepted",
        "filtered",
        "missing",
    }
    assert {row["role"] for row in metrics} == {"normal", "byzantine"}
    records = result.records()
    # The same rows as the daemons' metrics.jsonl (less the timing) and decision log.
    expected_metrics = [
        {k: v for k, v in records[cfg.id][r].metrics_row().items() if k != "seconds"}
        for r in range(5)
        for cfg in configs
    ]
    assert metrics == expected_metrics
    expected = [row for r in range(5) for cfg in configs for row in records[cfg.id][r].decision_rows()]
    assert list(result.decision_rows()) == expected
    assert result.models is not None
    np.testing.assert_array_equal(result.models[-1], result.final_models)


def test_decisions_only_when_asked() -> None:
    result = run_batched(sparse_configs("loss", "never", rounds=3))
    assert result.decisions is None
    assert all(r.decisions == () for rows in result.records().values() for r in rows)
    with pytest.raises(RuntimeError, match="record_decisions"):
        list(result.decision_rows())


def test_supports_only_what_it_implements() -> None:
    base = sparse_configs("loss-filtered", "round", rounds=3)
    assert supports(base)
    other_task = [c.model_copy(update={"task": "digits"}) for c in base]
    assert not supports(other_task)
    # An attack it does not implement, with valid parameters (an invalid parameter would make any
    # attack "unsupported" for the wrong reason: the per-agent engine reports those).
    unimplemented = [
        c.model_copy(update={"attack": "label-flip", "attack_params": {}}) if c.attack else c for c in base
    ]
    assert "attack 'label-flip'" in (unsupported_reason(unimplemented) or "")
    # ... and one it does implement, with valid parameters, is supported.
    sign_flip = [
        c.model_copy(update={"attack": "sign-flip", "attack_params": {"scale": 2.0}}) if c.attack else c
        for c in base
    ]
    assert supports(sign_flip), unsupported_reason(sign_flip)
    invalid = [c.model_copy(update={"attack": "sign-flip"}) if c.attack else c for c in base]
    assert "sign-flip" in (unsupported_reason(invalid) or "")
    assert not supports([c.model_copy(update={"device": "cuda"}) for c in base])
    uneven = [*base[:-1], base[-1].model_copy(update={"rounds": 4})]
    assert not supports(uneven)
    assert "rounds" in (unsupported_reason(uneven) or "")
    assert not supports([])
    with pytest.raises(ValueError, match="task"):
        run_batched(other_task)
