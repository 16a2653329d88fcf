"""Cost of the per-round crash-only state write (mtl_node/state.py), per task.

For each case, ``--agents`` agents on a complete graph run ``--rounds`` rounds in the in-process
engine (the same Agent code as the daemons, models handed over in memory), once with the state
written every round into a temporary directory on the same file system as the repository, and once
without. Reported per case:

  write_ms    mean time of one state write (snapshot + safetensors encode + write + fsync + rename +
              directory fsync), timed around mtl_node.state.write itself;
  state_kb    size of one agent's state file (model, the last keep_rounds published models,
              optimizer moments, rule state);
  round_ms    mean agent round time without state (RoundRecord.seconds: adapt, exchange, score,
              combine, evaluate);
  overhead    write_ms / round_ms.

Cases: target localization (2 parameters), HAR (linear 561x6, SGD), the digits CNN (Adam) and a
10M-parameter MLP (Adam, float32; a task defined here on synthetic data).

    python benchmarks/bench_state.py [--rounds 20] [--agents 4] [--cases tl,har,digits,10m]

The state goes to a temporary directory ($MTL_BENCH_DIR, else the system's temporary directory:
point it at the disk the agents will use; a tmpfs makes fsync free and the figure meaningless).
Prints a table and writes benchmarks/results/state.json (with the machine and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from mtl_node import state as agent_state
from mtl_node.config import build_config
from mtl_node.engine import run_agents_async
from mtl_node.recorder import MemoryRecorder, Recorder
from mtl_node.tasks import TASKS
from mtl_node.tasks.torch_task import Split, TorchTask, TorchTaskParams


class BigParams(TorchTaskParams):
    width: int = Field(2236, description="hidden width: 2 x width^2 ~ 10M parameters")


@TASKS.register("bench-10m", "a 10M-parameter MLP on synthetic data (benchmarks/bench_state.py)")
class BigTask(TorchTask):
    name = "bench-10m"
    Params = BigParams

    def build_module(self) -> nn.Module:
        w = self.params.width  # type: ignore[attr-defined]
        return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w))

    def load_data(self) -> tuple[Split, Split]:
        w = self.params.width  # type: ignore[attr-defined]
        g = torch.Generator().manual_seed(self.ctx.seed)
        x = torch.randn(64, w, generator=g)
        y = torch.randint(0, w, (64,), generator=g)
        return Split(x, y), Split(x[:16], y[:16])


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "tl": ("target-localization", {}),
    "har": ("har", {}),
    "digits": ("digits", {"dataset": "synthetic"}),
    "10m": ("bench-10m", {"batch_size": 16}),
}


def run_case(task: str, params: dict[str, Any], agents: int, rounds: int) -> dict[str, Any]:
    import asyncio

    from mtl_node.engine import IN_PROCESS

    def cfgs(state_dir: Path | None, every: int | None = 1) -> list[Any]:
        ids = [f"a{i}" for i in range(agents)]
        built = []
        for n, agent in enumerate(ids):
            p = dict(params) | ({"subject": n + 1} if task == "har" else {})
            built.append(
                build_config(
                    {
                        "id": agent,
                        "task": task,
                        "task_params": p,
                        "rule": "loss-filtered",
                        "rounds": rounds,
                        "neighbors": {m: IN_PROCESS for m in ids if m != agent},
                        "state_dir": str(state_dir / agent) if state_dir else None,
                        "state_every": every if state_dir else 0,
                    }
                )
            )
        return built

    # Without state: the round time.
    recorders: dict[str, Recorder] = {f"a{i}": MemoryRecorder() for i in range(agents)}
    started = time.perf_counter()
    asyncio.run(run_agents_async(cfgs(None), dict(recorders)))
    wall_without = time.perf_counter() - started
    seconds = [
        r.seconds for rec in recorders.values() for r in rec.records if isinstance(rec, MemoryRecorder)
    ]

    # With state every round: time every write.
    durations: list[float] = []
    write = agent_state.write

    def timed(directory: Path, snap: agent_state.AgentState, agent_id: str) -> None:
        t0 = time.perf_counter()
        write(directory, snap, agent_id)
        durations.append(time.perf_counter() - t0)

    agent_state.write = timed  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("MTL_BENCH_DIR")) as tmp:
            started = time.perf_counter()
            asyncio.run(run_agents_async(cfgs(Path(tmp))))
            wall_with = time.perf_counter() - started
            size = (Path(tmp) / "a0" / agent_state.STATE_FILE).stat().st_size
        per_round = len(durations)
        # The default (state_every unset): how many writes, and the wall time.
        with tempfile.TemporaryDirectory(dir=os.environ.get("MTL_BENCH_DIR")) as tmp:
            started = time.perf_counter()
            asyncio.run(run_agents_async(cfgs(Path(tmp), None)))
            wall_auto = time.perf_counter() - started
        auto_writes = len(durations) - per_round
        durations = durations[:per_round]
    finally:
        agent_state.write = write  # type: ignore[assignment]
    write_ms = 1000 * statistics.mean(durations)
    round_ms = 1000 * statistics.mean(seconds)
    return {
        "task": task,
        "agents": agents,
        "rounds": rounds,
        "writes": len(durations),
        "write_ms": write_ms,
        "write_ms_median": 1000 * statistics.median(durations),
        "state_kb": size / 1024,
        "round_ms": round_ms,
        "overhead_pct": 100 * write_ms / round_ms,
        "wall_s_without": wall_without,
        "wall_s_with": wall_with,
        "auto_writes": auto_writes,
        "wall_s_auto": wall_auto,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "state.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = []
    for case in args.cases.split(","):
        task, params = CASES[case]
        r = run_case(task, params, args.agents, args.rounds)
        r["case"] = case
        results.append(r)
        print(
            f"{case:7} state {r['state_kb']:10.1f} KiB  write {r['write_ms']:8.2f} ms  "
            f"round {r['round_ms']:9.2f} ms  overhead {r['overhead_pct']:6.1f} %  "
            f"wall none/every/auto {r['wall_s_without']:.2f}/{r['wall_s_with']:.2f}/{r['wall_s_auto']:.2f} s "
            f"(auto: {r['auto_writes']} writes)",
            flush=True,
        )
    machine = describe()
    machine["load_average_before"] = load_before
    machine["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "args": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"load average before {load_before}, after {machine['load_average_after']}; -> {args.out}")


if __name__ == "__main__":
    main()
