"""The local backend at scale: 100 agents, 500 rounds, real daemons on loopback, one rule.

Measures wall time, rounds/s, model fetches/s and the peak total RSS of every agent process, and
in the same run a bare gRPC micro-benchmark (small unary calls between two processes) as the
reference for what this machine's Python gRPC can do. Agents talk mutual TLS, as every run does
by default (a CA made for the run), and the bare pair then talks mutual TLS too (certificates of
the same CA; a new connection is not made per call in either); ``--insecure`` measures both
in plaintext. The bare pair is measured both ways regardless, for the record.

    python benchmarks/bench_local.py [--topology examples/target-localization-20.yaml]
        [--rounds 500] [--rule loss-filtered] [--processes 4] [--insecure]

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
    if len(sys.argv) > 1:  # ca, cert, key: mutual TLS
        ca, cert, key = (open(p, "rb").read() for p in sys.argv[1:4])
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    """
)


def bare_grpc_calls_per_second(seconds: float = 5.0, certs: Path | None = None) -> float:
    """Small unary calls/s from this process to a bare gRPC server in another process; with
    ``certs`` (a directory of mtl-orchestrate certs) over mutual TLS as agent a0 -> agent a1."""
    server_args = [str(certs / n) for n in ("ca.pem", "a1.pem", "a1.key")] if certs else []
    server = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER, *server_args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        if certs is None:
            channel_ = grpc.insecure_channel(f"127.0.0.1:{port}")
        else:
            creds = grpc.ssl_channel_credentials(
                *((certs / n).read_bytes() for n in ("ca.pem", "a0.key", "a0.pem"))
            )
            target = [("grpc.ssl_target_name_override", "a1.agent.resilient-mtl")]
            channel_ = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=target)
        with channel_ as channel:
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
    parser.add_argument("--insecure", action="store_true", help="agents and bare pair in plaintext")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/local.json")
    args = parser.parse_args()

    from orchestrator.cli import load_plan
    from orchestrator.runner import run_plan
    from orchestrator.tls import run_certs

    load_before = os.getloadavg()
    plan = load_plan(Path(args.topology), None, args.rounds, [args.rule])
    fetchers = [a for a in plan.agents if a.role == "byzantine" or args.rule != "none"]
    fetches = sum(len(a.neighbors) for a in fetchers) * plan.rounds
    with tempfile.TemporaryDirectory() as tmp:
        certs = run_certs(Path(tmp), [a.id for a in plan.agents] + ["a0", "a1"], None, None)
        bare_plain = bare_grpc_calls_per_second()
        bare_tls = bare_grpc_calls_per_second(certs=certs.directory)
        print(
            f"bare gRPC unary calls across processes: {bare_plain:,.0f}/s plaintext, {bare_tls:,.0f}/s mTLS"
        )
        bare = bare_plain if args.insecure else bare_tls
        sampler = RssSampler()
        sampler.start()
        start = time.perf_counter()
        options = {"processes": args.processes} if args.processes else None
        run_plan(
            plan,
            backend="local",
            out=Path(tmp) / "run",
            show_progress=False,
            backend_options=options,
            certs=None if args.insecure else certs,
            insecure=args.insecure,
        )
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
        "tls": not args.insecure,
        "bare_grpc_calls_per_second": round(bare, 1),
        "bare_grpc_plaintext_calls_per_second": round(bare_plain, 1),
        "bare_grpc_tls_calls_per_second": round(bare_tls, 1),
        "fetch_rate_vs_bare": round(fetches / wall / bare, 3),
        "peak_total_rss_mb": round(sampler.peak / 2**20, 1),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/bench_local.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
