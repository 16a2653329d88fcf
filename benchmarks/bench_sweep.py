"""Sweep throughput: cells per minute of ``mtl-orchestrate sweep`` for a fixed small grid per task,
local worker processes vs a Ray instance on this machine.

Each task gets the same small grid (one complete graph, rules none / average / loss-filtered, the
constant attack at 0% and one Byzantine fraction, 4 seeds: 24 cells); target localization runs
more rounds than the classification tasks, whose cells run on the per-agent engine. Every executor
runs the grid into a fresh directory, so nothing is resumed. Wall time includes starting the
workers (and, for Ray, the Ray instance); cell seconds are the sum of the cells' own run times.

With Ray among the executors the whole benchmark (both executors, so that they share conditions)
re-runs itself inside private network, PID and mount namespaces with only ``lo`` up (``unshare
--net --pid --fork --mount-proc``, as tests/integration/test_sweep_ray.py runs its cluster): Ray's
driver finds its own address by reaching out to an outside one (8.8.8.8) and a Ray instance binds
every interface; inside, there is nothing but loopback, and every Ray process ends with the
benchmark. Ray's files go to a private temporary directory (``RAY_TMPDIR``), removed afterwards.
Needs root or unprivileged user namespaces, ``unshare`` (util-linux) and ``ip`` (iproute2).

    python benchmarks/bench_sweep.py                     # all three tasks, local and ray
    python benchmarks/bench_sweep.py --tasks target-localization --executors local
    python benchmarks/bench_sweep.py --tasks target-localization,har --seeds 2 \
        --rules none,average,loss-filtered,ubar,balance,clipped-gossip,ios

Writes benchmarks/results/sweep-throughput.json; figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.sweep.runner import run_sweep  # noqa: E402
from orchestrator.sweep.spec import parse_sweep  # noqa: E402
from orchestrator.sweep.store import CellLog  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sweep-throughput.json"
RULES = ("none", "average", "loss-filtered")
ISOLATED = "MTL_BENCH_SWEEP_ISOLATED"  # set inside the namespaces: do not re-enter them

TASKS: dict[str, dict[str, Any]] = {
    "target-localization": {"task": {"task": "target-localization"}, "agents": 40, "rounds": 200},
    "har": {
        "task": {
            "task": "har",
            "nu": 0.001,
            "ema_init": 1.0,
            "task_params": {"lr": 0.01, "optimizer": "sgd", "batch_size": 10, "test_fraction": 0.3},
        },
        "agents": 8,
        "rounds": 30,
    },
    "digits": {"task": {"task": "digits"}, "agents": 4, "rounds": 10},
}


def grid(task: str, seeds: int, rules: tuple[str, ...] = RULES) -> dict[str, Any]:
    t = TASKS[task]
    return {
        "name": f"throughput-{task}",
        "tasks": [t["task"]],
        "topologies": [{"name": "complete", "agents": t["agents"], "graph": "complete"}],
        "rules": list(rules),
        "attacks": ["constant"],
        "fractions": [0.0, 0.25],
        "seeds": seeds,
        "rounds": t["rounds"],
        "window": 0.2,
    }


def measure(
    task: str, executor: str, workers: int, seeds: int, rules: tuple[str, ...] = RULES
) -> dict[str, Any]:
    spec = parse_sweep(grid(task, seeds, rules))
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        load = os.getloadavg()[0]
        started = time.perf_counter()
        outcome = run_sweep(spec, Path(tmp), executor=executor, workers=workers, show_progress=False)
        wall = time.perf_counter() - started
        cell_seconds = sum(r["seconds"] for r in CellLog(Path(tmp)).read().values())
        csv = (Path(tmp) / "results.csv").read_bytes()
    if outcome.failed:
        raise SystemExit(f"{task}/{executor}: cells failed: {outcome.failed}")
    return {
        "task": task,
        "executor": executor,
        "workers": workers,
        "cells": outcome.cells,
        "agents": TASKS[task]["agents"],
        "rounds": spec.rounds,
        "wall_seconds": wall,
        "cells_per_minute": 60.0 * outcome.cells / wall,
        "cell_seconds": cell_seconds,
        "load_average_1m_before": load,
        "load_average_1m_after": os.getloadavg()[0],
        "table_bytes": len(csv),
        "_csv": csv,
    }


def isolated(argv: list[str]) -> int:
    """Run this benchmark again inside private network, PID and mount namespaces, only lo up."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        print(
            f"bench_sweep: --executors with ray needs {' and '.join(missing)} (util-linux, iproute2) to "
            "keep Ray on loopback; install them or run with --executors local",
            file=sys.stderr,
        )
        return 2
    ray_tmp = tempfile.mkdtemp(prefix="rmtl-bench-ray-", dir="/tmp")  # short: Ray's unix sockets
    env = {**os.environ, ISOLATED: "1", "RAY_TMPDIR": ray_tmp}
    try:
        return subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
             "bash", "-c", 'ip link set lo up && exec "$@"', "bench-sweep",
             sys.executable, str(Path(__file__).resolve()), *argv],
            env=env,
        ).returncode  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seeds", type=int, default=4, help="seeds per grid (2 cells per rule each)")
    ap.add_argument("--rules", default=",".join(RULES), help="rules of the grid, comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if "ray" in args.executors.split(",") and not os.environ.get(ISOLATED):
        return isolated(argv)
    rules = tuple(args.rules.split(","))
    from benchmarks.machine import describe

    machine = describe()
    runs = []
    for task in args.tasks.split(","):
        tables = {}
        for executor in args.executors.split(","):
            r = measure(task, executor, args.workers, args.seeds, rules)
            tables[executor] = r.pop("_csv")
            runs.append(r)
            print(
                f"{task:>20} {executor:>5}: {r['cells']} cells in {r['wall_seconds']:.1f} s = "
                f"{r['cells_per_minute']:.1f} cells/min (cell time {r['cell_seconds']:.1f} s; load "
                f"{r['load_average_1m_before']:.1f} -> {r['load_average_1m_after']:.1f})",
                flush=True,
            )
        if len(set(tables.values())) > 1:
            raise SystemExit(f"{task}: the executors' tables differ")
    data = {
        "command": "python benchmarks/bench_sweep.py " + " ".join(argv),
        "machine": machine,
        "network": "private namespaces (unshare --net --pid --mount-proc), lo only"
        if os.environ.get(ISOLATED)
        else "host",
        "rules": list(rules),
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
