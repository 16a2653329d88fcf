"""A run survives its orchestrator (DESIGN §5): what ``status``, ``attach`` and ``down`` read from
the results directory, and how they act on it.

``up`` writes ``deployment.json`` (atomically, before any agent starts): its own pid, start time and
command line, the backend and its options. Each rule's ``work/<rule>/pids.json`` lists the agent
host processes the same way (rewritten on every supervised restart). Nothing here signals a pid
whose start time and command line differ from the record: after a reboot or pid wrap-around the
number may belong to an unrelated process.

``attach`` on a local run whose ``up`` died is crash-only recovery applied to the whole run: the
orphaned agent processes are stopped (verified as above) and the rules that had not finished are
deployed again; every agent resumes from its state directory after its last complete round, so
the results equal those of a run whose ``up`` never died. Rules that finished are only collected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtl_node.core.errors import ConfigError
from orchestrator.backends.common import is_same_process, process_record, read_jsonl, write_atomic

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"


def write_deployment(out: Path, backend: str, options: dict[str, Any] | None, pid: int | None = None) -> None:
    record = process_record(pid or os.getpid())
    data = {**record, "backend": backend, "options": options or {}, "started": time.time()}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / DEPLOYMENT_FILE, json.dumps(data, indent=1))


def read_deployment(out: Path) -> dict[str, Any] | None:
    path = out / DEPLOYMENT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError("DIR", f"{path} cannot be read: {exc}") from None
    return data if isinstance(data, dict) else None


def orchestrator_alive(dep: dict[str, Any] | None) -> bool:
    return dep is not None and is_same_process(dep)


def agent_records(out: Path) -> Iterator[dict[str, Any]]:
    """Every process record in ``work/*/pids.json`` (old files with bare pids cannot be verified:
    they are reported and never signalled)."""
    for pids_file in sorted((out / "work").glob("*/pids.json")):
        try:
            records = json.loads(pids_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable (%s); its processes are left alone", pids_file, exc)
            continue
        for record in records:
            if isinstance(record, dict):
                yield record
            else:
                log.warning("%s: pid %s has no start time to verify; left alone", pids_file, record)


def running_agents(out: Path) -> list[dict[str, Any]]:
    return [r for r in agent_records(out) if is_same_process(r)]


def stop_verified(records: list[dict[str, Any]], timeout: float) -> int:
    """SIGTERM each still-verified process, SIGKILL what is left after ``timeout``; returns how many
    were signalled."""
    targets = [r for r in records if is_same_process(r)]
    for r in targets:
        _signal(r, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_same_process(r) for r in targets) and time.monotonic() < deadline:
        time.sleep(0.1)
    for r in targets:
        if is_same_process(r):
            _signal(r, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(is_same_process(r) for r in targets) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(targets)


def _signal(record: dict[str, Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(record["pid"]), sig)


def rule_complete(out: Path, rule: str, agents: list[str], rounds: int) -> bool:
    """Whether every agent of ``rule`` recorded its last round."""
    for agent in agents:
        rows = read_jsonl(out / "work" / rule / "agents" / agent / "metrics.jsonl")
        if not rows or rows[-1].get("round") != rounds:
            return False
    return True


def attach(out: Path, show_progress: bool = True) -> dict[str, Any]:
    """Follow the run in ``out`` to its end and write its results as ``up`` would have."""
    from orchestrator.backends import BACKENDS, Progress, RunContext
    from orchestrator.backends.common import collect
    from orchestrator.plan import RunPlan
    from orchestrator.results import ResultsWriter
    from orchestrator.runner import ProgressFile, _ProgressBar, finish_run

    dep = read_deployment(out)
    plan_path = out / "plan.json"
    if dep is None or not plan_path.exists():
        raise ConfigError("DIR", f"{out} holds no run (no deployment.json/plan.json)", "give --out of `up`")
    plan = RunPlan.from_json(json.loads(plan_path.read_text()))
    if orchestrator_alive(dep):
        return _wait_for_orchestrator(out, dep)
    backend = str(dep.get("backend", "local"))
    if backend != "local":
        raise ConfigError(
            "DIR",
            f"attach resumes local runs; this one ran on {backend}",
            "its agents restart themselves (restart policy); `down DIR` stops what is left",
        )
    stopped = stop_verified(running_agents(out), timeout=20.0)
    if stopped:
        log.warning("stopped %d orphaned agent processes; their agents resume from their state", stopped)
    write_deployment(out, backend, dep.get("options"))
    writer = ResultsWriter(directory=out, plan=plan)
    progress_file = ProgressFile(out / "progress.json", plan.rules)
    started = time.perf_counter()
    lost: dict[str, list[str]] = {}
    ids = [a.id for a in plan.agents]
    bar = _ProgressBar(plan) if show_progress else None
    try:
        if bar:
            bar.__enter__()
        for rule in plan.rules:

            def sink(p: Progress) -> None:
                progress_file.update(p)
                if bar:
                    bar.update(p)

            workdir = out / "work" / rule
            ctx = RunContext(rule=rule, workdir=workdir, progress=sink, options=dep.get("options"))
            if rule_complete(out, rule, ids, plan.rounds):
                output = collect(plan, ctx)
                sink(Progress(rule, plan.rounds, plan.rounds, float("nan"), 0, 0, 0))
            else:
                output = BACKENDS.get(backend)().run(plan, ctx)
            writer.add_metrics(output.metrics)
            writer.add_decisions(output.decisions)
            if ctx.lost:
                lost[rule] = sorted(ctx.lost)
    except BaseException:
        progress_file.finish("failed")
        raise
    finally:
        if bar:
            bar.__exit__(*sys.exc_info())
    return finish_run(
        out, writer, progress_file, backend=backend, wall=time.perf_counter() - started, lost=lost
    )


def _wait_for_orchestrator(out: Path, dep: dict[str, Any]) -> dict[str, Any]:
    """``up`` still runs: wait for it and return its summary."""
    while is_same_process(dep):
        time.sleep(0.5)
    summary_path = out / "summary.json"
    progress = json.loads((out / "progress.json").read_text()) if (out / "progress.json").exists() else {}
    if progress.get("state") != "done" or not summary_path.exists():
        state = progress.get("state", "unknown")
        raise ConfigError("DIR", f"the run's orchestrator ended with state {state}")
    return dict(json.loads(summary_path.read_text()))
