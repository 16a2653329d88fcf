"""The local backend at scale: 100 agents, 500 rounds, real daemons on loopback, one rule.

Measures wall time, rounds/s, model fetches/s and the peak total RSS of every agent process, and
in the same run a bare gRPC micro-benchmark (small unary calls between two processes) as the
reference for what this machine's Python gRPC can do.

    python benchmarks/bench_local.py [--topology examples/target-localization-20.yaml]
        [--rounds 500] [--rule loss-filtered] [--processes 4]

Writes benchmarks/results/local.json. Figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent

_ECHO_SERVER = textwrap.dedent(
    """
    import sys, time, grpc
    from concurrent import futures
    def echo(request, context):
        return request
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    """
)


def bare_grpc_calls_per_second(seconds: float = 5.0) -> float:
    """Small unary calls/s from this process to a bare gRPC server in another process."""
    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            payload = b"x" * 64
            for _ in range(200):  # warm up
                call(payload, timeout=5)
            n = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                call(payload, timeout=5)
                n += 1
            return n / (time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait()


class RssSampler(threading.Thread):
    """Peak of the summed RSS of this process's descendants (the agent processes)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.processes_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            total = 0
            children = me.children(recursive=True)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
            self.processes_peak = max(self.processes_peak, len(children))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topology", default=str(ROOT / "examples/target-localization-20.yaml"))
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--rule", default="loss-filtered")
    parser.add_argument("--processes", type=int, default=None)
    args = parser.parse_args()

    from orchestrator.cli import load_plan
    from orchestrator.runner import run_plan

    bare = bare_grpc_calls_per_second()
    print(f"bare gRPC unary calls across processes: {bare:,.0f}/s")

    plan = load_plan(Path(args.topology), None, args.rounds, [args.rule])
    fetchers = [a for a in plan.agents if a.role == "byzantine" or args.rule != "none"]
    fetches = sum(len(a.neighbors) for a in fetchers) * plan.rounds
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        options = {"processes": args.processes} if args.processes else None
        run_plan(plan, backend="local", out=Path(tmp) / "run", show_progress=False, backend_options=options)
        wall = time.perf_counter() - start
    sampler.stop()

    result = {
        "topology": Path(args.topology).name,
        "agents": len(plan.agents),
        "rounds": plan.rounds,
        "rule": args.rule,
        "processes": sampler.processes_peak,
        "wall_seconds": round(wall, 2),
        "rounds_per_second": round(plan.rounds / wall, 2),
        "fetches": fetches,
        "fetches_per_second": round(fetches / wall, 1),
        "bare_grpc_calls_per_second": round(bare, 1),
        "fetch_rate_vs_bare": round(fetches / wall / bare, 3),
        "peak_total_rss_mb": round(sampler.peak / 2**20, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "local.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
