"""The ssh backend against a real OpenSSH server that the test starts on a loopback port.

The server has its own config, host key and authorized key, all generated into the test's tmp
directory; the client side is an SSH config with two host aliases (node-a, node-b) for it, handed
to the backend with ``-o ssh_config``, exactly as a user's ~/.ssh/config names their machines.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cli_helpers import BIN, assert_same_statistics, orchestrate, processes_mentioning, start_orchestrate

pytestmark = pytest.mark.integration

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TOPOLOGY = """
name: ssh-e2e
task: target-localization
agents: 4
graph: complete
byzantine: {ids: [a3], attack: constant}
rules: [loss-filtered]
rounds: 20
seed: 4
overrides:
  a0: {host: node-a}
  a1: {host: node-a}
  a2: {host: node-b}
  a3: {host: node-b}
"""


@dataclass
class SSHServer:
    port: int
    client_config: Path
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHServer]:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        reason = "OpenSSH server/client not installed (apt-get install openssh-server openssh-client)"
        if IN_CI:
            pytest.fail(f"CI must run the ssh backend test: {reason}")
        pytest.skip(reason)
    d = tmp_path / "ssh"
    d.mkdir()
    _keygen(d / "host_key")
    _keygen(d / "id_ed25519")
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    user = pwd.getpwuid(os.geteuid()).pw_name

    for _attempt in range(3):  # the port is free when chosen; retry if another program takes it first
        port = _free_port()
        (d / "sshd_config").write_text(
            f"""ListenAddress 127.0.0.1
Port {port}
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
LogLevel VERBOSE
"""
        )
        log = d / "sshd.log"
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115 - the child owns it
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if "Server listening" in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"sshd did not start: {log.read_text(errors='replace')[-2000:]}")

    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    client = d / "config"
    client.write_text(
        # ssh takes the first value it finds for each option: node-down's dead port comes first.
        f"""Host node-down
    Port {_free_port()}
Host node-a node-b node-down
    HostName 127.0.0.1
    Port {port}
    User {user}
    IdentityFile {d / "id_ed25519"}
    IdentitiesOnly yes
    UserKnownHostsFile {d / "known_hosts"}
    StrictHostKeyChecking yes
    LogLevel ERROR
"""
    )
    try:
        yield SSHServer(port, client, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def decisions_of(out: Path) -> dict[tuple[str, str, str], str]:
    """(round, agent, neighbour) -> accepted/filtered/missing, from decisions.csv."""
    with (out / "decisions.csv").open() as f:
        return {(r["round"], r["agent"], r["neighbor"]): r["decision"] for r in csv.DictReader(f)}


def test_ssh_backend_runs_a_topology_end_to_end(sshd: SSHServer, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text(TOPOLOGY)
    remote = tmp_path / "remote-home"
    out = tmp_path / "out"
    done = orchestrate(
        "up", str(topology), "--backend", "ssh", "--out", str(out), "--no-progress", "--no-report",
        "-o", f"ssh_config={sshd.client_config}",
        "-o", f"remote_command={BIN / 'mtl-node'}",
        "-o", f"remote_dir={remote}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + sshd.log.read_text(errors="replace")[-3000:]

    # The agents really ran through sshd: sessions for both aliases' daemons were accepted.
    log = sshd.log.read_text(errors="replace")
    assert log.count("Accepted publickey") >= 2 * 3  # per host: upload, run, stop (and results)
    work = out / "work" / "loss-filtered"
    hosts = json.loads((work / "hosts.json").read_text())
    assert [h[0] for h in hosts["hosts"]] == ["node-a", "node-b"]
    assert all(h[1] == "127.0.0.1" for h in hosts["hosts"])
    run_dir = Path(hosts["remote_dir"])
    assert run_dir.parent == remote
    # Each host ran its agents in the remote run directory, which kept the results too.
    for index, agents in ((0, ["a0", "a1"]), (1, ["a2", "a3"])):
        assert (run_dir / f"host-{index}.pid").read_text().strip().isdigit()
        served = (work / f"host-{index}.out").read_text()
        for agent in agents:
            assert f"mtl-node: serving {agent} on 127.0.0.1:" in served
            assert (run_dir / "agents" / agent / "metrics.jsonl").stat().st_size > 0
    # Nothing is left running on the "remote" side.
    assert processes_mentioning(str(run_dir), cwd=True) == []
    # The agents talked mutual TLS with the run's certificates, copied for the run and removed
    # at its end (keys never outlive it on the host).
    for index, agents in ((0, ["a0", "a1"]), (1, ["a2", "a3"])):
        configs = json.loads((work / f"host-{index}.json").read_text())["agents"]
        assert [c["cert"] for c in configs] == [f"certs/{a}.pem" for a in agents]
        assert not any(c.get("insecure") for c in configs)
    assert not (run_dir / "certs").exists()
    assert (out / "certs" / "ca.pem").exists()

    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 * 20
    # The same seeded topology in one process gives the same statistics.
    sim_out = tmp_path / "sim"
    sim = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(sim_out), "--no-progress", "--no-report"
    )
    assert sim.returncode == 0, sim.stderr
    # Every filter decision of every round is the one the simulation made, the attacker's included.
    assert decisions_of(out) == decisions_of(sim_out)
    assert any(d == "filtered" for (_, _, neighbour), d in decisions_of(out).items() if neighbour == "a3")
    summary = json.loads((out / "summary.json").read_text())
    sim_summary = json.loads((sim_out / "summary.json").read_text())
    assert_same_statistics(summary, sim_summary)


def test_unreachable_host_missing_command_and_missing_host_are_clear_errors(
    sshd: SSHServer, tmp_path: Path
) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text(TOPOLOGY.replace("a3: {host: node-b}", "a3: {host: node-down}"))
    done = orchestrate(
        "up", str(topology), "--backend", "ssh", "--out", str(tmp_path / "down"), "--no-progress",
        "-o", f"ssh_config={sshd.client_config}", "-o", f"remote_command={BIN / 'mtl-node'}",
        "-o", f"remote_dir={tmp_path / 'remote'}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ssh node-down:" in done.stderr and "Traceback" not in done.stderr
    assert processes_mentioning(str(tmp_path / "remote"), cwd=True) == []

    # A remote command that is not there: the remote shell's complaint comes back in the error.
    topology.write_text(TOPOLOGY)
    done = orchestrate(
        "up", str(topology), "--backend", "ssh", "--out", str(tmp_path / "nocmd"), "--no-progress",
        "-o", f"ssh_config={sshd.client_config}", "-o", f"remote_command={tmp_path / 'no-mtl-node'}",
        "-o", f"remote_dir={tmp_path / 'remote'}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "exited with code 127 before serving" in done.stderr and "no-mtl-node" in done.stderr
    assert "Traceback" not in done.stderr

    topology.write_text(TOPOLOGY.split("overrides:")[0])
    done = orchestrate(
        "up", str(topology), "--backend", "ssh", "--out", str(tmp_path / "nohost"), "--no-progress",
        "-o", f"ssh_config={sshd.client_config}",
    )  # fmt: skip
    assert done.returncode == 2
    assert "have no host" in done.stderr and "-o hosts=" in done.stderr


def test_ssh_remote_supervisor_restarts_a_killed_daemon(sshd: SSHServer, tmp_path: Path) -> None:
    """The daemon on a host is SIGKILLed mid-run: the supervisor loop on that host (not the ssh
    session) starts it again, its agents resume from their state, and every decision equals sim's."""
    import signal

    topology = tmp_path / "topology.yaml"
    topology.write_text(TOPOLOGY.replace("rounds: 20", "rounds: 60"))
    remote = tmp_path / "remote-home"
    out = tmp_path / "out"
    up = start_orchestrate(
        "up", str(topology), "--backend", "ssh", "--out", str(out),
        "--no-progress", "--no-report", "-o", f"ssh_config={sshd.client_config}",
        "-o", f"remote_command={BIN / 'mtl-node'}", "-o", f"remote_dir={remote}",
    )  # fmt: skip
    try:
        hosts_file = out / "work" / "loss-filtered" / "hosts.json"
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and up.poll() is None:
            if hosts_file.exists():
                run_dir = Path(json.loads(hosts_file.read_text())["remote_dir"])
                rows = run_dir / "agents" / "a2" / "metrics.jsonl"
                if rows.exists() and rows.read_text().count("\n") >= 10:
                    victim = int((run_dir / "host-1.pid").read_text())
                    os.kill(victim, signal.SIGKILL)
                    break
            time.sleep(0.05)
        assert victim is not None, "the run never reached round 10"
        _, stderr = up.communicate(timeout=400)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, stderr
    assert "restart 1" in (run_dir / "host-1.log").read_text()
    assert int((run_dir / "host-1.pid").read_text()) != victim
    assert processes_mentioning(str(run_dir), cwd=True) == []
    for index in (0, 1):  # the remote supervisors ended with the run
        supervisor = int((run_dir / f"host-{index}.supervisor").read_text())
        assert (
            not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE
        )
    sim_out = tmp_path / "sim"
    sim = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(sim_out), "--no-progress", "--no-report"
    )
    assert sim.returncode == 0, sim.stderr
    assert decisions_of(out) == decisions_of(sim_out)
