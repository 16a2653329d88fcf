"""Running a plan: every rule on the chosen backend, one results directory, progress shown.

Rules are run one after another on identical topology and seeds, so their curves compare like
the paper's figures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from mtl_node.core.errors import MTLError
from orchestrator.backends import BACKENDS, Progress, RunContext
from orchestrator.plan import RunPlan
from orchestrator.tls import RunCerts

log = logging.getLogger(__name__)


class ProgressFile:
    """Writes the latest progress to ``progress.json`` (read by ``mtl-orchestrate status``)."""

    def __init__(self, path: Path, rules: tuple[str, ...]) -> None:
        self.path = path
        self.rules = rules
        self.state: dict[str, Any] = {"state": "running", "rules": list(rules), "current": None}
        self._last_write = 0.0
        self.write(force=True)

    def update(self, p: Progress) -> None:
        self.state["current"] = {
            "rule": p.rule,
            "round": p.round,
            "rounds": p.rounds,
            "mean_loss": p.mean_loss if math.isfinite(p.mean_loss) else None,
            "accepted": p.accepted,
            "filtered": p.filtered,
            "missing": p.missing,
        }
        self.write()

    def finish(self, state: str, **extra: Any) -> None:
        self.state["state"] = state
        self.state.update(extra)
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)


class LostAgents(MTLError):
    """Agents died during the run and were not recovered: the run's results are incomplete."""

    def __init__(self, lost: dict[str, list[str]]) -> None:
        self.lost = lost
        where = "; ".join(f"rule {rule}: {', '.join(ids)}" for rule, ids in lost.items())
        super().__init__(f"agents died and were not recovered ({where}); their rows stop where they died")


def finish_run(
    out: Path,
    writer: Any,
    progress_file: ProgressFile,
    *,
    backend: str,
    wall: float,
    lost: dict[str, list[str]],
) -> dict[str, Any]:
    """Write summary.json (with ``lost_agents`` when some died unrecovered) and the final progress
    state; raise LostAgents after writing if any agent was lost. Shared by ``up`` and ``attach``."""
    from orchestrator.results import write_summary_file

    summary = writer.write_summary(backend=backend, wall_seconds=wall)
    if lost:
        summary["lost_agents"] = lost
        write_summary_file(writer.summary_path, summary)
        progress_file.finish("failed", wall_seconds=wall, lost_agents=lost)
        raise LostAgents(lost)
    progress_file.finish("done", wall_seconds=wall)
    return summary


def run_plan(
    plan: RunPlan,
    *,
    backend: str,
    out: Path,
    show_progress: bool = True,
    backend_options: dict[str, Any] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    certs: RunCerts | None = None,
    insecure: bool = False,
) -> dict[str, Any]:
    """Run every rule of ``plan`` on ``backend``; write the results directory; return the summary.

    Agents of real backends talk mutual TLS with ``certs``, or with a CA made for the run in
    ``out/certs`` when none are given, unless ``insecure``.
    """
    from orchestrator.results import ResultsWriter
    from orchestrator.tls import run_certs

    backend_impl = BACKENDS.get(backend, field="--backend")()
    out.mkdir(parents=True, exist_ok=True)
    if certs is None and not insecure and backend != "sim":
        certs = run_certs(out, [a.id for a in plan.agents], None, None)
    writer = ResultsWriter(directory=out, plan=plan)
    progress_file = ProgressFile(out / "progress.json", plan.rules)
    started = time.perf_counter()
    bar = _ProgressBar(plan) if show_progress else None
    lost: dict[str, list[str]] = {}
    try:
        with bar or nullcontext():
            for rule in plan.rules:

                def sink(p: Progress) -> None:
                    progress_file.update(p)
                    if bar:
                        bar.update(p)
                    if on_progress:
                        on_progress(p)

                ctx = RunContext(
                    rule=rule,
                    workdir=out / "work" / rule,
                    progress=sink,
                    options=backend_options,
                    certs=certs,
                )
                output = backend_impl.run(plan, ctx)
                writer.add_metrics(output.metrics)
                writer.add_decisions(output.decisions)
                if ctx.lost:
                    lost[rule] = sorted(ctx.lost)
    except KeyboardInterrupt:
        progress_file.finish("stopped")
        raise
    except BaseException:
        progress_file.finish("failed")
        raise
    wall = time.perf_counter() - started
    return finish_run(out, writer, progress_file, backend=backend, wall=wall, lost=lost)


class _ProgressBar(AbstractContextManager["_ProgressBar"]):
    """A rich progress bar: one task per rule with round, mean loss and filter counts."""

    def __init__(self, plan: RunPlan) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[rule]:>14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("acc/filt/miss {task.fields[counts]}"),
            TimeElapsedColumn(),
        )
        self.tasks = {
            rule: self.progress.add_task(
                rule, total=plan.rounds, rule=rule, loss="-", counts="-", start=False
            )
            for rule in plan.rules
        }

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, p: Progress) -> None:
        task = self.tasks[p.rule]
        self.progress.start_task(task)
        fields: dict[str, Any] = {}
        if math.isfinite(p.mean_loss):
            fields["loss"] = f"{p.mean_loss:.4g}"
            fields["counts"] = f"{p.accepted:.1f}/{p.filtered:.1f}/{p.missing:.1f}"
        self.progress.update(task, completed=p.round, **fields)
