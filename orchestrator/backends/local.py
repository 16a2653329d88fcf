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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mtl_node.errors import ConfigError
from mtl_node.ports import reserved_ports
from orchestrator.backends.base import BACKENDS, Backend, RunContext, RunOutput
from orchestrator.backends.common import (  # noqa: F401  (collect, DeploymentError: used from here too)
    POLL_INTERVAL_S,
    RPC_TIMEOUT_S,
    DeploymentError,
    check_options,
    collect,
    follow,
    int_option,
    progress_of,
    wait_healthy,
)
from orchestrator.plan import RunPlan

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
_progress = progress_of  # the old private name


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
# -o metrics_port=BASE: agent process k exports Prometheus metrics on 127.0.0.1:BASE+k (the
# targets `mtl-orchestrate render --format prometheus --backend local` writes).
OPTIONS = ("processes", "metrics_port")


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
    metrics_port = 0

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        options = check_options(self.name, ctx.options or {}, OPTIONS)
        ids = [a.id for a in plan.agents]
        processes = min(len(ids), int_option(options, "processes", default_processes(len(ids))))
        metrics_port = int_option(options, "metrics_port", 0, minimum=1)
        if metrics_port and metrics_port + processes - 1 > 65535:
            raise ConfigError(
                "--option metrics_port", f"{metrics_port} + {processes} processes is past 65535"
            )
        self.metrics_port = metrics_port
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        hosts: list[HostProcess] = []
        try:
            with reserved_ports(len(ids), HOST) as ports:
                addresses = {agent_id: f"{HOST}:{port}" for agent_id, port in zip(ids, ports, strict=True)}
                for index, group in enumerate(split(ids, processes)):
                    hosts.append(self._start_host(plan, ctx, index, group, addresses))
                write_pids(ctx.workdir, hosts)
                self._wait_serving(hosts)
            alive = _alive_agents(hosts)
            wait_healthy(addresses, START_TIMEOUT_S, alive)
            follow(plan, ctx, addresses, alive)
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
        if self.metrics_port:
            cmd += ["--metrics-listen", f"{HOST}:{self.metrics_port + index}"]
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


def _alive_agents(hosts: list[HostProcess]) -> Callable[[], set[str]]:
    def alive() -> set[str]:
        return {a for h in hosts if h.popen.poll() is None for a in h.agents}

    return alive
