"""Crash-only state (mtl_node/state.py) and the recorder's resume: round trip, refusal, repair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_node import state, wire
from mtl_node.config import build_config
from mtl_node.core.errors import ConfigError
from mtl_node.recorder import FileRecorder, truncate_rows


def _fp(agent: str = "a", task: str = "target-localization") -> dict:
    cfg = build_config({"id": agent, "task": task, "neighbors": {"b": "127.0.0.1:1"}})
    return state.fingerprint(cfg, wire.manifest_of({"w": torch.zeros(2, dtype=torch.float64)}))


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    theta = {"w": torch.randn(2, dtype=torch.float64)}
    saved = state.AgentState(
        round=7,
        fingerprint=_fp(),
        theta=theta,
        published={6: {"w": torch.randn(2, dtype=torch.float64)}, 7: theta},  # shared tensor
        fetched={6: {"b": {"w": torch.randn(2, dtype=torch.float64)}}},
        rule={"ema": {"a": 0.1 + 0.2, "b": 1e-300}},
        task={"step": 3},
        task_tensors={"optimizer/0/exp_avg": torch.randn(3)},
    )
    state.write(tmp_path, saved, "a")
    got = state.load(tmp_path, _fp())
    assert got is not None and got.round == 7
    assert torch.equal(got.theta["w"], theta["w"]) and torch.equal(got.published[7]["w"], theta["w"])
    assert torch.equal(got.fetched[6]["b"]["w"], saved.fetched[6]["b"]["w"])
    assert got.rule == saved.rule and got.task == {"step": 3}
    assert torch.equal(got.task_tensors["optimizer/0/exp_avg"], saved.task_tensors["optimizer/0/exp_avg"])
    assert not (tmp_path / (state.STATE_FILE + ".tmp")).exists()


@pytest.mark.parametrize(
    ("agent", "task", "field"), [("c", "target-localization", "agent"), ("a", "har", "task")]
)
def test_state_of_another_run_is_refused_naming_the_mismatch(
    tmp_path: Path, agent: str, task: str, field: str
) -> None:
    state.write(tmp_path, state.AgentState(round=1, fingerprint=_fp(), theta={"w": torch.zeros(2)}), "a")
    with pytest.raises(ConfigError, match=f"{field} is 'a|{field} is 'target"):
        state.check(tmp_path, _fp(agent, task))


def test_no_state_is_none_and_garbage_is_refused(tmp_path: Path) -> None:
    assert state.load(tmp_path, _fp()) is None
    (tmp_path / state.STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable agent state"):
        state.check(tmp_path, _fp())


def test_truncate_drops_later_rounds_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"round": r, "agent": "a"}) + "\n" for r in (1, 2, 3, 4)]
    path.write_text("".join(rows) + '{"round": 5, "ag')
    assert truncate_rows(path, 3) == (3, 2)
    assert path.read_text() == "".join(rows[:3])


def test_recorder_resume_continues_without_gaps_or_duplicates(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
    (tmp_path / "decisions.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "x"')
    rec = FileRecorder(tmp_path)
    rec.resume(2)
    rec.close()
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["round"] for x in (tmp_path / "decisions.jsonl").read_text().splitlines()] == [1, 2]
