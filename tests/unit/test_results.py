"""Results directory: CSV contract, round trip, and the window statistics of summary.json.

Expected numbers are computed here independently (plain Python over the formula that generated the
rows), never copied from a run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from mtl_node.core.errors import ConfigError
from orchestrator.plan import AgentPlan, RunPlan
from orchestrator.results import (
    DECISION_COLUMNS,
    METRIC_COLUMNS,
    ResultsWriter,
    load_decisions,
    load_metrics,
    read_metrics_table,
    summarize,
    window_bounds,
)

AGENTS = [f"a{i}" for i in range(6)]
BYZANTINE = {"a2", "a5"}
RULES = ("loss-filtered", "average", "none")
ROUNDS = 20


def make_plan(rounds: int = ROUNDS, window: float = 0.2, rules: tuple[str, ...] = RULES) -> RunPlan:
    agents = tuple(
        AgentPlan(
            id=a,
            role="byzantine" if a in BYZANTINE else "normal",
            neighbors=tuple(b for b in AGENTS if b != a),
            task="target-localization",
            attack="constant" if a in BYZANTINE else None,
            group=i % 2,
            position=(float(i), float(i % 3)),
        )
        for i, a in enumerate(AGENTS)
    )
    return RunPlan(
        name="synthetic-ring",
        task="target-localization",
        rules=rules,
        rounds=rounds,
        seed=7,
        rule_params={"nu": 0.1},
        agents=agents,
        window=window,
    )


def value(metric: str, rule_i: int, agent_i: int, rnd: int) -> float | None:
    """The formula every synthetic row follows; test_accuracy is undefined for rule 'none'."""
    base = (rule_i + 1) * 10.0 / rnd + 0.1 * agent_i + 0.01 * (rnd % 3)
    if metric == "loss":
        return base
    if metric == "test_loss":
        return base * 1.5 if agent_i != 1 else None  # agent 1 never reports a test loss
    if metric == "test_accuracy":
        return None if RULES[rule_i] == "none" else min(1.0, 0.05 * agent_i + rnd / 40)
    if metric == "attack_success":  # the backdoor's rate: reported by agents 0 and 2 only
        return 0.5 / rnd + 0.1 * agent_i if agent_i in (0, 2) else None
    raise AssertionError(metric)


def metric_rows(rounds: int = ROUNDS, rules: tuple[str, ...] = RULES) -> list[dict[str, Any]]:
    rows = []
    for ri, rule in enumerate(rules):
        for rnd in range(1, rounds + 1):
            for ai, agent in enumerate(AGENTS):
                byz = agent in BYZANTINE
                rows.append(
                    {
                        "round": rnd,
                        "agent": agent,
                        "role": "byzantine" if byz else "normal",
                        "rule": rule,
                        # Byzantine agents report huge numbers: any leak into the stats shows.
                        "loss": 1e6 if byz else value("loss", ri, ai, rnd),
                        "test_loss": 1e6 if byz else value("test_loss", ri, ai, rnd),
                        "test_accuracy": 0.0 if byz else value("test_accuracy", ri, ai, rnd),
                        "attack_success": 1.0 if byz else value("attack_success", ri, ai, rnd),
                        "accepted": (ai + rnd) % 4,
                        "filtered": 5 - (ai + rnd) % 4,
                        "missing": float("nan") if rnd == 1 else 0,
                        "seconds": 0.001 * rnd,
                    }
                )
    return rows


def expected_stats(metric: str, rule_i: int, first: int, last: int) -> dict[str, float] | None:
    per_agent = []
    for ai, agent in enumerate(AGENTS):
        if agent in BYZANTINE:
            continue
        vals = [value(metric, rule_i, ai, r) for r in range(first, last + 1)]
        present = [v for v in vals if v is not None]
        if present:
            per_agent.append(sum(present) / len(present))
    if not per_agent:
        return None
    return {"mean": sum(per_agent) / len(per_agent), "min": min(per_agent), "max": max(per_agent)}


@pytest.mark.parametrize(
    ("rounds", "share", "bounds"),
    [(500, 0.2, (401, 500)), (20, 0.2, (17, 20)), (3, 0.2, (3, 3)), (1, 0.2, (1, 1)), (10, 1.0, (1, 10)),
     (7, 0.5, (4, 7))],
)  # fmt: skip
def test_window_bounds(rounds: int, share: float, bounds: tuple[int, int]) -> None:
    assert window_bounds(rounds, share) == bounds


@pytest.mark.parametrize(("rounds", "share"), [(0, 0.2), (10, 0.0), (10, 1.5)])
def test_window_bounds_rejects_nonsense(rounds: int, share: float) -> None:
    with pytest.raises(ValueError):
        window_bounds(rounds, share)


def test_summarize_matches_independent_computation() -> None:
    plan = make_plan()
    summary = summarize(metric_rows(), plan, backend="sim", wall_seconds=1.5)
    first, last = window_bounds(ROUNDS, 0.2)
    assert summary["window"] == [first, last] == [17, 20]
    assert summary["topology"] == "synthetic-ring"
    assert (summary["backend"], summary["seed"], summary["rounds"], summary["wall_seconds"]) == (
        "sim",
        7,
        ROUNDS,
        1.5,
    )
    assert list(summary["rules"]) == list(RULES)
    for ri, rule in enumerate(RULES):
        entry = summary["rules"][rule]
        assert entry["agents"] == len(AGENTS) - len(BYZANTINE)
        for metric in ("loss", "test_loss", "test_accuracy", "attack_success"):
            want = expected_stats(metric, ri, first, last)
            if want is None:
                assert metric not in entry, (rule, metric)
                continue
            for stat in ("mean", "min", "max"):
                assert entry[metric][stat] == pytest.approx(want[stat], rel=1e-12), (rule, metric, stat)
        normal = [ai for ai, a in enumerate(AGENTS) if a not in BYZANTINE]
        window = range(first, last + 1)
        accepted = [(ai + r) % 4 for ai in normal for r in window]
        assert entry["accepted"] == pytest.approx(sum(accepted) / len(accepted))
        assert entry["filtered"] == pytest.approx(5 - sum(accepted) / len(accepted))
        assert entry["missing"] == 0.0
    # The none rule has no accuracy at all; the others do.
    assert "test_accuracy" not in summary["rules"]["none"]
    assert "test_accuracy" in summary["rules"]["average"]
    assert "partial" not in summary


def test_summarize_excludes_byzantine_even_when_they_are_best() -> None:
    rows = metric_rows()
    for r in rows:
        if r["role"] == "byzantine":
            r["loss"] = 1e-9
    loss = summarize(rows, make_plan())["rules"]["average"]["loss"]
    assert loss["min"] == pytest.approx(expected_stats("loss", 1, 17, 20)["min"])  # type: ignore[index]


def test_summarize_other_window_share_and_dict_plan() -> None:
    plan = make_plan(window=0.5).to_json()
    summary = summarize(metric_rows(), plan)
    assert summary["window"] == [11, 20]
    want = expected_stats("loss", 0, 11, 20)
    assert summary["rules"]["loss-filtered"]["loss"]["mean"] == pytest.approx(want["mean"])  # type: ignore[index]


def test_summarize_metric_missing_everywhere_is_omitted() -> None:
    rows = metric_rows()
    for r in rows:
        r["test_accuracy"] = None
        r["test_loss"] = float("nan")
    summary = summarize(rows, make_plan())
    for entry in summary["rules"].values():
        assert "loss" in entry
        assert "test_loss" not in entry and "test_accuracy" not in entry


def test_summarize_partial_run_uses_completed_rounds() -> None:
    rows = [r for r in metric_rows() if r["round"] <= 10]
    summary = summarize(rows, make_plan())
    assert summary["partial"] is True and summary["rounds_completed"] == 10
    assert summary["window"] == [9, 10]
    want = expected_stats("loss", 2, 9, 10)
    assert summary["rules"]["none"]["loss"]["max"] == pytest.approx(want["max"])  # type: ignore[index]


def test_planned_rule_without_rows_is_listed_empty() -> None:
    rows = [r for r in metric_rows() if r["rule"] != "none"]
    summary = summarize(rows, make_plan())
    assert summary["rules"]["none"] == {"agents": 0}


def test_writer_round_trip_and_summary(tmp_path: Path) -> None:
    plan = make_plan()
    out = tmp_path / "run"
    writer = ResultsWriter(directory=out, plan=plan)
    assert json.loads((out / "plan.json").read_text()) == json.loads(json.dumps(plan.to_json()))
    rows = metric_rows()
    # One batch per round and rule, as the orchestrator feeds them.
    for start in range(0, len(rows), len(AGENTS)):
        writer.add_metrics(rows[start : start + len(AGENTS)])
    decisions = [
        {"round": 1, "agent": "a0", "rule": "average", "neighbor": "a1", "decision": "accepted",
         "weight": 0.25, "ema": 1.0 / 3.0, "loss": 0.5, "reason": "", "agent_id": "a1"},
        {"round": 1, "agent": "a0", "rule": "average", "neighbor": "a2", "decision": "missing",
         "weight": 0.0, "ema": float("nan"), "loss": None, "reason": "timeout"},
    ]  # fmt: skip
    assert writer.add_decisions(decisions) == 2

    with (out / "metrics.csv").open(newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == METRIC_COLUMNS
        first = next(reader)
    assert first[METRIC_COLUMNS.index("missing")] == ""  # NaN -> empty cell
    with (out / "decisions.csv").open(newline="") as f:
        assert tuple(next(csv.reader(f))) == DECISION_COLUMNS

    loaded = load_metrics(out / "metrics.csv")
    assert len(loaded) == len(rows)
    for got, want in zip(loaded, rows, strict=True):
        for col in METRIC_COLUMNS:
            w = want[col]
            if w is None or (isinstance(w, float) and math.isnan(w)):
                assert got[col] is None, col
            else:
                assert got[col] == w, col  # exact: floats are written with repr
                assert type(got[col]) is type(w), col

    loaded_d = load_decisions(out / "decisions.csv")
    assert loaded_d[0] == {k: decisions[0][k] for k in DECISION_COLUMNS} | {"reason": None}
    assert loaded_d[1]["ema"] is None and loaded_d[1]["loss"] is None and loaded_d[1]["reason"] == "timeout"

    summary = writer.write_summary("local", 12.5)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary == summarize(rows, plan, backend="local", wall_seconds=12.5)
    assert summary["backend"] == "local" and summary["wall_seconds"] == 12.5


def test_writer_rejects_incomplete_rows(tmp_path: Path) -> None:
    writer = ResultsWriter(directory=tmp_path, plan=make_plan())
    with pytest.raises(ValueError, match="role"):
        writer.add_metrics([{"round": 1, "agent": "a0", "rule": "none", "loss": 1.0}])
    with pytest.raises(ValueError, match="role"):
        writer.add_metrics([{"round": 1, "agent": "a0", "rule": "none", "role": "evil"}])
    assert load_metrics(tmp_path / "metrics.csv") == []


def test_summary_from_file_equals_summary_from_rows(tmp_path: Path) -> None:
    writer = ResultsWriter(directory=tmp_path, plan=make_plan())
    writer.add_metrics(metric_rows())
    assert summarize(tmp_path / "metrics.csv", make_plan()) == summarize(metric_rows(), make_plan())


def test_missing_and_malformed_metrics_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "metrics.csv"
    with pytest.raises(ConfigError, match=r"metrics\.csv"):
        load_metrics(missing)
    missing.write_text("round,agent,rule\n1,a0,none\n")
    with pytest.raises(ConfigError, match=r"metrics\.csv.*role"):
        read_metrics_table(missing)
    missing.write_text(",".join(METRIC_COLUMNS) + "\n1,a0,normal,none,abc,,,,,,,\n")
    with pytest.raises(ConfigError, match=r"metrics\.csv:2.*'loss'.*'abc'"):
        load_metrics(missing)
    # A torn row (a crash mid-append) is reported with file:line and skipped, never fatal
    # (issue 10; tests/unit/test_torn_rows.py keeps the rows after it).
    missing.write_text(",".join(METRIC_COLUMNS) + "\n1,a0,normal,none\n")
    assert load_metrics(missing) == []
    missing.write_text(",".join(METRIC_COLUMNS) + "\n1,a0,sneaky,none,1,,,,,,,\n")
    with pytest.raises(ConfigError, match=r"metrics\.csv:2.*role"):
        read_metrics_table(missing)
    missing.write_text(",".join(METRIC_COLUMNS) + "\n,a0,normal,none,1,,,,,,,\n")
    with pytest.raises(ConfigError, match=r"metrics\.csv:2.*'round'"):
        read_metrics_table(missing)
