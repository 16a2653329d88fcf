"""Writing a results directory while rounds come in: rows appended a batch at a time, each batch on
disk before the next round is awaited; summary.json at the end."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.plan import RunPlan
from orchestrator.results.layout import (
    DECISION_COLUMNS,
    DECISION_REQUIRED,
    DECISIONS_FILE,
    METRIC_COLUMNS,
    METRIC_REQUIRED,
    METRICS_FILE,
    PLAN_FILE,
    ROLES,
    SUMMARY_FILE,
    PlanLike,
)
from orchestrator.results.summary import summarize


class ResultsWriter:
    """Appends rows to a fresh results directory; ``write_summary`` closes the run.

    Construction truncates metrics.csv/decisions.csv (a results directory holds one run) and writes
    plan.json first, so even a run that dies in round 1 leaves a directory ``report`` can explain.
    """

    def __init__(self, *, directory: Path, plan: PlanLike) -> None:
        self.directory = Path(directory)
        self.plan = plan
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.directory / METRICS_FILE
        self.decisions_path = self.directory / DECISIONS_FILE
        self.plan_path = self.directory / PLAN_FILE
        self.summary_path = self.directory / SUMMARY_FILE
        plan_data = plan.to_json() if isinstance(plan, RunPlan) else dict(plan)
        _write_atomic(self.plan_path, json.dumps(plan_data, indent=1) + "\n")
        for path, columns in ((self.metrics_path, METRIC_COLUMNS), (self.decisions_path, DECISION_COLUMNS)):
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(columns)
        self.metric_rows = 0
        self.decision_rows = 0

    def add_metrics(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append metrics rows (keys of METRIC_COLUMNS; extra keys ignored); returns how many."""
        n = _append(self.metrics_path, METRIC_COLUMNS, METRIC_REQUIRED, rows, check_role=True)
        self.metric_rows += n
        return n

    def add_decisions(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append filter-decision rows (keys of DECISION_COLUMNS; extra keys ignored); returns how many."""
        n = _append(self.decisions_path, DECISION_COLUMNS, DECISION_REQUIRED, rows, check_role=False)
        self.decision_rows += n
        return n

    write_metrics = add_metrics
    write_decisions = add_decisions

    def write_summary(self, backend: str, wall_seconds: float) -> dict[str, Any]:
        """Summarize metrics.csv as written (the file is the record) into summary.json; returns it."""
        summary = summarize(self.metrics_path, self.plan, backend=backend, wall_seconds=wall_seconds)
        write_summary_file(self.summary_path, summary)
        return summary


def write_summary_file(path: Path, summary: Mapping[str, Any]) -> None:
    _write_atomic(path, json.dumps(summary, indent=1, allow_nan=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append(
    path: Path,
    columns: Sequence[str],
    required: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    check_role: bool,
) -> int:
    lines: list[list[str]] = []
    for row in rows:
        absent = [c for c in required if row.get(c) is None]
        if absent:
            raise ValueError(f"{path.name} row lacks {', '.join(absent)}: {dict(row)!r}")
        if check_role and row["role"] not in ROLES:
            raise ValueError(f"{path.name} row has role {row['role']!r}, expected one of {ROLES}")
        lines.append([_cell(row.get(c)) for c in columns])
    if lines:
        # Open, append, close: the batch is on disk before the next round is awaited.
        with path.open("a", newline="") as f:
            csv.writer(f).writerows(lines)
    return len(lines)


def _cell(value: Any) -> str:
    """None and NaN become an empty cell (the contract for 'not defined'); floats round-trip exactly."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        x = float(value)
        return "" if math.isnan(x) else repr(x)
    return str(value)
