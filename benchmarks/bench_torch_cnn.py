"""The digits CNN on the torch batched engine: where a convolutional model's time goes, and CPU time.

Two measurements (docs/performance.md, "digits and custom tasks on the torch batched engine"):

- ``layouts``: process CPU time of scoring the paper's CNN (mtl_node.tasks.digits.PaperCNN) on 32
  images for each of 10 receivers x 10 models, the ways an engine can: vmapped over (rows, slots)
  (grouped convolutions), 100 separate calls, 10 calls of 320 images (one per model), each of the
  last two also with channels-last weights, and each model on the receivers' stacked batches in
  calls of ``CALL_SAMPLES`` images with channels-last weights (what mtl_node/batched/torch_model.py
  does);
- ``engines``: each rule of a spec (default examples/digits-2byz.yaml, first ``--rounds`` rounds) on
  the per-agent engine and the torch batched engine in this process, wall and process CPU time (the
  per-agent engine runs an agent's CNN calls in worker threads, so CPU time is the fairer measure on a
  shared machine), tasks built once before timing so data rendering is cached for both; and how
  far apart the two engines' metrics are each round, and whether their decision counts differ.

    python benchmarks/bench_torch_cnn.py [--rounds 10] [--threads 1] [--spec examples/digits-2byz.yaml]

Prints the load average before and after; writes benchmarks/results/torch_cnn.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.func import functional_call, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtl_node.batched import torch_engine  # noqa: E402
from mtl_node.batched.torch_model import CALL_SAMPLES  # noqa: E402
from mtl_node.engine import run_agents  # noqa: E402
from mtl_node.tasks import make_task  # noqa: E402
from mtl_node.tasks.digits import PaperCNN  # noqa: E402
from orchestrator.backends.sim import plan_configs  # noqa: E402
from orchestrator.planner import plan_topology  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "torch_cnn.json"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Mean process CPU seconds of ``fn`` after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def layouts() -> dict[str, float]:
    module = PaperCNN().eval()
    rows, slots, batch = 10, 10, 32
    gen = torch.Generator().manual_seed(0)
    base = {n: p.detach() for n, p in module.named_parameters()}
    stacked = {
        n: torch.stack([p + 0.01 * torch.randn(p.shape, generator=gen) for _ in range(rows * slots)])
        for n, p in base.items()
    }
    x = torch.rand(rows, batch, 28, 28, generator=gen)
    y = torch.randint(0, 10, (rows, batch), generator=gen)

    def loss_of(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, p, (xs,)), ys)

    def model(j: int, channels_last: bool = False) -> dict[str, torch.Tensor]:
        p = {n: t[j] for n, t in stacked.items()}
        if channels_last:
            p = {
                n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                for n, t in p.items()
            }
        return p

    def per_model(channels_last: bool, per_call: int = rows) -> None:
        for s in range(slots):
            p = model(s, channels_last)
            for r in range(0, rows, per_call):
                xs, ys = x[r : r + per_call], y[r : r + per_call]
                out = functional_call(module, p, (xs.flatten(0, 1),))
                vmap(F.cross_entropy)(out.unflatten(0, xs.shape[:2]), ys)

    grid = {n: t.view(rows, slots, *t.shape[1:]) for n, t in stacked.items()}
    with torch.no_grad():
        return {
            "vmap over rows and slots": cpu(
                lambda: vmap(vmap(loss_of, in_dims=(0, None, None)))(grid, x, y), 1
            ),
            "100 calls of 32 images": cpu(
                lambda: [loss_of(model(r * slots + s), x[r], y[r]) for r in range(rows) for s in range(slots)]
            ),
            "100 calls of 32 images, channels-last": cpu(
                lambda: [
                    loss_of(model(r * slots + s, True), x[r], y[r]) for r in range(rows) for s in range(slots)
                ]
            ),
            "10 calls of 320 images": cpu(lambda: per_model(False)),
            "10 calls of 320 images, channels-last": cpu(lambda: per_model(True)),
            "10 models in calls of 128 images, channels-last": cpu(
                lambda: per_model(True, CALL_SAMPLES // batch)
            ),
        }


def drift(fast: dict[str, Any], oracle: dict[str, Any]) -> tuple[list[float], int]:
    """(per round: max relative difference of loss/test_loss over agents, rounds x agents whose
    accepted/filtered/missing counts differ)."""
    rounds = len(next(iter(oracle.values())))
    worst = [0.0] * rounds
    mismatches = 0
    for agent, want in oracle.items():
        for i, (g, w) in enumerate(zip(fast[agent], want, strict=True)):
            mismatches += (g.accepted, g.filtered, g.missing) != (w.accepted, w.filtered, w.missing)
            for f in ("loss", "test_loss"):
                a, b = getattr(g.metrics, f), getattr(w.metrics, f)
                if a is not None and b is not None and math.isfinite(b):
                    worst[i] = max(worst[i], abs(a - b) / max(abs(b), 1e-12))
    return worst, mismatches


def engines(spec: Path, rounds: int, threads: int) -> list[dict[str, Any]]:
    data = yaml.safe_load(spec.read_text())
    data["rounds"] = rounds
    plan = plan_topology(parse_spec(data))
    for c in plan_configs(plan, plan.rules[0]):  # data rendering cached for both engines
        make_task(c.task, c.id, c.seed, c.task_params, c.device)
    rows = []
    for rule in plan.rules:
        configs = plan_configs(plan, rule)
        reason = torch_engine.unsupported_reason(configs)
        if reason is not None:
            print(f"{rule}: not batched: {reason}")
            continue
        row: dict[str, Any] = {"rule": rule}
        wall, proc = time.perf_counter(), time.process_time()
        oracle = {a: r.records for a, r in run_agents(configs).items()}
        row["per_agent_wall_s"] = round(time.perf_counter() - wall, 2)
        row["per_agent_cpu_s"] = round(time.process_time() - proc, 2)
        wall, proc = time.perf_counter(), time.process_time()
        fast = torch_engine.run_torch_batched(configs, threads=threads)
        row["batched_wall_s"] = round(time.perf_counter() - wall, 2)
        row["batched_cpu_s"] = round(time.process_time() - proc, 2)
        row["cpu_ratio"] = round(row["per_agent_cpu_s"] / row["batched_cpu_s"], 2)
        row["drift"], row["count_mismatches"] = drift(fast, oracle)
        print(
            f"{rule:>14}: per-agent {row['per_agent_wall_s']:6.2f} s wall {row['per_agent_cpu_s']:6.2f} s CPU"
            f" | batched {row['batched_wall_s']:6.2f} s wall {row['batched_cpu_s']:6.2f} s CPU"
            f" | CPU x {row['cpu_ratio']:.1f} | count mismatches {row['count_mismatches']}"
            f" | max rel. diff per round {' '.join(f'{d:.1e}' for d in row['drift'])}",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "examples" / "digits-2byz.yaml")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both engines")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = loadavg()
    print(f"load average before: {before}", flush=True)
    lay = layouts()
    for name, seconds in lay.items():
        print(f"{name:>40}: {seconds:.3f} s CPU", flush=True)
    rows = engines(args.spec, args.rounds, args.threads)
    after = loadavg()
    print(f"load average after: {after}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"spec": str(args.spec), "rounds": args.rounds, "threads": args.threads, "layouts_cpu_s": lay}
    result |= {"engines": rows, "load_before": before, "load_after": after}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
