"""The HAR example (examples/har-10byz.yaml, all its rules) on the two in-process engines.

For each rule of the example: the per-agent engine (mtl_node.engine.run_agents, one asyncio Agent
per agent, the oracle) and the torch batched engine (mtl_node.batched.torch_engine, every agent as
one row of stacked tensors), from the same NodeConfigs the sim backend builds, timed in the same run
(interleaved, per rule). Before a time is reported the two runs' last-round metrics and per-round
accepted/filtered counts are checked to agree (metrics within 1e-4 relative after many float32
rounds; tests/unit/test_torch_batched.py checks 1e-5 on short runs).

    python benchmarks/bench_torch_engine.py [--rounds 300] [--threads N] [--spec examples/har-10byz.yaml]

``--rounds`` runs the first N rounds of the example (the full example has 300). Prints a table with
the load average before and after, and writes benchmarks/results/torch_engine.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from mtl_node.batched import torch_engine  # noqa: E402
from mtl_node.engine import run_agents  # noqa: E402
from orchestrator.backends.sim import plan_configs  # noqa: E402
from orchestrator.planner import plan_topology  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "torch_engine.json"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def agree(fast: dict[str, Any], oracle: dict[str, Any]) -> tuple[int, float]:
    """(rounds whose accepted/filtered counts differ, max relative difference of last-round metrics)."""
    differ = 0
    worst = 0.0
    for agent, want in oracle.items():
        got = fast[agent]
        pairs = zip(got, want, strict=True)
        differ += sum((g.accepted, g.filtered) != (w.accepted, w.filtered) for g, w in pairs)
        for f in ("loss", "test_loss", "test_accuracy"):
            a, b = getattr(got[-1].metrics, f), getattr(want[-1].metrics, f)
            if a is not None and b is not None and math.isfinite(b):
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return differ, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "har-10byz.yaml")
    ap.add_argument("--rounds", type=int, default=None, help="first N rounds (default: the example's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = yaml.safe_load(args.spec.read_text())
    if args.rounds is not None:
        data["rounds"] = args.rounds
    plan = plan_topology(parse_spec(data))
    before = loadavg()
    rows = []
    for rule in plan.rules:
        configs = plan_configs(plan, rule)
        reason = torch_engine.unsupported_reason(configs)
        if reason is not None:
            print(f"{rule}: not batched ({reason})")
            continue
        t0 = time.perf_counter()
        fast = torch_engine.run_torch_batched(configs)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        oracle = {a: r.records for a, r in run_agents(configs).items()}
        t_oracle = time.perf_counter() - t0
        differ, worst = agree(fast, oracle)
        rows.append(
            {
                "rule": rule,
                "per_agent_s": t_oracle,
                "batched_s": t_fast,
                "speedup": t_oracle / t_fast,
                "rounds_with_different_counts": differ,
                "max_rel_diff_last_round_metrics": worst,
            }
        )
        print(
            f"{rule:>14}: per-agent {t_oracle:7.2f} s  batched {t_fast:6.2f} s  "
            f"x{t_oracle / t_fast:5.1f}  (count mismatches {differ}, max rel diff {worst:.1e})",
            flush=True,
        )
    after = loadavg()
    total_o = sum(r["per_agent_s"] for r in rows)
    total_b = sum(r["batched_s"] for r in rows)
    speedup = total_o / total_b
    print(f"{'all rules':>14}: per-agent {total_o:7.2f} s  batched {total_b:6.2f} s  x{speedup:5.1f}")
    print(f"load average before {before}, after {after}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "spec": str(args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec),
                "rounds": plan.rounds,
                "agents": len(plan.agents),
                "rules": rows,
                "total": {"per_agent_s": total_o, "batched_s": total_b, "speedup": total_o / total_b},
                "loadavg_before": before,
                "loadavg_after": after,
                "torch_threads": torch.get_num_threads(),
                "machine": describe(),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
