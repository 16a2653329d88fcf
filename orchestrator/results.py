"""The results directory of a run (DESIGN §3): metrics.csv, decisions.csv, plan.json, summary.json.

``mtl-orchestrate up`` writes it through ``ResultsWriter`` while rounds come in; ``report`` and anyone
with a spreadsheet read it back. CSV because it is what people open first; rows are appended and the
file closed after every batch so a crash of the orchestrator loses nothing already received.

The summary follows the paper's way of comparing rules: for every normal agent, average the metric over
the final window of rounds (by default the last 20%), then report mean, min and max over the normal
agents. Byzantine agents are excluded: their numbers say nothing about resilience. The computation is
columnar numpy so 100 agents x 500 rounds x 4 rules (200k rows) summarize in well under a second.

No torch here: the orchestrator must render and summarize on a machine without it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_node.errors import ConfigError
from orchestrator.plan import RunPlan

log = logging.getLogger(__name__)

METRIC_COLUMNS: tuple[str, ...] = (
    "round",
    "agent",
    "role",
    "rule",
    "loss",
    "test_loss",
    "test_accuracy",
    "attack_success",
    "accepted",
    "filtered",
    "missing",
    "seconds",
)
DECISION_COLUMNS: tuple[str, ...] = (
    "round",
    "agent",
    "rule",
    "neighbor",
    "decision",
    "weight",
    "ema",
    "loss",
    "reason",
)
# The metrics a task may report; summaries and plots cover those that are not all empty.
METRICS: tuple[str, ...] = ("loss", "test_loss", "test_accuracy", "attack_success")
COUNTS: tuple[str, ...] = ("accepted", "filtered", "missing")
ROLES: tuple[str, ...] = ("normal", "byzantine")
DEFAULT_WINDOW = 0.2

METRICS_FILE = "metrics.csv"
DECISIONS_FILE = "decisions.csv"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"

_METRIC_REQUIRED = ("round", "agent", "role", "rule")
_DECISION_REQUIRED = ("round", "agent", "rule", "neighbor", "decision")
_METRIC_INTS = ("round", "accepted", "filtered", "missing")
_METRIC_FLOATS = ("loss", "test_loss", "test_accuracy", "attack_success", "seconds")
_DECISION_FLOATS = ("weight", "ema", "loss")

PlanLike = RunPlan | Mapping[str, Any]


# -- writing ------------------------------------------------------------------------------------------


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
        n = _append(self.metrics_path, METRIC_COLUMNS, _METRIC_REQUIRED, rows, check_role=True)
        self.metric_rows += n
        return n

    def add_decisions(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append filter-decision rows (keys of DECISION_COLUMNS; extra keys ignored); returns how many."""
        n = _append(self.decisions_path, DECISION_COLUMNS, _DECISION_REQUIRED, rows, check_role=False)
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


# -- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsTable:
    """metrics.csv as columns: numbers as numpy arrays (NaN for empty cells), names as str arrays."""

    round: np.ndarray  # int64
    agent: np.ndarray  # str
    role: np.ndarray  # str
    rule: np.ndarray  # str
    values: dict[str, np.ndarray]  # float64 per numeric column (metrics, counts, seconds)

    def __len__(self) -> int:
        return len(self.round)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> MetricsTable:
        def floats(name: str) -> np.ndarray:
            return np.array(
                [np.nan if (v := r.get(name)) is None else float(v) for r in rows], dtype=np.float64
            )

        return cls(
            round=np.array([int(r["round"]) for r in rows], dtype=np.int64),
            agent=np.array([str(r["agent"]) for r in rows], dtype=str),
            role=np.array([str(r["role"]) for r in rows], dtype=str),
            rule=np.array([str(r["rule"]) for r in rows], dtype=str),
            values={c: floats(c) for c in (*METRICS, *COUNTS, "seconds")},
        )


def read_metrics_table(path: Path) -> MetricsTable:
    """Parse metrics.csv column-wise; a missing or malformed file is a ConfigError naming it."""
    header, columns = _read_columns(Path(path), _METRIC_REQUIRED)
    n = len(columns["round"])
    values: dict[str, np.ndarray] = {}
    for name in (*METRICS, *COUNTS, "seconds"):
        col = columns.get(name)
        values[name] = np.full(n, np.nan) if col is None else _parse_floats(path, name, col, header)
    rounds = _parse_floats(path, "round", columns["round"], header, allow_empty=False)
    if n and (not np.all(np.isfinite(rounds)) or np.any(rounds != np.round(rounds)) or rounds.min() < 0):
        bad = int(np.flatnonzero(~np.isfinite(rounds) | (rounds != np.round(rounds)) | (rounds < 0))[0])
        raise ConfigError(f"{path}:{bad + 2}", f"round {columns['round'][bad]!r} is not a round number")
    roles = np.array(columns["role"], dtype=str)
    unknown = ~np.isin(roles, ROLES)
    if np.any(unknown):
        bad = int(np.flatnonzero(unknown)[0])
        raise ConfigError(f"{path}:{bad + 2}", f"role {roles[bad]!r} is not one of {', '.join(ROLES)}")
    return MetricsTable(
        round=rounds.astype(np.int64),
        agent=np.array(columns["agent"], dtype=str),
        role=roles,
        rule=np.array(columns["rule"], dtype=str),
        values=values,
    )


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as dicts with numbers parsed back (round and counts int, metrics float, empty None)."""
    header, columns = _read_columns(Path(path), _METRIC_REQUIRED)
    parsed: dict[str, list[Any]] = {}
    for name in METRIC_COLUMNS:
        col = columns.get(name)
        if col is None:
            parsed[name] = [None] * len(columns["round"])
        elif name in _METRIC_INTS or name in _METRIC_FLOATS:
            arr = _parse_floats(path, name, col, header, allow_empty=name != "round")
            as_int = name in _METRIC_INTS
            parsed[name] = [None if math.isnan(x) else (int(x) if as_int else x) for x in arr.tolist()]
        else:
            parsed[name] = list(col)
    return [dict(zip(METRIC_COLUMNS, values, strict=True)) for values in zip(*parsed.values(), strict=True)]


def load_decisions(path: Path) -> list[dict[str, Any]]:
    """decisions.csv as dicts (round int; weight/ema/loss float; empty None)."""
    header, columns = _read_columns(Path(path), _DECISION_REQUIRED)
    parsed: dict[str, list[Any]] = {}
    for name in DECISION_COLUMNS:
        col = columns.get(name)
        if col is None:
            parsed[name] = [None] * len(columns["round"])
        elif name == "round":
            arr = _parse_floats(path, name, col, header, allow_empty=False)
            parsed[name] = [int(x) for x in arr.tolist()]
        elif name in _DECISION_FLOATS:
            arr = _parse_floats(path, name, col, header)
            parsed[name] = [None if math.isnan(x) else x for x in arr.tolist()]
        else:
            parsed[name] = [v if v != "" else None for v in col] if name == "reason" else list(col)
    return [dict(zip(DECISION_COLUMNS, values, strict=True)) for values in zip(*parsed.values(), strict=True)]


def _read_columns(path: Path, required: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    if not path.is_file():
        raise ConfigError(str(path), "not found", "point at the results directory of a run (--out of `up`)")
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ConfigError(str(path), "is empty (no header row)")
            lacking = [c for c in required if c not in header]
            if lacking:
                raise ConfigError(str(path), f"header lacks column(s) {', '.join(lacking)}")
            width = len(header)
            rows = []
            for r in reader:
                if not r:
                    continue
                if len(r) != width:
                    # A line torn by a crash (or damaged): say so and keep every other row.
                    log.warning(
                        "%s:%d: has %d fields, the header has %d; row skipped",
                        path,
                        reader.line_num,
                        len(r),
                        width,
                    )
                    continue
                rows.append(r)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(str(path), f"cannot be read: {exc}") from exc
    transposed = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    columns = {name: list(col) for name, col in zip(header, transposed, strict=True)}
    return header, columns


def _parse_floats(
    path: Path, name: str, col: list[str], header: list[str], *, allow_empty: bool = True
) -> np.ndarray:
    try:
        if "" not in col:
            return np.array(col, dtype=np.float64)
        if allow_empty:
            if not any(col):  # a metric the task does not have: skip parsing 200k empty cells
                return np.full(len(col), np.nan)
            return np.array([v or "nan" for v in col], dtype=np.float64)
    except ValueError:
        pass
    # Slow path only to name the offending line.
    for i, v in enumerate(col):
        try:
            if not v and not allow_empty:
                raise ValueError(v)
            float(v or "nan")
        except ValueError:
            raise ConfigError(f"{path}:{i + 2}", f"column {name!r} has {v!r}, expected a number") from None
    raise AssertionError("unreachable")


# -- summarizing ------------------------------------------------------------------------------------


def window_bounds(rounds: int, window_share: float = DEFAULT_WINDOW) -> tuple[int, int]:
    """(first, last) round of the final window, inclusive, rounds numbered 1..rounds; never empty.

    500 rounds with share 0.2 -> (401, 500); 3 rounds with share 0.2 -> (3, 3).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < window_share <= 1:
        raise ValueError(f"window share must be in (0, 1], got {window_share}")
    # The epsilon keeps 500 * 0.2 == 100.00000000000001 from becoming 101 rounds.
    n = min(rounds, max(1, math.ceil(rounds * window_share - 1e-9)))
    return rounds - n + 1, rounds


def summarize(
    metrics: Sequence[Mapping[str, Any]] | Path | str | MetricsTable,
    plan: PlanLike,
    *,
    backend: str | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The summary.json dict: per rule, stats over normal agents of window-averaged metrics.

    ``plan`` gives rounds and window share (and name/seed/rules when it is a RunPlan or plan.json
    dict). A run that stopped early (fewer rounds recorded than planned) is summarized over the
    window of the rounds it completed and marked ``"partial": true``, so a crash still gets numbers.
    Non-finite statistics (a diverged agent) are written as null since JSON has no Infinity.
    """
    table = _as_table(metrics)
    planned = int(_plan_get(plan, "rounds"))
    share = float(_plan_get(plan, "window", DEFAULT_WINDOW))
    completed = int(table.round.max()) if len(table) else 0
    effective = min(planned, completed) if completed else planned
    first, last = window_bounds(max(effective, 1), share)

    plan_rules = [str(r) for r in (_plan_get(plan, "rules", ()) or ())]
    data_rules = sorted(set(np.unique(table.rule).tolist()) - set(plan_rules))
    rules = plan_rules + data_rules

    in_window = (table.round >= first) & (table.round <= last) & (table.role == "normal")
    rule_names, rule_idx = np.unique(table.rule[in_window], return_inverse=True)
    agent_names, agent_idx = np.unique(table.agent[in_window], return_inverse=True)
    n_agents = max(len(agent_names), 1)
    key = rule_idx * n_agents + agent_idx
    size = len(rule_names) * n_agents
    present = np.bincount(key, minlength=size).reshape(-1, n_agents) > 0

    per_rule: dict[str, dict[str, Any]] = {}
    stats_by_metric: dict[str, np.ndarray] = {}
    for metric in METRICS:
        v = table.values[metric][in_window]
        ok = ~np.isnan(v)
        sums = np.bincount(key[ok], weights=v[ok], minlength=size).reshape(-1, n_agents)
        counts = np.bincount(key[ok], minlength=size).reshape(-1, n_agents)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats_by_metric[metric] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    count_means: dict[str, np.ndarray] = {}
    for name in COUNTS:
        v = table.values[name][in_window]
        ok = ~np.isnan(v)
        sums = np.bincount(rule_idx[ok], weights=v[ok], minlength=len(rule_names))
        counts = np.bincount(rule_idx[ok], minlength=len(rule_names))
        with np.errstate(invalid="ignore", divide="ignore"):
            count_means[name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    index = {name: i for i, name in enumerate(rule_names.tolist())}
    for rule in rules:
        entry: dict[str, Any] = {"agents": 0}
        i = index.get(rule)
        if i is not None:
            entry["agents"] = int(present[i].sum())
            for metric in METRICS:
                per_agent = stats_by_metric[metric][i]
                per_agent = per_agent[~np.isnan(per_agent)]
                if len(per_agent):
                    entry[metric] = {
                        "mean": _finite(float(np.mean(per_agent))),
                        "min": _finite(float(np.min(per_agent))),
                        "max": _finite(float(np.max(per_agent))),
                    }
            for name in COUNTS:
                if not math.isnan(count_means[name][i]):
                    entry[name] = float(count_means[name][i])
        per_rule[rule] = entry

    summary: dict[str, Any] = {
        "topology": _plan_get(plan, "name", None),
        "backend": backend,
        "seed": _plan_get(plan, "seed", None),
        "rounds": planned,
        "window": [first, last],
        "wall_seconds": wall_seconds,
        "rules": per_rule,
    }
    if completed < planned:
        summary["partial"] = True
        summary["rounds_completed"] = completed
    return summary


def _as_table(metrics: Sequence[Mapping[str, Any]] | Path | str | MetricsTable) -> MetricsTable:
    if isinstance(metrics, MetricsTable):
        return metrics
    if isinstance(metrics, str | Path):
        return read_metrics_table(Path(metrics))
    return MetricsTable.from_rows(metrics)


def _plan_get(plan: PlanLike, name: str, *default: Any) -> Any:
    if isinstance(plan, Mapping):
        if name in plan:
            return plan[name]
    elif hasattr(plan, name):
        return getattr(plan, name)
    if default:
        return default[0]
    raise KeyError(f"plan has no {name!r}")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
