"""``local``: real daemons on this machine, talking gRPC over loopback.

Agents are spread over a few ``mtl-node serve-many`` processes (one torch process per agent costs
~230 MB); each agent still has its own gRPC server on its own port, so every exchange crosses the
network stack. Every agent binds a free port of its own (port 0) and waits for ``peers.json``, which
is written once all of them printed their bound ports (mtl_node.ports: no two processes ever share
a port, and there is no reservation to race). Agents talk mutual TLS with the run's certificates
(``ctx.certs``) unless the run is ``--insecure``. Every process is stopped on completion, error or
Ctrl-C.
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

from mtl_node.ports import serving_addresses, write_peers_file
from orchestrator.backends.base import BACKENDS, Backend, RunContext, RunOutput
from orchestrator.backends.common import (  # noqa: F401  (collect, DeploymentError: used from here too)
    POLL_INTERVAL_S,
    RPC_TIMEOUT_S,
    DeploymentError,
    collect,
    follow,
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
        peers = ctx.workdir / "peers.json"
        peers.unlink(missing_ok=True)
        try:
            for index, group in enumerate(split(ids, processes)):
                hosts.append(self._start_host(plan, ctx, index, group, peers))
            write_pids(ctx.workdir, hosts)
            ports = self._wait_serving(hosts)
            addresses = {agent_id: f"{HOST}:{ports[agent_id]}" for agent_id in ids}
            write_peers_file(peers, addresses)
            alive = _alive_agents(hosts)
            wait_healthy(addresses, START_TIMEOUT_S, alive, certs=ctx.certs)
            follow(plan, ctx, addresses, alive)
        finally:
            stop_hosts(hosts)
        return collect(plan, ctx)

    # -- start ------------------------------------------------------------------------------------

    def _start_host(
        self, plan: RunPlan, ctx: RunContext, index: int, group: list[str], peers: Path
    ) -> HostProcess:
        agents: list[dict[str, Any]] = []
        for agent_id in group:
            agent = plan.agent(agent_id)
            data = plan.node_config_data(agent, ctx.rule)
            data["listen"] = f"{HOST}:0"
            data["neighbors"] = {n: f"{HOST}:0" for n in agent.neighbors}  # from peers.json
            data["peers_file"] = str(peers.resolve())
            data["results_dir"] = str(ctx.workdir / "agents" / agent_id)
            data |= tls_fields(ctx, agent_id)
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

    def _wait_serving(self, hosts: list[HostProcess]) -> dict[str, int]:
        """Until every agent printed its serving line; returns each agent's bound port."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = {h.index for h in hosts}
        ports: dict[str, int] = {}
        while pending:
            for h in hosts:
                if h.index not in pending:
                    continue
                served = serving_addresses(h.stdout_path.read_text(errors="replace"))
                if all(a in served for a in h.agents):
                    ports.update({a: int(served[a].rpartition(":")[2]) for a in h.agents})
                    pending.discard(h.index)
                elif h.popen.poll() is not None:
                    tail = h.log_path.read_text(errors="replace")[-2000:]
                    raise DeploymentError(
                        f"agent process {h.index} ({', '.join(h.agents[:3])}...) exited with "
                        f"code {h.popen.returncode} before serving:\n{tail}"
                    )
            if time.monotonic() > deadline:
                raise DeploymentError(f"agents did not start within {START_TIMEOUT_S:.0f}s")
            if pending:
                time.sleep(0.1)
        return ports


def tls_fields(ctx: RunContext, agent_id: str, directory: str | None = None) -> dict[str, Any]:
    """An agent's TLS config fields: its certificate files (``directory``: where they are for the
    agent, if elsewhere than here), or ``insecure`` for an ``--insecure`` run."""
    if ctx.certs is None:
        return {"insecure": True}
    return ctx.certs.node_fields(agent_id, directory)


def _alive_agents(hosts: list[HostProcess]) -> Callable[[], set[str]]:
    def alive() -> set[str]:
        return {a for h in hosts if h.popen.poll() is None for a in h.agents}

    return alive
