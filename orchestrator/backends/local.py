"""``local``: real daemons on this machine, talking gRPC over loopback.

Agents are spread over a few ``mtl-node serve-many`` processes (one torch process per agent costs
~230 MB); each agent still has its own gRPC server on its own port, so every exchange crosses the
network stack. Every agent binds a free port of its own (port 0) and waits for ``peers.json``, which
is written once all of them printed their bound ports (mtl_node.ports: no two processes ever share
a port, and there is no reservation to race). Agents talk mutual TLS with the run's certificates
(``ctx.certs``) unless the run is ``--insecure``. Every process is stopped on completion, error or
Ctrl-C.

Supervision (crash-only, DESIGN §5): a host process that dies before the run finished is started
again with the same configuration after a backoff (0.5 s, doubling, at most 10 s), its agents
listening on the ports they had (so peers.json stays true); they resume from their state
directories and a neighbour waits for them within the fetch deadline, so the results are those of
an uninterrupted run. After ``max_restarts`` (option, default 5) restarts of one process the run
fails with its last log lines.
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

from mtl_node.core.errors import ConfigError
from mtl_node.ports import serving_addresses, write_peers_file
from orchestrator.backends.base import BACKENDS, Backend, RunContext, RunOutput
from orchestrator.backends.common import (  # noqa: F401  (collect, DeploymentError: used from here too)
    POLL_INTERVAL_S,
    RPC_TIMEOUT_S,
    DeploymentError,
    check_options,
    collect,
    follow,
    int_option,
    process_record,
    progress_of,
    wait_healthy,
    write_atomic,
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
    cmd: list[str] | None = None
    restarts: int = 0
    restart_at: float | None = None  # monotonic time of the pending restart
    stdout_offset: int = 0  # bytes of stdout written before the current start

    def close_files(self) -> None:
        for f in self._files:
            f.close()

    def start(self) -> None:
        """(Re)start the process: stdout/stderr appended to the same files."""
        assert self.cmd is not None
        self.close_files()
        self.stdout_offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        out = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in stop_hosts
        err = open(self.log_path, "ab")  # noqa: SIM115
        self._files = (out, err)
        self.popen = _spawn(self.cmd, out, err)
        self.restart_at = None

    def stdout_text(self) -> str:
        """What the current start of the process printed (not the lines of a crashed one)."""
        with open(self.stdout_path, "rb") as f:
            f.seek(self.stdout_offset)
            return f.read().decode(errors="replace")


def _spawn(cmd: list[str], out: IO[bytes], err: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches us, and we stop the agents in order
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


MAX_RESTARTS = 5
BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0


class Supervisor:
    """Restarts host processes that die before the run is over (bounded, with backoff)."""

    def __init__(self, hosts: list[HostProcess], workdir: Path, max_restarts: int = MAX_RESTARTS) -> None:
        self.hosts = hosts
        self.workdir = workdir
        self.max_restarts = max_restarts
        self.ports: dict[str, int] = {}

    def pin(self, ports: dict[str, int]) -> None:
        """From now on a restarted process listens on these ports (what peers.json says)."""
        self.ports = dict(ports)

    def _pin_config(self, h: HostProcess) -> None:
        assert h.cmd is not None
        config = Path(h.cmd[-1])
        data = json.loads(config.read_text())
        for agent in data["agents"]:
            if agent["id"] in self.ports:
                agent["listen"] = f"{HOST}:{self.ports[agent['id']]}"
        write_atomic(config, json.dumps(data, indent=1))

    def check(self) -> None:
        """Schedule or perform restarts; DeploymentError when a process exhausted its restarts."""
        now = time.monotonic()
        for h in self.hosts:
            if h.restart_at is not None:
                if now >= h.restart_at:
                    log.warning(
                        "restarting agent process %d (%s): restart %d",
                        h.index,
                        _names(h),
                        h.restarts,
                    )
                    if self.ports:
                        self._pin_config(h)
                    h.start()
                    write_pids(self.workdir, self.hosts)
                continue
            code = h.popen.poll()
            if code is None:
                continue
            if h.restarts >= self.max_restarts:
                tail = "\n".join(h.log_path.read_text(errors="replace").splitlines()[-15:])
                when = "" if self.ports else " before serving"
                raise DeploymentError(
                    f"agent process {h.index} ({_names(h)}) exited with code {code}{when} after "
                    f"{h.restarts} restarts (limit {self.max_restarts}); last log lines:\n{tail}"
                )
            h.restarts += 1
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (h.restarts - 1))
            log.warning(
                "agent process %d (%s) exited (code %s); restart in %.1fs", h.index, _names(h), code, delay
            )
            h.restart_at = now + delay

    def alive(self) -> set[str]:
        """Agents whose process runs or is about to be restarted."""
        self.check()
        return {a for h in self.hosts for a in h.agents}


def _names(h: HostProcess) -> str:
    return ", ".join(h.agents[:3]) + ("..." if len(h.agents) > 3 else "")


AGENTS_PER_PROCESS = 25
# -o metrics_port=BASE: agent process k exports Prometheus metrics on 127.0.0.1:BASE+k (the
# targets `mtl-orchestrate render --format prometheus --backend local` writes).
OPTIONS = ("processes", "metrics_port", "max_restarts")


def default_processes(n_agents: int) -> int:
    """About 25 agents per process (each process imports torch: ~230 MB, a few seconds), but at
    least two so that a fetch's client and server sides can use both cores of a small machine."""
    return max(1, min(n_agents, max(2, min(8, math.ceil(n_agents / AGENTS_PER_PROCESS)))))


def split(ids: list[str], groups: int) -> list[list[str]]:
    size = math.ceil(len(ids) / groups)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def write_pids(workdir: Path, hosts: list[HostProcess]) -> None:
    """So ``mtl-orchestrate down`` can stop agents even if this supervisor died: pid, start time
    and command line of each, which ``down`` checks before signalling (a pid may be reused)."""
    write_atomic(workdir / "pids.json", json.dumps([process_record(h.popen.pid) for h in hosts]))


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
        max_restarts = int_option(options, "max_restarts", MAX_RESTARTS, minimum=0)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        hosts: list[HostProcess] = []
        supervisor = Supervisor(hosts, ctx.workdir, max_restarts)
        peers = ctx.workdir / "peers.json"
        peers.unlink(missing_ok=True)
        try:
            for index, group in enumerate(split(ids, processes)):
                hosts.append(self._start_host(plan, ctx, index, group, peers))
            write_pids(ctx.workdir, hosts)
            ports = self._wait_serving(hosts, supervisor)
            supervisor.pin(ports)  # a restarted process listens where its neighbours expect it
            addresses = {agent_id: f"{HOST}:{ports[agent_id]}" for agent_id in ids}
            write_peers_file(peers, addresses)
            write_atomic(ctx.workdir / "addresses.json", json.dumps(addresses))
            wait_healthy(addresses, START_TIMEOUT_S, supervisor.alive, certs=ctx.certs)
            follow(plan, ctx, addresses, supervisor.alive)
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
        if self.metrics_port:
            cmd += ["--metrics-listen", f"{HOST}:{self.metrics_port + index}"]
        return HostProcess(index, group, _spawn(cmd, out, err), stdout_path, log_path, (out, err), cmd)

    def _wait_serving(self, hosts: list[HostProcess], supervisor: Supervisor) -> dict[str, int]:
        """Until every agent printed its serving line; returns each agent's bound port. A process
        that exits first is restarted like any crash (and fails the run once out of restarts)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = {h.index for h in hosts}
        ports: dict[str, int] = {}
        while pending:
            supervisor.check()
            for h in hosts:
                if h.index not in pending:
                    continue
                served = serving_addresses(h.stdout_text())
                if all(a in served for a in h.agents):
                    ports.update({a: int(served[a].rpartition(":")[2]) for a in h.agents})
                    pending.discard(h.index)
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
