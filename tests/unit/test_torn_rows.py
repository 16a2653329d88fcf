"""Readers of agent and results files never drop rows silently (issue 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.backends.common import read_jsonl
from orchestrator.results import load_metrics


def test_jsonl_torn_line_is_reported_and_later_rows_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "lo\n' + json.dumps({"round": 3}) + "\n")
    with caplog.at_level(logging.WARNING):
        rows = read_jsonl(path)
    assert [r["round"] for r in rows] == [1, 3]
    assert f"{path}:2" in caplog.text


def test_csv_torn_line_is_reported_and_later_rows_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    header = "round,agent,role,rule,loss,test_loss,test_accuracy,accepted,filtered,missing,seconds"
    good = ["1,a0,normal,none,0.5,,,0,0,0,0.01", "2,a0,normal,none,0.4,,,0,0,0,0.01"]
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join([header, good[0], "2,a0,norm", good[1]]) + "\n")
    with caplog.at_level(logging.WARNING):
        rows = load_metrics(path)
    assert [r["round"] for r in rows] == [1, 2]
    assert f"{path}:3" in caplog.text
