"""``ssh``: agents run as ``mtl-node serve-many`` on the machines the topology names, over SSH.

Each agent's machine is its ``host`` (``overrides: {a0: {host: pi@node1}}`` in the topology), or,
for agents with none, one of the ``-o hosts=h1,h2`` spread round-robin. The system ``ssh`` client
connects with the user's own SSH config, keys and known hosts (``-o ssh_config=FILE`` adds ``-F``),
always in batch mode: a host that would prompt is an error, not a hang.

Per host, one SSH session writes the agents' configs into the remote run directory, then one
foreground session runs ``<remote_command> serve-many`` there: its stdout/stderr stream back into
``host-N.out`` / ``host-N.log`` here (what ``mtl-orchestrate logs`` shows), and the session ending
is how the orchestrator knows that host's agents are gone. Agents talk gRPC to each other and to
the orchestrator directly at the host's address (``ssh -G`` resolves aliases from the SSH config)
on ports ``base_port`` + n (on a loopback host, e.g. in tests: free ports the daemons pick
themselves). Agents learn their neighbours' addresses from ``peers.json``, written to every host
once all daemons printed their bound ports (mtl_node.ports). With TLS (the default) each host
gets the CA and its agents' certificates and keys in ``<run dir>/certs`` (mode 0600 under a 0700
directory), removed again when the run ends. Results (metrics.jsonl, decisions.jsonl) are copied back with one
``tar`` stream per host and stay on the host too. On completion, error or Ctrl-C every remote
daemon gets SIGTERM through its pid file, then SIGKILL if it outlives the grace period.

Options (``mtl-orchestrate up --backend ssh -o KEY=VALUE``): ``ssh_config``, ``hosts``,
``remote_command`` (default ``mtl-node``; e.g. ``~/.venv/bin/mtl-node``), ``remote_dir`` (default
``resilient-mtl-runs``, relative to the remote home), ``base_port`` (default 50051), ``ssh``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
import uuid

from orchestrator.backends.base import BACKENDS, RunContext, RunOutput
from orchestrator.backends.common import (
    RESULT_FILES,
    DeploymentError,
    check_options,
    collect,
    extract_results,
    follow,
    int_option,
    wait_healthy,
)
from orchestrator.backends.local import (
    HostProcess,
    LocalBackend,
    Supervisor,
    stop_hosts,
    tls_fields,
    write_pids,
)
from orchestrator.backends.ssh_remote import (
    SSH,
    Host,
    assign_hosts,
    host_part,
    is_loopback,
    remote_path,
    supervisor_loop,
    tar_bundle,
)
from orchestrator.plan import RunPlan

log = logging.getLogger(__name__)

DEFAULT_REMOTE_COMMAND = "mtl-node"
DEFAULT_REMOTE_DIR = "resilient-mtl-runs"
DEFAULT_BASE_PORT = 50051
START_TIMEOUT_S = 300.0  # remote machines may be small (torch's import alone takes a while)
STOP_GRACE_S = 15.0
OPTIONS = ("hosts", "ssh_config", "remote_command", "remote_dir", "base_port", "ssh", "max_restarts")


@BACKENDS.register("ssh", "mtl-node daemons on the topology's hosts, started over SSH")
class SSHBackend(LocalBackend):
    name = "ssh"

    max_restarts = 5

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        options = check_options(self.name, ctx.options or {}, OPTIONS)
        self.max_restarts = int_option(options, "max_restarts", 5, minimum=0)
        ssh = SSH(str(options.get("ssh") or "ssh"), options.get("ssh_config"))
        spread = [h for h in str(options.get("hosts") or "").split(",") if h.strip()]
        remote_command = str(options.get("remote_command") or DEFAULT_REMOTE_COMMAND)
        run_id = f"{plan.name}-{ctx.rule}-{uuid.uuid4().hex[:8]}"
        remote_dir = f"{str(options.get('remote_dir') or DEFAULT_REMOTE_DIR).rstrip('/')}/{run_id}"
        base_port = int_option(options, "base_port", DEFAULT_BASE_PORT)

        assignment = assign_hosts(plan, spread)
        hosts = [
            Host(i, dest, ssh.hostname(dest), tuple(agents))
            for i, (dest, agents) in enumerate(assignment.items())
        ]
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        (ctx.workdir / "hosts.json").write_text(
            json.dumps(
                {
                    "remote_dir": remote_dir,
                    "hosts": [[h.destination, h.address, list(h.agents)] for h in hosts],
                }
            )
        )
        procs: list[HostProcess] = []
        started: list[Host] = []
        try:
            for h in hosts:
                started.append(h)  # from here on its run directory may hold keys: cleaned up
                self._upload(ssh, plan, ctx, h, remote_dir, base_port)
            for h in hosts:
                procs.append(self._start(ssh, ctx, h, remote_dir, remote_command))
            write_pids(ctx.workdir, procs)
            ports = self._wait_serving(procs, Supervisor(procs, ctx.workdir, max_restarts=0))
            addresses = {a: f"{host_part(h.address)}:{ports[a]}" for h in hosts for a in h.agents}
            peers = json.dumps(addresses, indent=1).encode()
            d = remote_path(remote_dir)
            for h in hosts:
                ssh.run(
                    h.destination, f"cat > {d}/.peers.tmp && mv {d}/.peers.tmp {d}/peers.json", stdin=peers
                )
                # A restarted daemon listens where peers.json says (read at its next start only).
                self._pin_ports(ssh, ctx, h, d, ports)

            def alive() -> set[str]:
                return {a for p in procs if p.popen.poll() is None for a in p.agents}

            wait_healthy(addresses, START_TIMEOUT_S, alive, what="ssh session", certs=ctx.certs)
            follow(plan, ctx, addresses, alive)
        finally:
            self._stop(ssh, started, procs, remote_dir)
        for h in started:
            self._fetch_results(ssh, ctx, h, remote_dir)
        return collect(plan, ctx)

    # -- start ------------------------------------------------------------------------------------

    def _upload(
        self, ssh: SSH, plan: RunPlan, ctx: RunContext, h: Host, remote_dir: str, base_port: int
    ) -> None:
        """The host's agent configs and (with TLS) its certificates, in one SSH session.

        A loopback host (this machine, e.g. in tests) listens on free ports of its own choosing;
        a remote host on ``base_port`` + n. Neighbours' addresses come later in peers.json."""
        loopback = is_loopback(h.address)
        listen_host = host_part(h.address) if loopback else "0.0.0.0"
        agents = []
        for n, agent_id in enumerate(h.agents):
            agent = plan.agent(agent_id)
            data = plan.node_config_data(agent, ctx.rule)
            data["listen"] = f"{listen_host}:{0 if loopback else base_port + n}"
            data["neighbors"] = {m: "127.0.0.1:0" for m in agent.neighbors}  # from peers.json
            data["peers_file"] = "peers.json"  # relative to the remote run directory
            data["results_dir"] = f"agents/{agent_id}"
            data |= tls_fields(ctx, agent_id, directory="certs")
            agents.append(data)
        config = json.dumps({"agents": agents}, indent=1)
        (ctx.workdir / f"host-{h.index}.json").write_text(config)
        files = {f"host-{h.index}.json": (config.encode(), 0o644)}
        if ctx.certs is not None:
            files["certs/ca.pem"] = (ctx.certs.ca.read_bytes(), 0o644)
            for agent_id in h.agents:
                files[f"certs/{agent_id}.pem"] = (ctx.certs.cert(agent_id).read_bytes(), 0o644)
                files[f"certs/{agent_id}.key"] = (ctx.certs.key(agent_id).read_bytes(), 0o600)
        d = remote_path(remote_dir)
        # umask 077 before anything is created: keys are never readable by others, not even while
        # tar is still writing them.
        ssh.run(
            h.destination,
            f"umask 077 && mkdir -p {d} && tar -x --no-same-owner -C {d}",
            stdin=tar_bundle(files),
        )

    def _start(self, ssh: SSH, ctx: RunContext, h: Host, remote_dir: str, remote_command: str) -> HostProcess:
        d = remote_path(remote_dir)
        # Crash-only: a supervisor loop started detached on the remote host (setsid nohup, so it
        # does not depend on this ssh session) restarts the daemon when it dies; the daemon's
        # output goes to files there, which this session follows until the supervisor exits.
        loop = supervisor_loop(h.index, remote_command, self.max_restarts)
        command = (
            f"cd {d} && rm -f host-{h.index}.stop && : >> host-{h.index}.out && : >> host-{h.index}.log && "
            f"setsid nohup sh -c {shlex.quote(loop)} > /dev/null 2>&1 < /dev/null & "
            f"sup=$! && cd {d} && echo $sup > host-{h.index}.supervisor && "
            f"{{ tail -n +1 -F --pid=$sup host-{h.index}.log >&2 & t=$!; }} && "
            f"tail -n +1 -F --pid=$sup host-{h.index}.out; wait $t; "
            # The session ends with the supervisor, with the daemon's last exit code.
            f"exit $(cat host-{h.index}.exit 2>/dev/null || echo 1)"
        )
        stdout_path = ctx.workdir / f"host-{h.index}.out"
        log_path = ctx.workdir / f"host-{h.index}.log"
        out = open(stdout_path, "wb")  # noqa: SIM115 - closed in stop_hosts
        err = open(log_path, "wb")  # noqa: SIM115
        popen = subprocess.Popen(
            ssh.argv(h.destination, command),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us; we stop the remote daemons in order
            env={**os.environ},
        )
        log.info("ssh %s (%s): started %s", h.destination, h.address, ", ".join(h.agents))
        return HostProcess(h.index, list(h.agents), popen, stdout_path, log_path, (out, err))

    def _pin_ports(self, ssh: SSH, ctx: RunContext, h: Host, d: str, ports: dict[str, int]) -> None:
        path = ctx.workdir / f"host-{h.index}.json"
        data = json.loads(path.read_text())
        for agent in data["agents"]:
            host = agent["listen"].rpartition(":")[0]
            agent["listen"] = f"{host}:{ports[agent['id']]}"
        config = json.dumps(data, indent=1)
        path.write_text(config)
        ssh.run(
            h.destination,
            f"cat > {d}/.host-{h.index}.tmp && mv {d}/.host-{h.index}.tmp {d}/host-{h.index}.json",
            stdin=config.encode(),
        )

    # -- stop and collect -------------------------------------------------------------------------

    def _stop(self, ssh: SSH, hosts: list[Host], procs: list[HostProcess], remote_dir: str) -> None:
        """SIGTERM each remote daemon (it stops its agents cleanly), SIGKILL what outlives the
        grace period, then end the local ssh sessions."""
        d = remote_path(remote_dir)

        def signal_all(sig: str, only_running: bool) -> None:
            for h, p in zip(hosts, procs, strict=False):
                if only_running and p.popen.poll() is not None:
                    continue
                try:
                    ssh.run(
                        h.destination,
                        f"pid=$(cat {d}/host-{h.index}.pid 2>/dev/null) && kill -{sig} $pid; true",
                    )
                except DeploymentError as exc:
                    log.warning("stopping agents on %s: %s", h.destination, exc)

        for h in hosts:  # the remote supervisors must not restart what is stopped now
            try:
                ssh.run(h.destination, f"touch {d}/host-{h.index}.stop")
            except DeploymentError as exc:
                log.warning("stopping the supervisor on %s: %s", h.destination, exc)
        signal_all("TERM", only_running=False)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        if any(p.popen.poll() is None for p in procs):
            signal_all("KILL", only_running=True)
        stop_hosts(procs, grace=5.0)
        for h in hosts:  # the private keys do not outlive the run
            try:
                ssh.run(h.destination, f"rm -rf {d}/certs {d}/.peers.tmp")
            except DeploymentError as exc:
                log.warning("removing certificates on %s: %s", h.destination, exc)

    def _fetch_results(self, ssh: SSH, ctx: RunContext, h: Host, remote_dir: str) -> None:
        """One tar stream per host with its agents' metrics/decisions (models stay on the host)."""
        names = " ".join(shlex.quote(f"agents/{a}/{f}") for a in h.agents for f in RESULT_FILES)
        try:
            data = ssh.run(
                h.destination,
                f"cd {remote_path(remote_dir)} && tar -c --ignore-failed-read {names} 2>/dev/null; true",
                timeout=300,
            )
        except DeploymentError as exc:
            log.warning("results of %s: %s", h.destination, exc)
            return
        extract_results(data, ctx.workdir, h.agents)
