"""``local``: real daemons on this machine, talking gRPC over loopback.

Agents are spread over a few ``mtl-node serve-many`` processes (one torch process per agent costs
~230 MB); each agent still has its own gRPC server on its own port, so every exchange crosses the
network stack. Ports are reserved before start (mtl_node.ports) so every agent knows its
neighbours' addresses up front. Every process is stopped on completion, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtl_node.channel import create_sync_channel
from mtl_node.errors import MTLError
from mtl_node.ports import reserved_ports
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from orchestrator.backends.base import BACKENDS, Backend, Progress, Row, RunContext, RunOutput
from orchestrator.plan import RunPlan

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.5
RPC_TIMEOUT_S = 5.0


class DeploymentError(MTLError):
    """The deployment could not start or lost every agent."""


@dataclass
class HostProcess:
    index: int
    agents: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    log_path: Path
    _files: tuple[IO[bytes], IO[bytes]]

    def close_files(self) -> None:
        for f in self._files:
            f.close()


AGENTS_PER_PROCESS = 25


def default_processes(n_agents: int) -> int:
    """About 25 agents per process (each process imports torch: ~230 MB, a few seconds), but at
    least two so that a fetch's client and server sides can use both cores of a small machine."""
    return max(1, min(n_agents, max(2, min(8, math.ceil(n_agents / AGENTS_PER_PROCESS)))))


def split(ids: list[str], groups: int) -> list[list[str]]:
    size = math.ceil(len(ids) / groups)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def write_pids(workdir: Path, hosts: list[HostProcess]) -> None:
    """So ``mtl-orchestrate down`` can stop agents even if this supervisor died."""
    (workdir / "pids.json").write_text(json.dumps([h.popen.pid for h in hosts]))


def stop_hosts(hosts: list[HostProcess], grace: float = 10.0) -> None:
    """SIGTERM every host process, then SIGKILL whatever is left after ``grace`` seconds."""
    for h in hosts:
        if h.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                h.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for h in hosts:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            h.popen.wait(remaining)
        except subprocess.TimeoutExpired:
            log.warning("host process %d did not stop in %.0fs; killing it", h.popen.pid, grace)
            h.popen.kill()
            h.popen.wait()
        h.close_files()


@BACKENDS.register("local", "one mtl-node daemon per agent on loopback (several agents per process)")
class LocalBackend(Backend):
    name = "local"

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        options = ctx.options or {}
        ids = [a.id for a in plan.agents]
        processes = int(options.get("processes") or default_processes(len(ids)))
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        hosts: list[HostProcess] = []
        try:
            with reserved_ports(len(ids), HOST) as ports:
                addresses = {agent_id: f"{HOST}:{port}" for agent_id, port in zip(ids, ports, strict=True)}
                for index, group in enumerate(split(ids, processes)):
                    hosts.append(self._start_host(plan, ctx, index, group, addresses))
                write_pids(ctx.workdir, hosts)
                self._wait_serving(hosts)
            self._wait_healthy(addresses)
            self._follow(plan, ctx, hosts, addresses)
        finally:
            stop_hosts(hosts)
        return collect(plan, ctx)

    # -- start ------------------------------------------------------------------------------------

    def _start_host(
        self, plan: RunPlan, ctx: RunContext, index: int, group: list[str], addresses: dict[str, str]
    ) -> HostProcess:
        agents: list[dict[str, Any]] = []
        for agent_id in group:
            agent = plan.agent(agent_id)
            data = plan.node_config_data(agent, ctx.rule)
            data["listen"] = addresses[agent_id]
            data["neighbors"] = {n: addresses[n] for n in agent.neighbors}
            data["results_dir"] = str(ctx.workdir / "agents" / agent_id)
            agents.append(data)
        config_path = ctx.workdir / f"host-{index}.json"
        config_path.write_text(json.dumps({"agents": agents}, indent=1))
        stdout_path = ctx.workdir / f"host-{index}.out"
        log_path = ctx.workdir / f"host-{index}.log"
        out = open(stdout_path, "wb")  # noqa: SIM115 - closed in stop_hosts
        err = open(log_path, "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "mtl_node.cli", "serve-many", "--config", str(config_path)]
        popen = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the agents in order
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return HostProcess(index, group, popen, stdout_path, log_path, (out, err))

    def _wait_serving(self, hosts: list[HostProcess]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = {h.index for h in hosts}
        while pending:
            for h in hosts:
                if h.index not in pending:
                    continue
                served = h.stdout_path.read_text(errors="replace").count("mtl-node: serving ")
                if served >= len(h.agents):
                    pending.discard(h.index)
                elif h.popen.poll() is not None:
                    tail = h.log_path.read_text(errors="replace")[-2000:]
                    raise DeploymentError(
                        f"agent process {h.index} ({', '.join(h.agents[:3])}...) exited with "
                        f"code {h.popen.returncode} before serving:\n{tail}"
                    )
            if time.monotonic() > deadline:
                raise DeploymentError(f"agents did not start within {START_TIMEOUT_S:.0f}s")
            time.sleep(0.1)

    def _wait_healthy(self, addresses: dict[str, str]) -> None:
        for agent_id, address in addresses.items():
            with create_sync_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service="mtl.v1.Node"),
                        timeout=RPC_TIMEOUT_S,
                        wait_for_ready=True,
                    )
                except grpc.RpcError as exc:
                    raise DeploymentError(f"{agent_id} at {address}: health check failed: {exc}") from None
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    raise DeploymentError(f"{agent_id} at {address}: not SERVING")

    # -- follow -----------------------------------------------------------------------------------

    def _follow(
        self, plan: RunPlan, ctx: RunContext, hosts: list[HostProcess], addresses: dict[str, str]
    ) -> None:
        """Poll every agent's status until all finished (or their process died)."""
        channels = {a: create_sync_channel(addr) for a, addr in addresses.items()}
        stubs = {a: pb_grpc.NodeStub(ch) for a, ch in channels.items()}
        normal = set(plan.normal_ids)
        host_of = {agent_id: h for h in hosts for agent_id in h.agents}
        finished: set[str] = set()
        last_round = -1
        try:
            while len(finished) < len(stubs):
                statuses: list[pb.NodeStatus] = []
                for agent_id, stub in stubs.items():
                    if agent_id in finished:
                        continue
                    if host_of[agent_id].popen.poll() is not None:
                        log.warning("%s: its process exited; giving up on it", agent_id)
                        finished.add(agent_id)
                        continue
                    try:
                        st = stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        log.debug("%s: status: %s", agent_id, exc)
                        continue
                    if st.state in ("done", "failed"):
                        finished.add(agent_id)
                    if agent_id in normal:
                        statuses.append(st)
                if all(host.popen.poll() is not None for host in hosts) and len(finished) < len(stubs):
                    raise DeploymentError("every agent process exited before the run finished")
                if statuses:
                    progress = _progress(ctx.rule, plan.rounds, statuses)
                    if progress.round != last_round:
                        ctx.progress(progress)
                        last_round = progress.round
                if len(finished) < len(stubs):
                    time.sleep(POLL_INTERVAL_S)
        finally:
            for ch in channels.values():
                ch.close()
        ctx.progress(Progress(ctx.rule, plan.rounds, plan.rounds, math.nan, 0, 0, 0))


def _progress(rule: str, rounds: int, statuses: list[pb.NodeStatus]) -> Progress:
    losses = [s.loss for s in statuses if math.isfinite(s.loss)]
    n = len(statuses)
    return Progress(
        rule=rule,
        round=min(s.round for s in statuses),
        rounds=rounds,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        accepted=sum(s.accepted for s in statuses) / n,
        filtered=sum(s.filtered for s in statuses) / n,
        missing=sum(s.missing for s in statuses) / n,
    )


def collect(plan: RunPlan, ctx: RunContext) -> RunOutput:
    """Read every agent's metrics.jsonl / decisions.jsonl (what survived, even after a crash)."""
    metrics: list[Row] = []
    decisions: list[Row] = []
    for agent in plan.agents:
        directory = ctx.workdir / "agents" / agent.id
        metrics.extend(_read_jsonl(directory / "metrics.jsonl"))
        if ctx.record_decisions:
            decisions.extend(_read_jsonl(directory / "decisions.jsonl"))
    return RunOutput(metrics, decisions)


def _read_jsonl(path: Path) -> list[Row]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: keep everything before it
    return rows
