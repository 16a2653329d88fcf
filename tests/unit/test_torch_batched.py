"""The torch batched engine (mtl_node.batched.torch_engine) against the per-agent engine (the oracle).

HAR on a small network: per-round metrics and every decision (kind, weight, EMA, loss, reason) equal
the per-agent engine's within 1e-5 relative. Why not exactly: the models are float32, and the
batched engine computes gradients, logits and losses with batched matmuls (vmap over agents and
over neighbour slots) whose sums run in a different order than one agent's own calls, so values
differ in the last bits of a float32 (relative 1e-7) and those differences may grow a little over
rounds; 1e-5 leaves room for that and still catches any real difference (a wrong batch, a wrong
weight or a wrong slot changes values in the second or third digit). Decisions (accepted /
filtered / missing) must be equal exactly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from mtl_node.batched import torch_engine
from mtl_node.config import NodeConfig, build_config
from mtl_node.engine import run_agents
from mtl_node.recorder import RoundRecord

REL = 1e-5
ABS = 1e-6  # for values near 0 (an accuracy of 0, a loss of a perfect fit)


def configs(
    rule: str,
    *,
    agents: int = 6,
    rounds: int = 5,
    byzantine: dict[str, tuple[str, dict[str, Any]]] | None = None,
    task_params: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    nu: float = 0.1,
) -> list[NodeConfig]:
    """A complete graph of HAR agents (generator data, 40 samples each), like the example config."""
    ids = [f"a{k}" for k in range(agents)]
    out = []
    for k, a in enumerate(ids):
        params = {"subject": k + 1, "samples": 40 + 7 * k, "batch_size": 4, "lr": 0.05}
        params.update(task_params or {})
        params.update((overrides or {}).get(a, {}))
        data: dict[str, Any] = {
            "id": a,
            "task": "har",
            "rule": rule,
            "rounds": rounds,
            "seed": 7,
            "neighbors": {n: "inproc:0" for n in ids if n != a},
            "task_params": params,
            "rule_params": {"nu": nu, "ema_init": 1.0},
        }
        if byzantine and a in byzantine:
            data["attack"], data["attack_params"] = byzantine[a]
        out.append(build_config(data))
    return out


def close(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x is y
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=REL, abs_tol=ABS)


def assert_same(cfgs: list[NodeConfig]) -> None:
    oracle = {a: r.records for a, r in run_agents(cfgs).items()}
    fast = torch_engine.run_torch_batched(cfgs)
    assert set(fast) == set(oracle)
    for agent, want in oracle.items():
        got: list[RoundRecord] = fast[agent]
        assert [r.round for r in got] == [r.round for r in want]
        for g, w in zip(got, want, strict=True):
            where = (agent, w.round)
            assert (g.accepted, g.filtered, g.missing) == (w.accepted, w.filtered, w.missing), where
            for f in ("loss", "test_loss", "test_accuracy", "attack_success"):
                assert close(getattr(g.metrics, f), getattr(w.metrics, f)), (where, f, g.metrics, w.metrics)
            assert [d.agent_id for d in g.decisions] == [d.agent_id for d in w.decisions], where
            for dg, dw in zip(g.decisions, w.decisions, strict=True):
                assert dg.decision == dw.decision, (where, dg, dw)
                assert close(dg.weight, dw.weight), (where, dg, dw)
                assert close(dg.ema, dw.ema), (where, dg, dw)
                assert close(dg.loss, dw.loss), (where, dg, dw)
                if dg.decision != "filtered" or "ema" not in dw.reason:
                    assert dg.reason == dw.reason, (where, dg, dw)


@pytest.mark.parametrize("rule", torch_engine.RULES)
def test_rules_without_attack_equal_the_per_agent_engine(rule: str) -> None:
    assert_same(configs(rule))


@pytest.mark.parametrize(
    ("attack", "params"),
    [
        ("constant", {"low": 0.0, "high": 0.1}),
        ("sign-flip", {"scale": 2.0}),
        ("ipm", {"epsilon": 0.5}),
        ("alie", {"z": 1.5}),
        ("gaussian", {"std": 0.5}),
        ("scaled", {"low": 0.0, "high": 0.1}),
        ("small-perturbation", {"std": 0.05}),
        ("mimic", {}),
    ],
)
@pytest.mark.parametrize("rule", ["average", "distance", "loss-filtered", "median", "loss-filtered-clipped"])
def test_attacks_equal_the_per_agent_engine(rule: str, attack: str, params: dict[str, Any]) -> None:
    byz = {"a1": (attack, params), "a4": (attack, params)}
    assert_same(configs(rule, byzantine=byz))


def test_uneven_agents_train_share_and_resample_equal_the_per_agent_engine() -> None:
    """The example's settings: some agents train only in a share of the rounds; scoring: resample;
    two local steps; test metrics every other round."""
    cfgs = configs(
        "loss-filtered",
        rounds=8,
        byzantine={"a5": ("constant", {"low": 0.0, "high": 0.1})},
        task_params={"local_steps": 2, "scoring": "resample", "eval_every": 2},
        overrides={"a0": {"train_share": 0.3}, "a3": {"train_share": 0.3}, "a2": {"lr": 0.02}},
    )
    assert_same(cfgs)


def test_adam_keeps_each_agents_moments_like_the_per_agent_engine() -> None:
    """Adam (torch.optim.Adam per agent there): moments and step counts per row, agents that skip
    training rounds (train_share) keep their step count, as their own optimizer does."""
    cfgs = configs(
        "loss-filtered",
        rounds=6,
        byzantine={"a1": ("ipm", {"epsilon": 0.5})},
        task_params={"optimizer": "adam", "lr": 0.01},
        overrides={"a0": {"train_share": 0.4}, "a3": {"lr": 0.003}},
    )
    assert_same(cfgs)


def test_digits_is_left_to_the_per_agent_engine() -> None:
    """digits (the paper's CNN with Adam) is not batched: over ten rounds its metrics drift from
    the per-agent engine's beyond float32 rounding (docs/performance.md), so auto must fall back."""
    ids = [f"a{k}" for k in range(3)]
    cfgs = [
        build_config(
            {
                "id": a,
                "task": "digits",
                "rule": "loss-filtered",
                "rounds": 2,
                "seed": 3,
                "neighbors": {n: "inproc:0" for n in ids if n != a},
                "task_params": {"dataset": "synthetic", "train_samples": 20, "test_samples": 10},
            }
        )
        for a in ids
    ]
    reason = torch_engine.unsupported_reason(cfgs)
    assert reason is not None and "task 'digits'" in reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"state_dir": "/tmp/never-written"}, "a state directory"),
        ({"attack": "low-loss"}, "attack 'low-loss'"),
    ],
)
def test_what_it_cannot_batch_is_named(change: dict[str, Any], reason: str) -> None:
    cfgs = configs("loss-filtered")
    first = cfgs[0].model_dump()
    for key, value in change.items():
        first[key] = {**first[key], **value} if isinstance(value, dict) else value
    cfgs[0] = NodeConfig.model_validate(first)
    got = torch_engine.unsupported_reason(cfgs)
    assert got is not None and reason in got and got.startswith("a0: ")
    with pytest.raises(ValueError, match="cannot run this"):
        torch_engine.run_torch_batched(cfgs)


def test_an_honest_model_that_is_not_finite_arrives_as_missing_like_the_per_agent_engine() -> None:
    """An agent whose training diverges (a huge learning rate: its model overflows to inf/NaN) is
    left out by every receiver as a fetch that fails validation, with the same reason."""
    cfgs = configs("loss-filtered", rounds=4, overrides={"a2": {"lr": 1e38}})
    fast = torch_engine.run_torch_batched(cfgs)
    missing = [d for rec in fast["a0"] for d in rec.decisions if d.decision == "missing"]
    assert missing and all(d.agent_id == "a2" and d.reason.startswith("non-finite") for d in missing)
    assert_same(cfgs)


def test_decisions_are_built_when_read_and_compare_like_tuples() -> None:
    cfgs = configs("loss-filtered", rounds=2, byzantine={"a1": ("constant", {"low": 0.0, "high": 0.1})})
    rec = torch_engine.run_torch_batched(cfgs)["a0"][-1]
    assert len(rec.decisions) == len(cfgs[0].neighbors) + 1
    items = tuple(rec.decisions)
    assert rec.decisions == items and items == tuple(rec.decisions)
    assert rec.decisions[0].agent_id == "a0" and rec.decisions[-1] == items[-1]
    assert hash(rec.decisions) == hash(items)


def test_the_engine_runs_with_its_thread_setting_and_restores_the_callers() -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    cfgs = configs("none", rounds=1)
    torch_engine.run_torch_batched(cfgs, on_round=lambda _: seen.append(torch.get_num_threads()))
    assert seen == [torch_engine.THREADS]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("attack", "params"), [("constant", {"low": 0.0, "high": 0.1}), ("small-perturbation", {"std": 0.05})]
)
@pytest.mark.parametrize("rule", ["loss", "loss-filtered-capped"])
def test_vectorized_running_score_rules_with_attackers_equal_the_per_agent_engine(
    rule: str, attack: str, params: dict[str, Any]
) -> None:
    """The rules aggregated over all rows at once (torch_rules.EMA_RULES) against the agents' own
    rule objects, with attackers, and a weight cap that binds (0.3 x the agent's own weight)."""
    byz = {"a1": (attack, params), "a4": (attack, params)}
    lazy = {"train_share": 0.05}
    cfgs = [
        c.model_copy(update={"rule_params": c.rule_params.model_copy(update={"weight_cap": 0.3})})
        # a0 and a2 rarely train: their neighbours' models beat their own, so they keep them
        for c in configs(rule, byzantine=byz, rounds=6, overrides={"a0": lazy, "a2": lazy})
    ]
    if rule == "loss-filtered-capped":
        fast = torch_engine.run_torch_batched(cfgs)
        assert any("weight capped" in d.reason for recs in fast.values() for r in recs for d in r.decisions)
    assert_same(cfgs)
