"""Model fetch over gRPC on loopback against a raw TCP transfer of the same bytes.

For each model size (float32 parameters; default 1M, 10M, 50M) and in one run:

  grpc  a real agent server (mtl_node.agent.Agent + mtl_node.server.create_server: ModelStore, cached
        safetensors payload, ~1 MiB server-streaming chunks) in its own process, fetched from a
        second process with mtl_node.client.fetch_payload, the path a daemon's neighbour fetch takes
        (header check, size bound, chunk assembly, sha256 digest check). GetInfo gives the client
        the manifest, as a daemon knows it from its own model. The first fetch (which also makes the
        server encode and hash the payload once, cached per round) is a warm-up and not timed.
  tcp   the same number of bytes between two processes over a plain TCP socket on 127.0.0.1: the
        server sendall()s a prepared bytes object, the client recv_into()s a preallocated buffer.

Reported per size: GB/s (best and median of ``--repeat`` timed transfers; 1 GB = 1e9 bytes), the
ratio grpc/tcp, the time wire.decode takes on top (not part of the ratio), and the peak RSS
(ru_maxrss) of each of the four processes, plus how much of it came after start-up.

    python benchmarks/bench_fetch.py [--sizes 1000000,10000000,50000000] [--repeat 5]

Prints a table and writes benchmarks/results/fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "fetch.json"
GOAL = 0.55  # the target for grpc / raw TCP


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- gRPC: a real agent server and the real client path --------------------------------------------


def serve_grpc(params: int) -> None:
    """Serve an Agent whose published model is ``params`` float32 values until stdin closes."""
    import torch
    from pydantic import BaseModel

    from mtl_node.agent import Agent
    from mtl_node.config import NodeConfig
    from mtl_node.server import create_server, set_serving, stop_server
    from mtl_node.tasks import Metrics, Task, TaskContext
    from mtl_node.transport import InMemoryTransport
    from mtl_node.wire import StateDict

    class NoParams(BaseModel):
        pass

    class BigModel(Task):
        """A model of the wanted size; the rounds are never run, only round 0 is served."""

        name = "bench-big-model"
        Params = NoParams

        def init_model(self) -> StateDict:
            gen = torch.Generator().manual_seed(0)
            return {"w": torch.rand(params, generator=gen, dtype=torch.float32)}

        def adapt(self, model: StateDict, round_: int) -> StateDict:
            return model

        def losses(self, models: Any, round_: int) -> list[float]:
            return [0.0 for _ in models]

        def evaluate(self, model: StateDict, round_: int) -> Metrics:
            return Metrics(loss=0.0)

    async def main() -> None:
        startup_rss = max_rss_bytes()
        config = NodeConfig(id="bench-server", rule="none", rounds=0)
        task = BigModel(TaskContext("bench-server", 0, torch.device("cpu")), NoParams())
        agent = Agent(config, InMemoryTransport({}), task=task)
        server, port, health = await create_server(agent, "127.0.0.1:0")
        await set_serving(health, True)
        emit(port=port, startup_rss=startup_rss)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        emit(peak_rss=max_rss_bytes())
        await stop_server(server, grace=0.1)

    asyncio.run(main())


def fetch_grpc(port: int, repeat: int) -> None:
    from mtl_node import messages, wire
    from mtl_node.channel import create_channel
    from mtl_node.client import ModelStub, fetch_payload
    from mtl_node.proto.v1 import node_pb2 as pb
    from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

    async def main() -> None:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NodeStub(channel)
            models = ModelStub(channel)  # what GrpcTransport fetches with
            info = await stub.GetInfo(pb.GetInfoRequest(), timeout=60, wait_for_ready=True)
            manifest = messages.manifest_from_pb(info.manifest)
            startup_rss = max_rss_bytes()
            seconds = []
            payload = bytearray()
            for attempt in range(repeat + 1):
                payload = bytearray()  # let the previous payload go before the next one arrives
                started = time.perf_counter()
                header, payload = await fetch_payload(models, 0, "bench-client", 120.0, manifest)
                if attempt:  # the first fetch is the warm-up
                    seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            wire.decode(payload, manifest)
            decode_s = time.perf_counter() - started
            emit(
                bytes=len(payload),
                digest=header.digest,
                seconds=seconds,
                decode_s=decode_s,
                startup_rss=startup_rss,
                peak_rss=max_rss_bytes(),
            )

    asyncio.run(main())


# -- raw TCP: the same bytes with nothing on top ---------------------------------------------------


def serve_tcp(nbytes: int) -> None:
    """Send ``nbytes`` on every one-byte request of one client, until it hangs up."""
    startup_rss = max_rss_bytes()
    payload = os.urandom(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        emit(port=listener.getsockname()[1], startup_rss=startup_rss)
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1):
                conn.sendall(payload)
    emit(peak_rss=max_rss_bytes())


def fetch_tcp(port: int, nbytes: int, repeat: int) -> None:
    startup_rss = max_rss_bytes()
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    seconds = []
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        for attempt in range(repeat + 1):
            started = time.perf_counter()
            conn.sendall(b"g")
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"server closed after {got} of {nbytes} bytes")
                got += n
            if attempt:
                seconds.append(time.perf_counter() - started)
    emit(bytes=nbytes, seconds=seconds, startup_rss=startup_rss, peak_rss=max_rss_bytes())


# -- the driver ------------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"{proc.args} exited with {proc.returncode} before reporting")
    return dict(json.loads(line))


def _run_client(*args: str) -> dict[str, Any]:
    proc = _spawn(*args)
    try:
        result = _read(proc)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode:
        raise RuntimeError(f"client {args} failed with {proc.returncode}")
    return result


def _stop_server(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        result = _read(proc)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return result


def measure(params: int, repeat: int) -> dict[str, Any]:
    server = _spawn("_serve-grpc", str(params))
    try:
        ready = _read(server)
        client = _run_client("_fetch-grpc", str(ready["port"]), str(repeat))
    finally:
        stopped = _stop_server(server)
    grpc_row = _summary(client["bytes"], client["seconds"])
    grpc_row |= {
        "decode_s": client["decode_s"],
        "client_peak_rss": client["peak_rss"],
        "client_rss_after_startup": client["peak_rss"] - client["startup_rss"],
        "server_peak_rss": stopped["peak_rss"],
        "server_rss_after_startup": stopped["peak_rss"] - ready["startup_rss"],
    }

    nbytes = client["bytes"]
    server = _spawn("_serve-tcp", str(nbytes))
    try:
        ready = _read(server)
        client = _run_client("_fetch-tcp", str(ready["port"]), str(nbytes), str(repeat))
    finally:
        stopped = _stop_server(server)
    tcp_row = _summary(nbytes, client["seconds"])
    tcp_row |= {
        "client_peak_rss": client["peak_rss"],
        "client_rss_after_startup": client["peak_rss"] - client["startup_rss"],
        "server_peak_rss": stopped["peak_rss"],
        "server_rss_after_startup": stopped["peak_rss"] - ready["startup_rss"],
    }
    return {
        "params": params,
        "payload_bytes": nbytes,
        "grpc": grpc_row,
        "tcp": tcp_row,
        "ratio_best": grpc_row["gbps_best"] / tcp_row["gbps_best"],
        "ratio_median": grpc_row["gbps_median"] / tcp_row["gbps_median"],
    }


def _summary(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "gbps_best": nbytes / min(seconds) / 1e9,
        "gbps_median": nbytes / statistics.median(seconds) / 1e9,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000,50000000", help="float32 parameter counts")
    ap.add_argument("--repeat", type=int, default=5, help="timed transfers per size and method")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    from benchmarks.machine import describe

    rows = [measure(params, args.repeat) for params in sizes]
    result = {
        "benchmark": "fetch",
        "command": "python benchmarks/bench_fetch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(),
        "repeat": args.repeat,
        "goal_ratio": GOAL,
        "sizes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"best (median) of {args.repeat} transfers; GB/s = 1e9 bytes/s; RSS in MiB: peak (after start-up)")
    head = f"{'params':>10} {'MiB':>5} {'grpc GB/s':>15} {'tcp GB/s':>15} {'grpc/tcp':>13} {'decode s':>9}"
    print(head + f" {'grpc client':>13} {'grpc server':>13} {'tcp client':>12} {'tcp server':>12}")
    for r in rows:
        g, t = r["grpc"], r["tcp"]
        print(
            f"{r['params']:>10} {_mib(r['payload_bytes']):>5}"
            f" {g['gbps_best']:>6.2f} ({g['gbps_median']:>5.2f})"
            f" {t['gbps_best']:>6.2f} ({t['gbps_median']:>5.2f})"
            f" {r['ratio_best']:>5.0%} ({r['ratio_median']:>4.0%})"
            f" {g['decode_s']:>9.3f}"
            + "".join(
                f" {_mib(row['peak_rss']):>6} ({_mib(row['after']):>4})"
                for row in (
                    {"peak_rss": g["client_peak_rss"], "after": g["client_rss_after_startup"]},
                    {"peak_rss": g["server_peak_rss"], "after": g["server_rss_after_startup"]},
                    {"peak_rss": t["client_peak_rss"], "after": t["client_rss_after_startup"]},
                    {"peak_rss": t["server_peak_rss"], "after": t["server_rss_after_startup"]},
                )
            )
        )
    worst = min(r["ratio_best"] for r in rows)
    print(f"goal grpc/tcp >= {GOAL:.0%}: {'met' if worst >= GOAL else 'NOT met'} (worst size {worst:.0%})")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "_serve-grpc":
            serve_grpc(int(rest[0]))
        elif role == "_fetch-grpc":
            fetch_grpc(int(rest[0]), int(rest[1]))
        elif role == "_serve-tcp":
            serve_tcp(int(rest[0]))
        elif role == "_fetch-tcp":
            fetch_tcp(int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            sys.exit(f"unknown role {role}")
        raise SystemExit(0)
    raise SystemExit(main())
