"""Where a round of the torch batched engine goes: CPU ms per round of each part of ``_Engine.step``.

Runs examples/har-10byz.yaml (or ``--spec``) on the batched engine alone, data cached, after an
untimed 2-round warm-up, with the engine's own methods wrapped in CPU timers (no copy of the round
loop): local steps (``adapt``), exchange and crafting, scoring, distances, aggregation,
combination, own loss, test metrics with attack success rates; "rest" is the step's remaining
time (records, bookkeeping). Timers add a few microseconds per call.

    python benchmarks/bench_torch_round.py [--rules none,loss-filtered] [--rounds 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtl_node.batched import torch_engine, torch_pool  # noqa: E402
from orchestrator.backends.sim import plan_configs  # noqa: E402
from orchestrator.planner import plan_topology  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

PARTS = ("adapt", "exchange", "scoring", "distances", "aggregate", "combine", "own loss", "tests")


def timed(spent: dict[str, float], part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.process_time() - c0

    return wrapper


def instrument(engine: Any, spent: dict[str, float]) -> None:
    engine.adapt = timed(spent, "adapt", engine.adapt)
    engine.exchange = timed(spent, "exchange", engine.exchange)
    engine.scorer.losses = timed(spent, "scoring", engine.scorer.losses)
    engine.model.pool_losses = timed(spent, "scoring", engine.model.pool_losses)
    engine.rules.aggregate = timed(spent, "aggregate", engine.rules.aggregate)
    engine.model.row_losses = timed(spent, "own loss", engine.model.row_losses)
    engine.model.test_metrics = timed(spent, "tests", engine.model.test_metrics)
    if engine.tests is not None:
        engine.tests = timed(spent, "tests", engine.tests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "har-10byz.yaml")
    ap.add_argument("--rules", default=None, help="comma-separated (default: the example's)")
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args(argv)
    data = yaml.safe_load(args.spec.read_text())
    data["rounds"] = args.rounds
    plan = plan_topology(parse_spec(data))
    torch.set_num_threads(torch_engine.THREADS)
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"{'rule':>14} " + " ".join(f"{p:>9}" for p in (*PARTS, "rest", "total")) + "  (CPU ms per round)")
    distances, combine = torch_pool.distances, torch_pool.combine
    for rule in args.rules.split(",") if args.rules else plan.rules:
        configs = plan_configs(plan, rule)
        warm = torch_engine._Engine(configs)
        for i in (1, 2):
            warm.step(i)
        spent: dict[str, float] = defaultdict(float)
        engine = torch_engine._Engine(configs)
        instrument(engine, spent)
        torch_pool.distances = timed(spent, "distances", distances)
        torch_pool.combine = timed(spent, "combine", combine)
        try:
            c0 = time.process_time()
            for i in range(1, args.rounds + 1):
                engine.step(i)
            total = time.process_time() - c0
        finally:
            torch_pool.distances, torch_pool.combine = distances, combine
        rest = total - sum(spent.values())
        cells = [spent[p] for p in PARTS] + [rest, total]
        print(f"{rule:>14} " + " ".join(f"{1e3 * v / args.rounds:9.2f}" for v in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
