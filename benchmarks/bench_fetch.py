"""Model fetch over gRPC on loopback, next to a raw TCP transfer of the same bytes.

For each model size (float32 parameters; default 1M, 10M, 50M), in one run, each transfer between
two processes on 127.0.0.1:

  grpc        a real agent server (mtl_node.agent.Agent + mtl_node.server.create_server: ModelStore,
              the safetensors payload encoded and hashed once per round, ~1 MiB chunks) fetched with
              mtl_node.client.fetch_payload through a ModelStub, as GrpcTransport fetches: header and
              size checks, chunk assembly, xxh3-128 digest check (glibc told to keep freed memory,
              as the daemon does: mtl_node/allocator.py). GetInfo gives the client the
              manifest, as a daemon knows it from its own model.
  grpc-tls    the same agent, the same server process and the same client process as grpc, over
              mutual TLS (certificates from mtl_node.identity, the client checking the server's
              identity, the server authorizing the requester): the server listens on a second,
              TLS port and the client alternates plaintext and TLS fetches, so both columns share
              the machine's state at the time. Server CPU of grpc and grpc-tls is their sum,
              halved (one process serves both).
  grpc-plain  the same bytes as 1 MiB messages of a bare gRPC server-streaming method (no protobuf,
              no assembly, no digest: the client only counts them): what Python gRPC itself costs.
  tcp         the goal's baseline: the server sendall()s a prepared bytes object, the client
              recv_into()s one preallocated buffer it reuses for every transfer.
  tcp-fresh   the same into a new buffer per transfer, as any receiver that keeps the bytes must.

Every method makes one untimed warm-up transfer (for grpc it also makes the server encode and hash
the payload once), then ``--repeat`` timed ones; reported are GB/s (best and median; 1 GB = 1e9
bytes), CPU seconds per GB of each side, and the peak RSS (ru_maxrss) of each process with the part
that came after start-up. For grpc also the time wire.decode takes on top (not part of the ratio).
The run also measures, in this process, two costs every fetch pays: sha256 over 1 MiB chunks, and
writing into freshly allocated memory (first-touch page faults).

    python benchmarks/bench_fetch.py [--sizes 1000000,10000000,50000000] [--repeat 5]

Prints a table and writes benchmarks/results/fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
GOAL = 0.55  # the target for grpc / tcp
TLS_GOAL = 0.85  # issue 9: grpc-tls keeps at least this share of grpc's throughput
METHODS = ("grpc", "grpc-tls", "grpc-plain", "tcp", "tcp-fresh")
CHUNK = 1 << 20


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- servers: print {port, startup_rss}; on stdin EOF print {peak_rss, cpu_s} ---------------------


def serve_grpc(params: int, certs: str) -> None:
    """An Agent whose published model is ``params`` float32 values, served on a plaintext port and
    a mutual-TLS port (certificates in ``certs``); only round 0 is ever served."""
    import torch
    from pydantic import BaseModel

    from mtl_node.agent import Agent
    from mtl_node.allocator import keep_freed_memory
    from mtl_node.config import NodeConfig
    from mtl_node.identity import load_material
    from mtl_node.server import create_server, set_serving, stop_server
    from mtl_node.tasks import Metrics, Task, TaskContext
    from mtl_node.transport import InMemoryTransport
    from mtl_node.wire import StateDict

    class NoParams(BaseModel):
        pass

    class BigModel(Task):
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

    keep_freed_memory()  # as mtl_node.daemon.run_daemon does

    async def main() -> None:
        startup_rss = max_rss_bytes()
        config = NodeConfig(id="bench-server", rule="none", rounds=0)
        task = BigModel(TaskContext("bench-server", 0, torch.device("cpu")), NoParams())
        agent = Agent(config, InMemoryTransport({}), task=task)
        d = Path(certs)
        tls = load_material(d / "ca.pem", d / "bench-server.pem", d / "bench-server.key")
        server, port, health = await create_server(agent, "127.0.0.1:0")
        tls_server, tls_port, tls_health = await create_server(agent, "127.0.0.1:0", tls)
        await set_serving(health, True)
        await set_serving(tls_health, True)
        emit(port=port, tls_port=tls_port, startup_rss=startup_rss)
        cpu = cpu_seconds()
        await _until_stdin_closes()
        emit(peak_rss=max_rss_bytes(), cpu_s=cpu_seconds() - cpu)
        await stop_server(server, grace=0.1)
        await stop_server(tls_server, grace=0.1)

    asyncio.run(main())


def serve_plain(nbytes: int) -> None:
    """A bare gRPC server streaming ``nbytes`` as 1 MiB messages (identity serializers)."""
    import grpc

    from mtl_node.channel import SERVER_OPTIONS

    async def main() -> None:
        startup_rss = max_rss_bytes()
        payload = os.urandom(nbytes)

        async def stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            view = memoryview(payload)
            for start in range(0, nbytes, CHUNK):
                yield bytes(view[start : start + CHUNK])

        handler = grpc.method_handlers_generic_handler(
            "bench.Plain", {"Get": grpc.unary_stream_rpc_method_handler(stream)}
        )
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        emit(port=port, startup_rss=startup_rss)
        cpu = cpu_seconds()
        await _until_stdin_closes()
        emit(peak_rss=max_rss_bytes(), cpu_s=cpu_seconds() - cpu)
        await server.stop(0.1)

    asyncio.run(main())


def serve_tcp(nbytes: int) -> None:
    """Send ``nbytes`` on every one-byte request of one client, until it hangs up."""
    startup_rss = max_rss_bytes()
    payload = os.urandom(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        emit(port=listener.getsockname()[1], startup_rss=startup_rss)
        cpu = cpu_seconds()
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1):
                conn.sendall(payload)
    sys.stdin.read()
    emit(peak_rss=max_rss_bytes(), cpu_s=cpu_seconds() - cpu)


# -- clients: print {bytes, seconds, cpu_s, startup_rss, peak_rss, ...} ---------------------------


def fetch_grpc(port: int, tls_port: int, certs: str, repeat: int) -> None:
    """Alternate plaintext and TLS fetches of the same model from the same server process."""
    from mtl_node import messages, wire
    from mtl_node.allocator import keep_freed_memory
    from mtl_node.channel import create_channel
    from mtl_node.client import ModelStub, fetch_payload
    from mtl_node.identity import agent_id, load_material
    from mtl_node.proto.v1 import node_pb2 as pb
    from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

    keep_freed_memory()  # as mtl_node.daemon.run_daemon does
    d = Path(certs)
    tls = load_material(d / "ca.pem", d / "bench-client.pem", d / "bench-client.key")

    async def main() -> None:
        async with (
            create_channel(f"127.0.0.1:{port}", tls=None) as channel,
            create_channel(
                f"127.0.0.1:{tls_port}", tls=tls, expected_identity=agent_id("bench-server")
            ) as tls_channel,
        ):
            info = await pb_grpc.NodeStub(channel).GetInfo(
                pb.GetInfoRequest(), timeout=60, wait_for_ready=True
            )
            manifest = messages.manifest_from_pb(info.manifest)
            stubs = {"grpc": ModelStub(channel), "grpc-tls": ModelStub(tls_channel)}
            startup_rss = max_rss_bytes()
            seconds: dict[str, list[float]] = {m: [] for m in stubs}
            cpu = dict.fromkeys(stubs, 0.0)
            payload = bytearray()
            for attempt in range(repeat + 1):
                for method, models in stubs.items():
                    payload = bytearray()  # the previous model is gone before the next arrives
                    started, cpu_started = time.perf_counter(), cpu_seconds()
                    header, payload = await fetch_payload(models, 0, "bench-client", 120.0, manifest)
                    if attempt:  # the first fetch of each is the warm-up
                        seconds[method].append(time.perf_counter() - started)
                        cpu[method] += cpu_seconds() - cpu_started
            started = time.perf_counter()
            wire.decode(payload, manifest)
            decode_s = time.perf_counter() - started
            emit(
                bytes=len(payload),
                digest=header.digest,
                seconds=seconds,
                cpu_s=cpu,
                decode_s=decode_s,
                startup_rss=startup_rss,
                peak_rss=max_rss_bytes(),
            )

    asyncio.run(main())


def fetch_plain(port: int, repeat: int) -> None:
    from mtl_node.channel import create_channel

    async def main() -> None:
        async with create_channel(f"127.0.0.1:{port}", tls=None) as channel:
            get = channel.unary_stream("/bench.Plain/Get")
            startup_rss = max_rss_bytes()
            seconds, cpu, got = [], 0.0, 0
            for attempt in range(repeat + 1):
                started, cpu_started = time.perf_counter(), cpu_seconds()
                got = 0
                async for message in get(b"", timeout=120, wait_for_ready=True):
                    got += len(message)
                if attempt:
                    seconds.append(time.perf_counter() - started)
                    cpu += cpu_seconds() - cpu_started
            emit(bytes=got, seconds=seconds, cpu_s=cpu, startup_rss=startup_rss, peak_rss=max_rss_bytes())

    asyncio.run(main())


def fetch_tcp(port: int, nbytes: int, repeat: int, fresh: bool) -> None:
    startup_rss = max_rss_bytes()
    buffer = bytearray(nbytes)
    seconds, cpu = [], 0.0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        for attempt in range(repeat + 1):
            started, cpu_started = time.perf_counter(), cpu_seconds()
            if fresh:
                buffer = bytearray()
                buffer = bytearray(nbytes)
            view = memoryview(buffer)
            conn.sendall(b"g")
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"server closed after {got} of {nbytes} bytes")
                got += n
            view.release()
            if attempt:
                seconds.append(time.perf_counter() - started)
                cpu += cpu_seconds() - cpu_started
    emit(bytes=nbytes, seconds=seconds, cpu_s=cpu, startup_rss=startup_rss, peak_rss=max_rss_bytes())


# -- the driver ------------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"{proc.args} exited with {proc.returncode} before reporting")
    return dict(json.loads(line))


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Close the process's stdin, read its last report, wait for it."""
    assert proc.stdin is not None
    try:
        proc.stdin.close()
        result = _read(proc)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"{proc.args} failed with {proc.returncode}")
    return result


def _row(
    client: dict[str, Any], stopped: dict[str, Any], ready: dict[str, Any], repeat: int, seconds: list[float],
    client_cpu: float, server_cpu: float,
) -> dict[str, Any]:  # fmt: skip
    moved = client["bytes"]
    return {
        "bytes": moved,
        "seconds": seconds,
        "gbps_best": moved / min(seconds) / 1e9,
        "gbps_median": moved / statistics.median(seconds) / 1e9,
        "client_cpu_s_per_gb": client_cpu / (moved * repeat / 1e9),
        "server_cpu_s_per_gb": server_cpu / (moved * (repeat + 1) / 1e9),
        "client_peak_rss": client["peak_rss"],
        "client_rss_after_startup": client["peak_rss"] - client["startup_rss"],
        "server_peak_rss": stopped["peak_rss"],
        "server_rss_after_startup": stopped["peak_rss"] - ready["startup_rss"],
    }


def transfer_grpc(params: int, repeat: int, certs: Path) -> dict[str, dict[str, Any]]:
    """grpc and grpc-tls from one server process and one client process (alternating)."""
    server = _spawn("_serve-grpc", str(params), str(certs))
    try:
        ready = _read(server)
        client = _finish(
            _spawn("_fetch-grpc", str(ready["port"]), str(ready["tls_port"]), str(certs), str(repeat))
        )
    finally:
        stopped = _finish(server)
    rows = {}
    for method in ("grpc", "grpc-tls"):
        row = _row(client, stopped, ready, repeat, client["seconds"][method], client["cpu_s"][method],
                   stopped["cpu_s"] / 2)  # fmt: skip
        row["decode_s"] = client["decode_s"]
        rows[method] = row
    return rows


def transfer(method: str, params: int, nbytes: int, repeat: int) -> dict[str, Any]:
    server_role, server_arg = {
        "grpc-plain": ("_serve-plain", nbytes),
    }.get(method, ("_serve-tcp", nbytes))
    server = _spawn(server_role, str(server_arg))
    try:
        ready = _read(server)
        port = str(ready["port"])
        client_args = {
            "grpc-plain": ("_fetch-plain", port, str(repeat)),
            "tcp": ("_fetch-tcp", port, str(nbytes), str(repeat), "reuse"),
            "tcp-fresh": ("_fetch-tcp", port, str(nbytes), str(repeat), "fresh"),
        }[method]
        client = _finish(_spawn(*client_args))
    finally:
        stopped = _finish(server)
    return _row(client, stopped, ready, repeat, client["seconds"], client["cpu_s"], stopped["cpu_s"])


def measure(params: int, repeat: int, certs: Path) -> dict[str, Any]:
    rows: dict[str, Any] = transfer_grpc(params, repeat, certs)
    nbytes = rows["grpc"]["bytes"]  # the safetensors payload: the tensor bytes plus its header
    for method in METHODS[2:]:
        rows[method] = transfer(method, params, nbytes, repeat)
    tcp = rows["tcp"]
    return {
        "params": params,
        "payload_bytes": nbytes,
        **rows,
        "ratio_best": rows["grpc"]["gbps_best"] / tcp["gbps_best"],
        "ratio_median": rows["grpc"]["gbps_median"] / tcp["gbps_median"],
        "plain_ratio_best": rows["grpc-plain"]["gbps_best"] / tcp["gbps_best"],
        "tls_ratio_best": rows["grpc-tls"]["gbps_best"] / rows["grpc"]["gbps_best"],
        "tls_ratio_median": rows["grpc-tls"]["gbps_median"] / rows["grpc"]["gbps_median"],
    }


def unit_costs(nbytes: int, repeat: int) -> dict[str, float]:
    """GB/s of sha256 over 1 MiB chunks, and of writing 1 MiB chunks into fresh memory."""
    chunk = os.urandom(CHUNK)
    pieces = max(1, nbytes // CHUNK)
    best_hash = best_fill = float("inf")
    for _ in range(repeat):
        h = hashlib.sha256()
        started = time.perf_counter()
        for _ in range(pieces):
            h.update(chunk)
        best_hash = min(best_hash, time.perf_counter() - started)
        started = time.perf_counter()
        buffer = bytearray(pieces * CHUNK)
        view = memoryview(buffer)
        for j in range(pieces):
            view[j * CHUNK : (j + 1) * CHUNK] = chunk
        best_fill = min(best_fill, time.perf_counter() - started)
        view.release()
        del buffer
    moved = pieces * CHUNK
    return {"sha256_gbps": moved / best_hash / 1e9, "fresh_memory_fill_gbps": moved / best_fill / 1e9}


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def report(rows: list[dict[str, Any]], costs: dict[str, float], repeat: int) -> None:
    print(
        f"best (median) GB/s of {repeat} transfers, 1 GB = 1e9 B; ratio = grpc / tcp; tls = grpc-tls / grpc"
    )
    print(
        f"{'params':>10} {'MiB':>4}"
        + "".join(f" {m:>14}" for m in METHODS)
        + f" {'ratio':>11} {'tls':>11} {'decode s':>8}"
    )
    for r in rows:
        line = f"{r['params']:>10} {_mib(r['payload_bytes']):>4}"
        line += "".join(f" {r[m]['gbps_best']:>6.2f} ({r[m]['gbps_median']:>5.2f})" for m in METHODS)
        line += f" {r['ratio_best']:>4.0%} ({r['ratio_median']:>3.0%})"
        line += f" {r['tls_ratio_best']:>4.0%} ({r['tls_ratio_median']:>3.0%}) {r['grpc']['decode_s']:>8.3f}"
        print(line)
    print("\nCPU s per GB moved, client / server")
    for r in rows:
        cells = "".join(
            f" {r[m]['client_cpu_s_per_gb']:>6.2f}/{r[m]['server_cpu_s_per_gb']:<6.2f}" for m in METHODS
        )
        print(f"{r['params']:>10} {_mib(r['payload_bytes']):>4}{cells}")
    print("\npeak RSS MiB (after start-up)")
    sides = [(m, side) for m in ("grpc", "tcp") for side in ("client", "server")]
    print(f"{'params':>10} {'MiB':>4}" + "".join(f" {m + ' ' + side:>16}" for m, side in sides))
    for r in rows:
        cells = "".join(
            f" {_mib(r[m][side + '_peak_rss']):>9} ({_mib(r[m][side + '_rss_after_startup']):>4})"
            for m, side in sides
        )
        print(f"{r['params']:>10} {_mib(r['payload_bytes']):>4}{cells}")
    print(
        f"\nthis machine: sha256 {costs['sha256_gbps']:.2f} GB/s, "
        f"writing fresh memory {costs['fresh_memory_fill_gbps']:.2f} GB/s"
    )
    worst = min(r["ratio_best"] for r in rows)
    print(f"goal grpc/tcp >= {GOAL:.0%}: {'met' if worst >= GOAL else 'NOT met'} (worst size {worst:.0%})")
    large = [r for r in rows if r["params"] >= 10_000_000] or rows
    tls_worst = min(r["tls_ratio_best"] for r in large)
    print(
        f"goal grpc-tls/grpc >= {TLS_GOAL:.0%} at 10M+ params: "
        f"{'met' if tls_worst >= TLS_GOAL else 'NOT met'} (worst {tls_worst:.0%})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000,50000000", help="float32 parameter counts")
    ap.add_argument("--repeat", type=int, default=5, help="timed transfers per size and method")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    load_before = os.getloadavg()

    import tempfile

    from benchmarks.machine import describe
    from mtl_node.ca import make_certs

    with tempfile.TemporaryDirectory(prefix="bench-fetch-certs-") as certs:
        make_certs(Path(certs), ["bench-server", "bench-client"])
        rows = [measure(params, args.repeat, Path(certs)) for params in sizes]
    costs = unit_costs(rows[-1]["payload_bytes"], args.repeat)
    result = {
        "benchmark": "fetch",
        "command": "python benchmarks/bench_fetch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(),
        "repeat": args.repeat,
        "goal_ratio": GOAL,
        "goal_tls_ratio": TLS_GOAL,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "unit_costs": costs,
        "sizes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(rows, costs, args.repeat)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


ROLES = {
    "_serve-grpc": lambda a: serve_grpc(int(a[0]), a[1]),
    "_serve-plain": lambda a: serve_plain(int(a[0])),
    "_serve-tcp": lambda a: serve_tcp(int(a[0])),
    "_fetch-grpc": lambda a: fetch_grpc(int(a[0]), int(a[1]), a[2], int(a[3])),
    "_fetch-plain": lambda a: fetch_plain(int(a[0]), int(a[1])),
    "_fetch-tcp": lambda a: fetch_tcp(int(a[0]), int(a[1]), int(a[2]), a[3] == "fresh"),
}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](sys.argv[2:])
        raise SystemExit(0)
    raise SystemExit(main())
