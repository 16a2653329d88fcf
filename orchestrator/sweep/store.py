"""The sweep's results directory: a durable per-cell log and the tables built from it.

``cells.jsonl`` gets one JSON line per finished cell, written in one ``write`` and fsynced before
the next cell is counted done, so an interrupted sweep (Ctrl-C, SIGKILL, a lost machine) loses at
most the cells in flight. A torn last line (killed mid-write) is dropped, and cut off before the
next append so it cannot glue onto a good line; resuming skips every cell whose id is logged.

``results.csv`` (and ``results.parquet`` when pyarrow is installed; optional) has one row per
(cell, normal agent): the grid coordinates, the agent, its final metric (the mean over the final
window of rounds, as ``summary.json`` of ``up``) and its *alone* reference: the same agent's final
metric under the non-cooperative rule ``none`` in the same grid (same task, topology and seed; an
agent learning alone does not depend on who is Byzantine or how they attack), plus the agent's
final ``attack_success`` (the backdoor trigger's success rate, mtl_node.tasks.trigger) where the task
reports it, whatever the cell's metric.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.sweep.spec import HIGHER_IS_BETTER, Cell, SweepSpec

log = logging.getLogger(__name__)

LOG_FILE = "cells.jsonl"
SPEC_FILE = "sweep.json"
CSV_FILE = "results.csv"
PARQUET_FILE = "results.parquet"
COLUMNS: tuple[str, ...] = (
    "cell",
    "task",
    "topology",
    "agents",
    "rule",
    "attack",
    "attack_params",
    "task_params",
    "fraction",
    "byzantine",
    "seed",
    "agent",
    "metric",
    "final",
    "alone",
    "attack_success",
)


class CellLog:
    """Append-only, fsynced, torn-line tolerant log of finished cells."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, dict[str, Any]]:
        """Cell id -> record, for every complete line; repairs a torn tail."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        records: dict[str, dict[str, Any]] = {}
        good = 0  # bytes of complete, parsed lines
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - pos)
                break
            line = data[pos:end]
            pos = end + 1
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                    raise ValueError("not a cell record")
            except ValueError:
                log.warning("%s: skipping an unreadable line at byte %d", self.path, good)
                good = pos
                continue
            records[rec["id"]] = rec
            good = pos
        if good < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n"
        with self.path.open("ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


def write_spec(directory: Path, spec: SweepSpec) -> None:
    path = Path(directory) / SPEC_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=1) + "\n")
    os.replace(tmp, path)


def rows(cells: Iterable[Cell], records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, normal agent) for the cells that have a record, in grid order."""
    cells = list(cells)
    alone: dict[tuple[str, str, int], dict[str, float | None]] = {}
    # The reference: rule none at fraction 0 where the grid has it, else any none cell.
    for cell in sorted(cells, key=lambda c: c.fraction, reverse=True):
        rec = records.get(cell.id)
        if cell.rule != "none" or rec is None or "final" not in rec:
            continue
        key = (cell.task.label, cell.topology.label, cell.seed)
        alone.setdefault(key, {}).update(zip(rec["agents"], rec["final"], strict=True))
    out = []
    for cell in cells:
        rec = records.get(cell.id)
        if rec is None or "final" not in rec:
            continue
        ref = alone.get((cell.task.label, cell.topology.label, cell.seed), {})
        common = {
            "cell": cell.id,
            "task": cell.task.label,
            "topology": cell.topology.label,
            "agents": cell.topology.agents,
            "rule": cell.rule,
            "attack": cell.attack_label,
            "attack_params": "" if cell.attack is None else json.dumps(cell.attack.params, sort_keys=True),
            "task_params": json.dumps(cell.task.task_params, sort_keys=True),
            "fraction": cell.fraction,
            "byzantine": cell.byzantine,
            "seed": cell.seed,
            "metric": cell.task.metric_name,
        }
        success = rec.get("attack_success") or [None] * len(rec["agents"])
        for agent, final, asr in zip(rec["agents"], rec["final"], success, strict=True):
            out.append(
                {**common, "agent": agent, "final": final, "alone": ref.get(agent), "attack_success": asr}
            )
    return out


# Differences below this (relative to max(1, |alone|)) are rounding, not worse: the per-agent torch
# engine reports accuracy in float32 (0.9120370388031006), the batched engines in float64
# (0.912037037037037), and a cell's alone reference may come from the other engine.
ROUNDING = 1e-6


def worse_than_alone(row: Mapping[str, Any]) -> bool | None:
    """Whether the agent ended worse than learning alone by more than rounding (None: no reference)."""
    final, alone = row["final"], row["alone"]
    if alone is None:
        return None
    if final is None:  # diverged: worse than any finite reference
        return True
    margin = ROUNDING * max(1.0, abs(alone))
    return final < alone - margin if row["metric"] in HIGHER_IS_BETTER else final > alone + margin


def write_tables(directory: Path, table: list[dict[str, Any]]) -> list[Path]:
    """results.csv, and results.parquet when pyarrow is importable; returns what was written."""
    directory = Path(directory)
    path = directory / CSV_FILE
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in table:
            w.writerow([_cell(r[c]) for c in COLUMNS])
    os.replace(tmp, path)
    written = [path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        log.info("pyarrow not installed: %s only", CSV_FILE)
        return written
    columns = {c: [r[c] for r in table] for c in COLUMNS}
    pq.write_table(pa.table(columns), directory / PARQUET_FILE)
    written.append(directory / PARQUET_FILE)
    return written


def read_csv(path: Path) -> list[dict[str, Any]]:
    """results.csv back as rows with numbers parsed (empty cells None)."""
    out = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for c in ("agents", "byzantine", "seed"):
                row[c] = int(row[c])
            row["fraction"] = float(row["fraction"])
            for c in ("final", "alone", "attack_success"):
                row[c] = float(row[c]) if row.get(c) else None
            out.append(row)
    return out


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else repr(x)
    return str(x)
