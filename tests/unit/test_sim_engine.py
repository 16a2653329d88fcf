"""``--backend sim -o engine=...``: the batched engine by default where it can run, the per-agent
engine (the oracle) on request or with a logged reason, and a clear error when batched is forced
on a plan it cannot run."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest

from mtl_node.core.errors import ConfigError
from orchestrator.backends import BACKENDS, RunContext
from orchestrator.backends.base import RunOutput
from orchestrator.plan import RunPlan
from orchestrator.planner import plan_topology
from orchestrator.spec import parse_spec

SPEC: dict[str, Any] = {
    "name": "sim-engines",
    "task": "target-localization",
    "agents": 8,
    "graph": {"kind": "complete"},
    "byzantine": {"count": 2, "attack": "alie", "attack_params": {"z": 1.5}},
    "rules": ["loss-filtered"],
    "rounds": 15,
    "seed": 3,
}


def run(plan: RunPlan, tmp_path: Path, rule: str, **options: str) -> RunOutput:
    ctx = RunContext(rule=rule, workdir=tmp_path, progress=lambda _: None, options=dict(options))
    return BACKENDS.get("sim")().run(plan, ctx)


@pytest.mark.parametrize(
    "rule",
    [
        "loss-filtered",
        "distance",
        "loss-filtered-clipped",
        "krum",
        "average",
        "ubar",
        "balance",
        "clipped-gossip",
        "ios",
    ],
)
def test_batched_and_per_agent_give_the_same_rows(rule: str, tmp_path: Path) -> None:
    plan = plan_topology(parse_spec(SPEC))
    fast = run(plan, tmp_path, rule, engine="batched")
    oracle = run(plan, tmp_path, rule, engine="per-agent")
    key = lambda r: (r["round"], r["agent"])  # noqa: E731
    a, b = sorted(fast.metrics, key=key), sorted(oracle.metrics, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    for x, y in zip(a, b, strict=True):
        assert (x["accepted"], x["filtered"], x["missing"]) == (y["accepted"], y["filtered"], y["missing"])
        for col in ("loss", "test_loss"):
            if x[col] is None or y[col] is None:
                assert x[col] == y[col]
            else:  # float64 numpy against float64 torch: the same formulas, rounding may differ
                assert math.isclose(x[col], y[col], rel_tol=1e-9, abs_tol=1e-12), (col, x, y)
    dkey = lambda r: (r["round"], r["agent"], r["agent_id"])  # noqa: E731
    da, db = sorted(fast.decisions, key=dkey), sorted(oracle.decisions, key=dkey)
    assert [(dkey(r), r["decision"]) for r in da] == [(dkey(r), r["decision"]) for r in db]
    assert [r["reason"] for r in da] == [r["reason"] for r in db]


HAR: dict[str, Any] = {
    "name": "sim-har",
    "task": "har",
    "agents": 3,
    "rounds": 2,
    "seed": 1,
    "rules": ["loss"],
    "byzantine": {"count": 1, "attack": "echo"},  # not one of the torch batched engine's attacks
}


def test_forcing_batched_on_a_plan_it_cannot_run_names_the_reason(tmp_path: Path) -> None:
    plan = plan_topology(parse_spec(HAR))
    with pytest.raises(ConfigError) as info:
        run(plan, tmp_path, "loss", engine="batched")
    assert info.value.field == "--option engine"
    assert "batched engine cannot run this" in str(info.value) and "attack 'echo'" in str(info.value)


def test_unknown_engine_and_option_are_config_errors(tmp_path: Path) -> None:
    plan = plan_topology(parse_spec(SPEC))
    with pytest.raises(ConfigError, match="valid: auto, batched, per-agent"):
        run(plan, tmp_path, "loss-filtered", engine="fast")
    with pytest.raises(ConfigError, match="unknown option for backend sim"):
        run(plan, tmp_path, "loss-filtered", engin="batched")


def test_auto_falls_back_with_the_reason_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plan = plan_topology(parse_spec(HAR))
    with caplog.at_level(logging.WARNING, logger="orchestrator.backends.sim"):
        out = run(plan, tmp_path, "loss")
    assert len(out.metrics) == 3 * 2
    assert any("per-agent engine" in r.message and "attack 'echo'" in r.message for r in caplog.records)


HAR_SGD: dict[str, Any] = {
    "name": "sim-har-sgd",
    "task": "har",
    "agents": 5,
    "graph": {"kind": "complete"},
    "byzantine": {"count": 1, "attack": "constant", "attack_params": {"low": 0.0, "high": 0.1}},
    "rounds": 3,
    "seed": 2,
    "rules": ["loss-filtered"],
    "task_params": {"optimizer": "sgd", "lr": 0.05, "batch_size": 5, "samples": 40},
}


@pytest.mark.parametrize("rule", ["loss-filtered", "distance", "average"])
def test_har_runs_batched_by_default_with_the_per_agent_rows(
    rule: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HAR with SGD is batched under auto (no fallback logged) and gives the per-agent rows
    (within float32 rounding: tests/unit/test_torch_batched.py says why 1e-5)."""
    plan = plan_topology(parse_spec(HAR_SGD))
    with caplog.at_level(logging.WARNING, logger="orchestrator.backends.sim"):
        fast = run(plan, tmp_path, rule)
    assert not any("per-agent engine" in r.message for r in caplog.records)
    oracle = run(plan, tmp_path, rule, engine="per-agent")
    key = lambda r: (r["round"], r["agent"])  # noqa: E731
    a, b = sorted(fast.metrics, key=key), sorted(oracle.metrics, key=key)
    assert [key(r) for r in a] == [key(r) for r in b] and len(a) == 5 * 3
    for x, y in zip(a, b, strict=True):
        assert (x["accepted"], x["filtered"], x["missing"]) == (y["accepted"], y["filtered"], y["missing"])
        for col in ("loss", "test_loss", "test_accuracy"):
            assert math.isclose(x[col], y[col], rel_tol=1e-5, abs_tol=1e-6), (col, x, y)
    dkey = lambda r: (r["round"], r["agent"], r["agent_id"])  # noqa: E731
    da, db = sorted(fast.decisions, key=dkey), sorted(oracle.decisions, key=dkey)
    assert [(dkey(r), r["decision"]) for r in da] == [(dkey(r), r["decision"]) for r in db]
    assert len(da) == 5 * 5 * 3


DIGITS: dict[str, Any] = {
    "name": "sim-digits",
    "task": "digits",
    "agents": 3,
    "rounds": 2,
    "seed": 4,
    "rules": ["loss-filtered"],
    "byzantine": {"count": 1, "attack": "constant", "attack_params": {"low": 0.0, "high": 0.1}},
    "task_params": {"optimizer": "sgd", "lr": 0.05, "batch_size": 4, "train_samples": 12, "test_samples": 6},
}


def test_digits_runs_batched_by_default_and_per_agent_on_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """digits (the CNN) is batched under auto, with the per-agent engine's rows (SGD: within 1e-5)."""
    plan = plan_topology(parse_spec(DIGITS))
    with caplog.at_level(logging.WARNING, logger="orchestrator.backends.sim"):
        fast = run(plan, tmp_path, "loss-filtered")
    assert not any("per-agent engine" in r.message for r in caplog.records)
    oracle = run(plan, tmp_path, "loss-filtered", engine="per-agent")
    key = lambda r: (r["round"], r["agent"])  # noqa: E731
    a, b = sorted(fast.metrics, key=key), sorted(oracle.metrics, key=key)
    assert [key(r) for r in a] == [key(r) for r in b] and len(a) == 3 * 2
    for x, y in zip(a, b, strict=True):
        assert (x["accepted"], x["filtered"]) == (y["accepted"], y["filtered"])
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x, y)


def test_a_custom_task_it_cannot_batch_falls_back_or_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents whose models differ: only building the tasks tells; auto falls back with the reason
    logged in one line, engine=batched is a ConfigError naming it."""
    (tmp_path / "plug_widths.py").write_text(
        "import numpy as np\n"
        "from torch import nn\n"
        "from mtl_node.tasks import TaskDefinition\n"
        "def make(ctx, options):\n"
        "    x = np.ones((8, 3), np.float32)\n"
        "    width = 4 if ctx.agent_id == 'a1' else 2\n"
        "    return TaskDefinition(model=lambda: nn.Linear(3, width), train=(x, np.zeros(8, np.int64)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {**HAR, "task": "plug_widths:make", "byzantine": None, "task_params": {"batch_size": 4}}
    plan = plan_topology(parse_spec(spec))
    with pytest.raises(ConfigError) as info:
        run(plan, tmp_path, "loss", engine="batched")
    assert info.value.field == "--option engine" and "a1: its model differs from a0's" in str(info.value)
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="orchestrator.backends.sim"):
        out = run(plan, tmp_path, "loss")
    assert len(out.metrics) == 3 * 2
    fell_back = [r.message for r in caplog.records if "per-agent engine" in r.message]
    assert len(fell_back) == 1 and "its model differs" in fell_back[0]
