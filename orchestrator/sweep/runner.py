"""Running a sweep: skip the logged cells, fan the rest out to an executor, log each as it lands,
then write the tables (and the report, see orchestrator.sweep.report)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sweep.executors import EXECUTORS
from orchestrator.sweep.spec import Cell, SweepSpec
from orchestrator.sweep.store import CellLog, rows, write_spec, write_tables

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    cells: int  # in the grid
    skipped: int  # already in the log when the sweep started
    ran: int  # finished now
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    wall_seconds: float = 0.0
    table: list[dict[str, Any]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def job(cell: Cell) -> dict[str, Any]:
    return {"id": cell.id, "topology": cell.topology_spec(), "metric": cell.task.metric_name}


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    show_progress: bool = True,
) -> SweepOutcome:
    """Run every cell of ``spec`` not yet in ``out``'s log; write results.csv. KeyboardInterrupt
    stops the executor's workers and propagates; every cell logged so far is kept."""
    impl = EXECUTORS.get(executor, field="--executor")(workers=workers, address=address)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_spec(out, spec)
    cells = spec.cells()
    cell_log = CellLog(out)
    records = cell_log.read()
    todo = [c for c in cells if c.id not in records]
    outcome = SweepOutcome(cells=len(cells), skipped=len(cells) - len(todo), ran=0)
    started = time.perf_counter()
    bar = _Bar(len(cells), outcome.skipped, spec.name) if show_progress else None
    if todo:
        with impl, bar or nullcontext():
            for rec in impl.run([job(c) for c in todo]):
                if "error" in rec:
                    outcome.failed[rec["id"]] = rec["error"]
                    log.warning("cell %s failed: %s", rec["id"], rec["error"])
                else:
                    cell_log.append(rec)
                    records[rec["id"]] = rec
                    outcome.ran += 1
                if bar:
                    bar.advance(len(outcome.failed))
    outcome.wall_seconds = time.perf_counter() - started
    outcome.table = rows(cells, records)
    outcome.written = write_tables(out, outcome.table)
    return outcome


class _Bar:
    """A rich progress bar over cells (the logged ones count as done from the start)."""

    def __init__(self, total: int, done: int, name: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("cells, {task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(name, total=total, completed=done, failed=0)

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def advance(self, failed: int) -> None:
        self.progress.update(self.task, advance=1, failed=failed)
