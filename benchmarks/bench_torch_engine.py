"""The HAR and digits examples, every rule, on the two in-process engines, timed in the same run.

For each example (examples/har-10byz.yaml, examples/digits-2byz.yaml) and each of its rules: the
per-agent engine (mtl_node.engine.run_agents, one asyncio Agent per agent, the oracle) and the torch
batched engine (mtl_node.batched.torch_engine, every agent as one row of stacked tensors), from the
same NodeConfigs the sim backend builds, one after the other in this process. Before a time is
reported the two runs' per-round accepted/filtered/missing counts and last-round metrics are checked
to agree (metrics within 1e-4 relative after many float32 rounds; tests/unit/test_torch_batched.py
checks 1e-5 on short runs). An example the batched engine cannot run (it says why) is timed on the
per-agent engine only: that is what the sim backend falls back to.

Fair by construction: both engines run with the same torch thread count (``--threads``, default 1,
the batched engine's own setting; see docs/performance.md "Threads"), both include their setup
(tasks, and drawing the data: the per-process cache of HAR subjects is emptied before each run),
both start warm (a 2-round run of each, untimed, before the first rule), and neither writes files.
Wall and CPU seconds are both reported: on a machine shared with other work the CPU time of this
process is the steadier figure. The batched engine builds each round's decision rows only when they
are read (the per-agent engine builds them every round); the time to read all of them is reported
next to it ("+decisions").

    python benchmarks/bench_torch_engine.py [--rounds 300] [--digits-rounds 300] [--threads 1]
        [--only har|digits] [--rules none,average] [--spec other.yaml]
    python benchmarks/bench_torch_engine.py --thread-counts 1,2 [--rounds 30] [--rules loss-filtered]

Prints a table with the load average before and after, and writes benchmarks/results/torch_engine.json.
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
from mtl_node.data import har_synthetic  # noqa: E402
from mtl_node.engine import run_agents  # noqa: E402
from orchestrator.backends.sim import plan_configs  # noqa: E402
from orchestrator.planner import plan_topology  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "torch_engine.json"
EXAMPLES = {"har": ROOT / "examples" / "har-10byz.yaml", "digits": ROOT / "examples" / "digits-2byz.yaml"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def agree(fast: dict[str, Any], oracle: dict[str, Any]) -> tuple[int, float]:
    """(rounds whose accepted/filtered/missing counts differ, max relative difference of last-round
    metrics)."""
    differ = 0
    worst = 0.0
    for agent, want in oracle.items():
        got = fast[agent]
        pairs = zip(got, want, strict=True)
        differ += sum(
            (g.accepted, g.filtered, g.missing) != (w.accepted, w.filtered, w.missing) for g, w in pairs
        )
        for f in ("loss", "test_loss", "test_accuracy", "attack_success"):
            a, b = getattr(got[-1].metrics, f), getattr(want[-1].metrics, f)
            if a is not None and b is not None and math.isfinite(b):
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return differ, worst


def cold() -> None:
    """Forget the HAR subjects drawn so far: each engine's run draws its data, as one rule's run
    does (a sim run of several rules draws them once, for its first rule)."""
    har_synthetic._generate.cache_clear()


def per_agent(configs: list[Any]) -> tuple[dict[str, Any], float, float]:
    """(records, wall s, CPU s) of the per-agent engine."""
    cold()
    c0, t0 = time.process_time(), time.perf_counter()
    out = {a: r.records for a, r in run_agents(configs).items()}
    return out, time.perf_counter() - t0, time.process_time() - c0


def compare(configs: list[Any], threads: int) -> dict[str, Any]:
    """Time both engines on one rule's configs and check that they agree."""
    cold()
    c0, t0 = time.process_time(), time.perf_counter()
    fast = torch_engine.run_torch_batched(configs, threads=threads)
    c1, t1 = time.process_time(), time.perf_counter()
    for recs in fast.values():
        for r in recs:
            tuple(r.decisions)
    t2 = time.perf_counter()
    oracle, slow, slow_cpu = per_agent(configs)
    differ, worst = agree(fast, oracle)
    return {
        "per_agent_s": slow,
        "batched_s": t1 - t0,
        "decisions_s": t2 - t1,
        "per_agent_cpu_s": slow_cpu,
        "batched_cpu_s": c1 - c0,
        "speedup": slow / (t1 - t0),
        "speedup_with_decisions": slow / (t2 - t0),
        "speedup_cpu": slow_cpu / (c1 - c0),
        "rounds_with_different_counts": differ,
        "max_rel_diff_last_round_metrics": worst,
    }


def line(name: str, rule: str, r: dict[str, Any]) -> str:
    return (
        f"{name:>6} {rule:>14}: per-agent {r['per_agent_s']:7.2f} s  batched {r['batched_s']:6.2f} s"
        f" (+decisions {r['decisions_s']:5.2f} s)  x{r['speedup']:5.1f} (x{r['speedup_with_decisions']:5.1f})"
        f"  CPU s {r['per_agent_cpu_s']:7.2f} / {r['batched_cpu_s']:6.2f} x{r['speedup_cpu']:5.1f}"
    )


def bench(name: str, spec: Path, rounds: int | None, rules: list[str] | None, threads: int) -> dict[str, Any]:
    data = yaml.safe_load(spec.read_text())
    if rounds is not None:
        data["rounds"] = rounds
    plan = plan_topology(parse_spec(data))
    rows = []
    warm = False
    for rule in plan.rules:
        if rules and rule not in rules:
            continue
        configs = plan_configs(plan, rule)
        if not warm:  # first calls into torch (lazy initialisation) for neither engine's timed run
            short = [c.model_copy(update={"rounds": 2}) for c in configs]
            run_agents(short)
            if torch_engine.unsupported_reason(short) is None:
                torch_engine.run_torch_batched(short, threads=threads)
            warm = True
        reason = torch_engine.unsupported_reason(configs)
        row: dict[str, Any] = {"rule": rule, "batched": reason is None}
        if reason is not None:
            _, row["per_agent_s"], row["per_agent_cpu_s"] = per_agent(configs)
            row["fallback"] = reason
            print(f"{name:>6} {rule:>14}: per-agent {row['per_agent_s']:7.2f} s  not batched: {reason}")
        else:
            row |= compare(configs, threads)
            print(
                line(name, rule, row) + f"  count mismatches {row['rounds_with_different_counts']},"
                f" max rel diff {row['max_rel_diff_last_round_metrics']:.1e}",
                flush=True,
            )
        rows.append(row)
    batched = [r for r in rows if r["batched"]]
    total: dict[str, Any] = {"per_agent_s": sum(r["per_agent_s"] for r in rows)}
    if batched:
        slow = sum(r["per_agent_s"] for r in batched)
        fast_s = sum(r["batched_s"] for r in batched)
        reading = sum(r["decisions_s"] for r in batched)
        slow_cpu = sum(r["per_agent_cpu_s"] for r in batched)
        fast_cpu = sum(r["batched_cpu_s"] for r in batched)
        total |= {
            "batched_s": fast_s,
            "decisions_s": reading,
            "speedup": slow / fast_s,
            "speedup_with_decisions": slow / (fast_s + reading),
            "per_agent_cpu_s": slow_cpu,
            "batched_cpu_s": fast_cpu,
            "speedup_cpu": slow_cpu / fast_cpu,
        }
        print(line(name, "all batched", {**total, "per_agent_s": slow, "per_agent_cpu_s": slow_cpu}))
    return {
        "spec": str(spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec),
        "rounds": plan.rounds,
        "agents": len(plan.agents),
        "rules": rows,
        "total": total,
    }


def thread_counts(spec: Path, rounds: int | None, rule: str, counts: list[int]) -> list[dict[str, Any]]:
    """The batched engine alone on one rule with each torch thread count, alternating, twice."""
    data = yaml.safe_load(spec.read_text())
    if rounds is not None:
        data["rounds"] = rounds
    configs = plan_configs(plan_topology(parse_spec(data)), rule)
    torch_engine.run_torch_batched(configs, threads=counts[0])  # warm; the data stay cached
    out = []
    for _ in range(2):
        for n in counts:
            c0, t0 = time.process_time(), time.perf_counter()
            torch_engine.run_torch_batched(configs, threads=n)
            row = {"threads": n, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            print(
                f"batched {rule}, {n} torch threads: wall {row['wall_s']:6.2f} s  CPU {row['cpu_s']:6.2f} s"
            )
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="HAR: first N rounds (default: the example's)")
    ap.add_argument(
        "--digits-rounds", type=int, default=None, help="digits: first N rounds (default: the example's)"
    )
    ap.add_argument(
        "--threads", type=int, default=torch_engine.THREADS, help="torch threads for both engines"
    )
    ap.add_argument("--only", choices=sorted(EXAMPLES), default=None, help="one example only")
    ap.add_argument("--spec", type=Path, default=None, help="this topology file instead of the examples")
    ap.add_argument("--rules", default=None, help="comma-separated subset of the examples' rules")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--thread-counts",
        default=None,
        help="instead: the batched engine alone on HAR's first rule (or --rules) with these torch "
        "thread counts, e.g. 1,2",
    )
    args = ap.parse_args(argv)
    if args.thread_counts:
        before = loadavg()
        rule = args.rules.split(",")[0] if args.rules else "loss-filtered"
        rows = thread_counts(
            EXAMPLES["har"], args.rounds, rule, [int(n) for n in args.thread_counts.split(",")]
        )
        print(f"load average before {before}, after {loadavg()}")
        document = {"thread_counts": rows, "rule": rule, "loadavg_before": before, "loadavg_after": loadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("torch_engine_threads.json").write_text(json.dumps(document, indent=2) + "\n")
        return 0
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",") if args.rules else None
    rounds = {"har": args.rounds, "digits": args.digits_rounds}
    before = loadavg()
    results = {}
    if args.spec is not None:
        results[args.spec.stem] = bench(args.spec.stem[:6], args.spec, args.rounds, rules, args.threads)
    for name, spec in EXAMPLES.items() if args.spec is None else ():
        if args.only in (None, name):
            results[name] = bench(name, spec, rounds[name], rules, args.threads)
    after = loadavg()
    print(f"load average before {before}, after {after}; torch threads {args.threads}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "examples": results,
        "loadavg_before": before,
        "loadavg_after": after,
        "torch_threads": args.threads,
        "machine": describe(),
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
