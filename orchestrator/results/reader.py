"""Reading a results directory back: metrics.csv as numpy columns (MetricsTable) or as dicts, and
decisions.csv; a line torn by a crash is skipped with a warning, anything else malformed is a
ConfigError naming the file and line."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_node.core.errors import ConfigError
from orchestrator.results.layout import (
    COUNTS,
    DECISION_COLUMNS,
    DECISION_FLOATS,
    DECISION_REQUIRED,
    METRIC_COLUMNS,
    METRIC_FLOATS,
    METRIC_INTS,
    METRIC_REQUIRED,
    METRICS,
    ROLES,
)

log = logging.getLogger(__name__)


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
    header, columns = _read_columns(Path(path), METRIC_REQUIRED)
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
    return _load_rows(Path(path), METRIC_COLUMNS, METRIC_REQUIRED, METRIC_INTS, METRIC_FLOATS)


def load_decisions(path: Path) -> list[dict[str, Any]]:
    """decisions.csv as dicts (round int; weight/ema/loss float; empty None)."""
    return _load_rows(
        Path(path), DECISION_COLUMNS, DECISION_REQUIRED, ("round",), DECISION_FLOATS, nullable=("reason",)
    )


def _load_rows(
    path: Path,
    names: Sequence[str],
    required: Sequence[str],
    ints: Sequence[str],
    floats: Sequence[str],
    nullable: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows as dicts over ``names``: ``ints``/``floats`` parsed (an empty cell None; never for
    ``round``), ``nullable`` text columns with an empty cell None, other text as written."""
    header, columns = _read_columns(path, required)
    parsed: dict[str, list[Any]] = {}
    for name in names:
        col = columns.get(name)
        if col is None:
            parsed[name] = [None] * len(columns["round"])
        elif name in ints or name in floats:
            arr = _parse_floats(path, name, col, header, allow_empty=name != "round")
            as_int = name in ints
            parsed[name] = [None if math.isnan(x) else (int(x) if as_int else x) for x in arr.tolist()]
        elif name in nullable:
            parsed[name] = [v if v != "" else None for v in col]
        else:
            parsed[name] = list(col)
    return [dict(zip(names, values, strict=True)) for values in zip(*parsed.values(), strict=True)]


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
