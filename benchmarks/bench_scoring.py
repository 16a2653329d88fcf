"""Neighbour scoring of torch tasks: vectorized (vmap over stacked parameters) versus one by one.

Two measurements per case study, each with ``vectorized_scoring`` on and off:

  scoring  one agent scores every received model on its current batch (Task.losses), the part the
           flag changes: 30 linear models for HAR (batch 10), 10 CNNs for digits (batch 32);
  round    one whole round of the network in the in-process engine with rule loss-filtered
           (adapt, exchange, score, filter, combine, test metrics), per round, all agents: the
           HAR example (30 agents) and the digits example (10 agents), over ``--rounds`` rounds.

The two variants are timed alternately, ``--repeat`` times, and the best is kept; CPU time
(process_time) is reported next to wall time because the machine may be shared, which inflates
wall time but not much the CPU time of a single-threaded process. Both variants must give the
same losses (to float tolerance) before anything is reported.

    python benchmarks/bench_scoring.py [--device cpu|cuda] [--threads 1] [--rounds 10] [--repeat 3]

Prints a table and writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from mtl_node.config import build_config  # noqa: E402
from mtl_node.engine import IN_PROCESS, run_agents  # noqa: E402
from mtl_node.tasks import TorchTask, make_task  # noqa: E402
from orchestrator.planner import plan_file  # noqa: E402

CASES: dict[str, dict[str, Any]] = {
    "har": {"example": "examples/har-0byz.yaml", "models": 30, "params": {"subject": 1}},
    "digits": {
        "example": "examples/digits-0byz.yaml",
        "models": 10,
        "params": {"train_samples": 200, "test_samples": 50},
    },
}


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, cpu) seconds of one call, after synchronising the device."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def scoring(case: str, device: str, repeat: int, calls: int) -> dict[str, Any]:
    spec = CASES[case]
    params = {**spec["params"], "init": "agent"}
    tasks: dict[bool, TorchTask] = {}
    for v in (True, False):
        task = make_task(case, "a0", 0, {**params, "vectorized_scoring": v}, device)
        assert isinstance(task, TorchTask)
        tasks[v] = task
    models = [make_task(case, f"n{i}", 0, params, device).init_model() for i in range(spec["models"])]
    for t in tasks.values():
        t.adapt(models[0], 1)
    fast, slow = (np.array(tasks[v].losses(models, 1)) for v in (True, False))
    np.testing.assert_allclose(fast, slow, rtol=1e-4)
    best: dict[bool, tuple[float, float]] = {True: (np.inf, np.inf), False: (np.inf, np.inf)}
    for _ in range(repeat):
        for v in (True, False):

            def run(v: bool = v) -> None:
                for _ in range(calls):
                    tasks[v].losses(models, 1)

            wall, cpu = timed(run)
            best[v] = (min(best[v][0], wall / calls), min(best[v][1], cpu / calls))
    return {
        "models": spec["models"],
        "batch": tasks[True].p.batch_size,
        "vectorized_ms": {"wall": best[True][0] * 1e3, "cpu": best[True][1] * 1e3},
        "one_by_one_ms": {"wall": best[False][0] * 1e3, "cpu": best[False][1] * 1e3},
    }


def network_round(case: str, device: str, repeat: int, rounds: int) -> dict[str, Any]:
    plan = plan_file(ROOT / CASES[case]["example"])

    def configs(vectorized: bool) -> list[Any]:
        out = []
        for agent in plan.agents:
            data = plan.node_config_data(agent, "loss-filtered")
            data["rounds"] = rounds
            data["device"] = device
            data["task_params"]["vectorized_scoring"] = vectorized
            data["neighbors"] = {n: IN_PROCESS for n in agent.neighbors}
            out.append(build_config(data))
        return out

    run_agents(configs(True))  # warm caches (data sets, rendered digits, imports)
    best: dict[bool, tuple[float, float]] = {True: (np.inf, np.inf), False: (np.inf, np.inf)}
    for _ in range(repeat):
        for v in (True, False):
            cfgs = configs(v)

            def run(cfgs: list[Any] = cfgs) -> None:
                run_agents(cfgs)

            wall, cpu = timed(run)
            best[v] = (min(best[v][0], wall / rounds), min(best[v][1], cpu / rounds))
    return {
        "agents": len(plan.agents),
        "rounds": rounds,
        "vectorized_s": {"wall": best[True][0], "cpu": best[True][1]},
        "one_by_one_s": {"wall": best[False][0], "cpu": best[False][1]},
    }


def pair(t: dict[str, float], digits: int) -> str:
    return f"{t['cpu']:9.{digits}f} cpu {t['wall']:7.{digits}f} wall"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the network measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20, help="scoring calls per timing")
    ap.add_argument("--skip-round", action="store_true", help="only the scoring call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": describe(), "device": args.device, "threads": args.threads}
    for case in CASES:
        results[case] = {"scoring": scoring(case, args.device, args.repeat, args.calls)}
        if not args.skip_round:
            results[case]["round"] = network_round(case, args.device, args.repeat, args.rounds)
    print(f"device {args.device}, {args.threads} thread(s), best of {args.repeat}")
    print(f"{'case':8} {'what':34} {'vectorized':>22} {'one by one':>22}")
    for case in CASES:
        s = results[case]["scoring"]
        what = f"score {s['models']} models, batch {s['batch']} (ms)"
        print(f"{case:8} {what:34} {pair(s['vectorized_ms'], 2)} {pair(s['one_by_one_ms'], 2)}")
        if "round" in results[case]:
            r = results[case]["round"]
            what = f"network round, {r['agents']} agents (s)"
            print(f"{case:8} {what:34} {pair(r['vectorized_s'], 3)} {pair(r['one_by_one_s'], 3)}")
    out = ROOT / "benchmarks" / "results" / "scoring.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
