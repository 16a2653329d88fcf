"""The in-process engine on a small network: deterministic, and resilient to a NaN-serving neighbour."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from mtl_node.attack_api import ATTACKS, Attack, load_plugins
from mtl_node.config import NodeConfig, build_config
from mtl_node.core.registry import Entry
from mtl_node.engine import IN_PROCESS, run_agents
from mtl_node.recorder import MemoryRecorder
from mtl_node.wire import StateDict

IDS = ["a0", "a1", "a2", "a3"]
ROUNDS = 30
NAN_ATTACK = "test-only-nan"


def configs(rule: str, ids: list[str] = IDS, attacker: str | None = None, **extra: Any) -> list[NodeConfig]:
    """A complete graph over ``ids``; ``attacker`` (if any) serves NaN models."""
    out = []
    for agent in ids:
        data: dict[str, Any] = {
            "id": agent,
            "neighbors": {n: IN_PROCESS for n in ids if n != agent},
            "rule": rule,
            "rounds": ROUNDS,
            "seed": 42,
            **extra,
        }
        if agent == attacker:
            data["attack"] = NAN_ATTACK
        out.append(build_config(data))
    return out


def models(run: dict[str, MemoryRecorder], agent: str) -> list[StateDict]:
    assert len(run[agent].models) == ROUNDS
    return run[agent].models


def assert_same_models(x: list[StateDict], y: list[StateDict]) -> None:
    assert len(x) == len(y)
    for i, (mx, my) in enumerate(zip(x, y, strict=True), start=1):
        assert set(mx) == set(my)
        for name in mx:
            assert torch.equal(mx[name], my[name]), f"round {i}, tensor {name}: {mx[name]} != {my[name]}"


class NanParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NanAttack(Attack):
    """Serves a model of the right shape whose every value is NaN."""

    name = NAN_ATTACK
    Params = NanParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        return {k: torch.full_like(v, math.nan) for k, v in honest.items()}


@pytest.fixture
def nan_attack(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Registers NanAttack for this test only, so the registry (and test_catalog) stays clean."""
    load_plugins()
    assert NAN_ATTACK not in ATTACKS
    monkeypatch.setitem(ATTACKS._entries, NAN_ATTACK, Entry(NAN_ATTACK, NanAttack, "test only"))
    yield NAN_ATTACK


def test_runs_are_deterministic() -> None:
    first = run_agents(configs("loss-filtered"), keep_models=True)
    second = run_agents(configs("loss-filtered"), keep_models=True)
    for agent in IDS:
        assert_same_models(models(first, agent), models(second, agent))
        m1 = [r.metrics for r in first[agent].records]
        m2 = [r.metrics for r in second[agent].records]
        assert m1 == m2
        assert [r.decisions for r in first[agent].records] == [r.decisions for r in second[agent].records]
        assert [r.round for r in first[agent].records] == list(range(1, ROUNDS + 1))


def test_non_cooperative_run_equals_each_agent_alone() -> None:
    together = run_agents(configs("none"), keep_models=True)
    cooperative = run_agents(configs("loss-filtered"), keep_models=True)
    differs = 0
    for agent in IDS:
        alone = run_agents(configs("none", ids=[agent]), keep_models=True)
        assert_same_models(models(together, agent), models(alone, agent))
        differs += not all(
            torch.equal(x["w"], y["w"])
            for x, y in zip(models(cooperative, agent), models(alone, agent), strict=True)
        )
        assert all(r.accepted == 0 and r.filtered == len(IDS) - 1 for r in together[agent].records)
    # Otherwise the equality above would say nothing: cooperating must change someone's model.
    assert differs > 0


def test_nan_serving_neighbour_is_left_out_and_never_corrupts(nan_attack: str) -> None:
    attacker = IDS[-1]
    normal = IDS[:-1]
    run = run_agents(configs("loss-filtered", attacker=attacker), keep_models=True)

    for agent in normal:
        for rec, model in zip(run[agent].records, models(run, agent), strict=True):
            assert all(bool(torch.isfinite(t).all()) for t in model.values()), (agent, rec.round)
            assert math.isfinite(rec.metrics.loss) and rec.metrics.test_loss is not None
            assert math.isfinite(rec.metrics.test_loss)
            [d] = [d for d in rec.decisions if d.agent_id == attacker]
            assert d.decision == "missing" and d.weight == 0.0
            assert d.reason.startswith("non-finite"), d.reason
            assert rec.missing == 1
            assert math.fsum(d.weight for d in rec.decisions) == pytest.approx(1.0)

    # Left out entirely: the normal agents learn exactly as if the attacker were not their neighbour.
    without = run_agents(configs("loss-filtered", ids=normal), keep_models=True)
    for agent in normal:
        for x, y in zip(models(run, agent), models(without, agent), strict=True):
            assert torch.allclose(x["w"], y["w"], rtol=1e-12, atol=0.0)
