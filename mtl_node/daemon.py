"""Running agents as long-lived gRPC daemons: start, serve, run the rounds, shut down cleanly.

One process may host several agents (``mtl-node serve-many``): each keeps its own gRPC server on
its own port, so every exchange still crosses the network stack, but the process pays the torch
import and interpreter memory once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio

from mtl_node.agent import Agent
from mtl_node.allocator import keep_freed_memory
from mtl_node.client import GrpcTransport
from mtl_node.config import NodeConfig, parse_hostport
from mtl_node.core.errors import ConfigError, MTLError
from mtl_node.identity import TlsMaterial, agent_id, party_tls
from mtl_node.metrics import PrometheusMetrics
from mtl_node.recorder import FileRecorder, Recorder
from mtl_node.server import create_health_server, create_server, set_serving, stop_server

log = logging.getLogger(__name__)


@dataclass
class RunningAgent:
    config: NodeConfig
    agent: Agent
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    transport: GrpcTransport
    recorder: Recorder
    health_server: grpc.aio.Server | None = None


def agent_tls(config: NodeConfig) -> TlsMaterial | None:
    """The agent's checked certificate (naming ``config.id``), or None with ``insecure``."""
    return party_tls(
        config.ca,
        config.cert,
        config.key,
        insecure=config.insecure,
        expect=agent_id(config.id, config.trust_domain),
        who=f"agent {config.id}",
    )


async def start_agent(config: NodeConfig, metrics: PrometheusMetrics | None = None) -> RunningAgent:
    """Build the agent, bind its server and mark it SERVING; rounds are not started yet."""
    tls = agent_tls(config)
    try:
        recorder: Recorder = (
            FileRecorder(config.results_dir, config.save_models_every) if config.results_dir else Recorder()
        )
    except OSError as exc:
        raise ConfigError(
            "results_dir",
            f"cannot write {config.results_dir}: {exc.strerror or exc}",
            "give a writable directory",
        ) from None
    transport = GrpcTransport(config.neighbors, device=config.device, tls=tls)
    agent = Agent(config, transport, recorder)
    if metrics is not None:
        agent.observer = metrics.agent(config.id, config.neighbors)
        transport.on_received = agent.observer.received
    server, port, health_servicer = await create_server(agent, config.listen, tls)
    health_server = None
    if config.health_listen:
        try:
            health_server, health_port = await create_health_server(health_servicer, config.health_listen)
        except OSError:
            await stop_server(server, grace=0)
            raise
        log.info("%s: plaintext health checks on port %d", config.id, health_port)
    host = config.listen.rsplit(":", 1)[0]
    # One parseable line per agent: orchestrators and scripts read the bound port from it.
    print(f"mtl-node: serving {config.id} on {host}:{port}", flush=True)
    await set_serving(health_servicer, True)
    return RunningAgent(config, agent, server, port, health_servicer, transport, recorder, health_server)


async def stop_agent(running: RunningAgent) -> None:
    await set_serving(running.health, False)
    running.agent.store.close()
    await running.transport.close()
    await stop_server(running.server)
    if running.health_server is not None:
        await stop_server(running.health_server, grace=0)


async def wait_for_peers(running: Sequence[RunningAgent], stop: asyncio.Event) -> None:
    """Agents with ``peers_file``: wait for it, then take their neighbours' addresses from it.

    How agents started together on port 0 learn where their neighbours are (one owner per port,
    docs/design.md): every daemon binds first and prints its port; whoever started them writes
    the file (atomically) once all are bound.
    """
    waiting = [r for r in running if r.config.peers_file is not None]
    loop = asyncio.get_running_loop()
    for r in waiting:
        path = Path(str(r.config.peers_file))
        deadline = loop.time() + r.config.startup_timeout
        while not path.exists():
            if stop.is_set():
                return
            if loop.time() > deadline:
                raise ConfigError(
                    "peers_file", f"{path} did not appear within {r.config.startup_timeout:.0f}s"
                )
            await asyncio.sleep(0.05)
        try:
            peers = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("peers_file", f"cannot read {path}: {exc}") from None
        if not isinstance(peers, dict):
            raise ConfigError("peers_file", f"{path} must hold {{id: HOST:PORT}}")
        for neighbor in r.config.neighbors:
            address = str(peers.get(neighbor, r.transport.addresses.get(neighbor, "")))
            _, port = parse_hostport(address, f"peers_file {neighbor}")
            if port == 0:
                raise ConfigError("peers_file", f"no address for neighbour {neighbor} in {path}")
            r.transport.addresses[neighbor] = address


def start_metrics(configs: Sequence[NodeConfig], address: str | None) -> PrometheusMetrics | None:
    """One Prometheus endpoint for the process: ``address``, else the first agent's
    ``metrics_listen``; None when neither is set."""
    address = address or next((c.metrics_listen for c in configs if c.metrics_listen), None)
    if address is None:
        return None
    metrics = PrometheusMetrics()
    try:
        port = metrics.serve(address)
    except OSError as exc:
        raise ConfigError(
            "metrics_listen", f"cannot listen on {address}: {exc.strerror or exc}", "give a free HOST:PORT"
        ) from None
    host = address.rsplit(":", 1)[0]
    print(f"mtl-node: metrics on {host}:{port}", flush=True)
    return metrics


async def serve(
    configs: Sequence[NodeConfig], exit_when_done: bool, linger: float, metrics_listen: str | None = None
) -> int:
    """Serve every agent until SIGTERM/SIGINT, or with ``exit_when_done`` until all finished
    their rounds and ``linger`` seconds passed (neighbours may still be fetching the last round).
    Returns the exit code: 0, or 1 if any round loop failed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    running: list[RunningAgent] = []
    metrics = start_metrics(configs, metrics_listen)
    try:
        for cfg in configs:
            running.append(await start_agent(cfg, metrics))
        await wait_for_peers(running, stop)
        runs = [asyncio.create_task(r.agent.run(), name=f"rounds-{r.config.id}") for r in running]
        all_runs = asyncio.gather(*runs, return_exceptions=True)
        stopper = asyncio.ensure_future(stop.wait())
        waiters: list[asyncio.Future[Any]] = [all_runs, stopper]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if all_runs.done():
            for r, result in zip(running, all_runs.result(), strict=True):
                if isinstance(result, BaseException):
                    log.error("%s: round loop failed", r.config.id, exc_info=result)
                    code = 1
                else:
                    log.info("%s: finished %d rounds", r.config.id, r.config.rounds)
            if exit_when_done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), linger)
            else:
                await stop.wait()
        else:
            log.info("stopping: %s", ", ".join(f"{r.config.id}@{r.agent.status.round}" for r in running))
            for task in runs:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await all_runs
            for r in running:
                r.recorder.close()
        stopper.cancel()
        return code
    finally:
        await asyncio.gather(*(stop_agent(r) for r in running), return_exceptions=True)
        if metrics is not None:
            metrics.close()


def run_daemon(
    configs: Sequence[NodeConfig],
    exit_when_done: bool = False,
    linger: float = 5.0,
    metrics_listen: str | None = None,
) -> int:
    keep_freed_memory()  # large models: reuse receive buffers' pages across rounds
    try:
        return asyncio.run(serve(configs, exit_when_done, linger, metrics_listen))
    except OSError as exc:
        print(f"mtl-node: error: listen: {exc}", file=sys.stderr)
        return 2
    except MTLError as exc:
        print(f"mtl-node: error: {exc}", file=sys.stderr)
        return 2
