"""Running one sweep cell, in a worker (a local process or a Ray task).

A cell is planned and run exactly as ``mtl-orchestrate up --backend sim`` runs its topology: the
topology spec goes through ``orchestrator.planner.plan_topology`` and the ``sim`` backend's public
entry point (which picks the vectorized or the per-agent engine). Only the normal agents' final
metric (the window mean, as ``summary.json``) comes back, and the backdoor's ``attack_success`` where
the task reports it, as plain JSON: results cross process and
machine boundaries as data, never as pickled objects of ours.

This is the only module of the sweep that (through the sim backend) imports torch, and only when a
cell runs.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from mtl_node.core.errors import MTLError
from orchestrator.results import window_bounds

log = logging.getLogger(__name__)

SUCCESS = "attack_success"  # reported next to the cell's metric wherever the task measures it

_threads_set = False


class _Once(logging.Filter):
    """Lets each distinct message through once per worker: the sim backend says which engine runs
    a rule (and why not the batched one) for every run, i.e. for every cell of a sweep."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _one_thread() -> None:
    """One torch thread per worker: the executors give each cell its own core, and a fixed thread
    count keeps floating-point reductions identical whichever executor runs the cell."""
    global _threads_set
    if not _threads_set:
        import torch

        torch.set_num_threads(1)
        logging.getLogger("orchestrator.backends.sim").addFilter(_Once())
        _threads_set = True


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """``job``: {"id", "topology" (a topology spec mapping), "metric"}. Returns the cell's record:
    {"id", "agents", "final", "byzantine", "seconds"} (and "attack_success", the window means of
    that metric, when the task reports it) or {"id", "error"} when the cell failed."""
    started = time.perf_counter()
    try:
        _one_thread()
        finals, agents, byzantine = _run(job["topology"], [job["metric"], SUCCESS])
    except (MTLError, ValueError, RuntimeError, ArithmeticError) as exc:
        log.debug("cell %s failed: %s", job.get("id"), traceback.format_exc())
        return {"id": job["id"], "error": f"{type(exc).__name__}: {exc}"}
    record: dict[str, Any] = {
        "id": job["id"],
        "agents": agents,
        "final": finals[0],
        "byzantine": byzantine,
        "seconds": time.perf_counter() - started,
    }
    if any(x is not None for x in finals[1]):
        record[SUCCESS] = finals[1]
    return record


def _run(
    topology: dict[str, Any], metrics: list[str]
) -> tuple[list[list[float | None]], list[str], list[str]]:
    from orchestrator.backends import BACKENDS, RunContext
    from orchestrator.planner import plan_topology
    from orchestrator.spec import parse_spec

    plan = plan_topology(parse_spec(topology))
    (rule,) = plan.rules
    backend = BACKENDS.get("sim")()
    ctx = RunContext(
        rule=rule, workdir=Path("."), progress=lambda p: None, record_decisions=False, options=None
    )
    output = backend.run(plan, ctx)
    first, last = window_bounds(plan.rounds, plan.window)
    normal = plan.normal_ids
    index = {a: i for i, a in enumerate(normal)}
    sums = np.zeros((len(metrics), len(normal)))
    counts = np.zeros((len(metrics), len(normal)))
    for row in output.metrics:
        i = index.get(row["agent"])
        if i is None or not first <= row["round"] <= last:
            continue
        for m, metric in enumerate(metrics):
            v = row.get(metric)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            sums[m, i] += float(v)
            counts[m, i] += 1
    finals: list[list[float | None]] = []
    for m in range(len(metrics)):
        final: list[float | None] = []
        for s, c in zip(sums[m].tolist(), counts[m].tolist(), strict=True):
            x = s / c if c else math.nan
            final.append(x if math.isfinite(x) else None)
        finals.append(final)
    byzantine = [a.id for a in plan.agents if a.role == "byzantine"]
    return finals, normal, byzantine
