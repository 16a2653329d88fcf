"""The ssh backend's tools for the far side: the system ssh client (batch mode, every call bounded
in time), which agent runs on which host, the POSIX sh supervisor a host runs its daemon under, and
the tar bundles that carry configs and certificates there (orchestrator.backends.ssh runs them)."""

from __future__ import annotations

import io
import ipaddress
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mtl_node.core.errors import ConfigError
from orchestrator.backends.common import DeploymentError
from orchestrator.plan import RunPlan

SSH_TIMEOUT_S = 60.0  # one short SSH command (write configs, kill, copy results)


@dataclass(frozen=True)
class Host:
    """One SSH destination and the agents it runs."""

    index: int
    destination: str  # as written in the topology: alias, host, user@host
    address: str  # where gRPC reaches it (HostName from the SSH config)
    agents: tuple[str, ...]


class SSH:
    """The system ssh client with the user's config; every call bounded in time."""

    def __init__(self, binary: str = "ssh", config: str | None = None) -> None:
        self.base = [binary]
        if config:
            self.base += ["-F", str(Path(config).expanduser())]
        self.base += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15"]

    def argv(self, destination: str, command: str) -> list[str]:
        return [*self.base, destination, "--", command]

    def run(
        self, destination: str, command: str, stdin: bytes = b"", timeout: float = SSH_TIMEOUT_S
    ) -> bytes:
        try:
            done = subprocess.run(
                self.argv(destination, command), input=stdin, capture_output=True, timeout=timeout
            )
        except FileNotFoundError:
            raise DeploymentError(f"{self.base[0]}: not found (install an OpenSSH client)") from None
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"ssh {destination}: no answer within {timeout:.0f}s") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise DeploymentError(f"ssh {destination}: {err[-1] if err else f'exit {done.returncode}'}")
        return done.stdout

    def hostname(self, destination: str) -> str:
        """The address ``destination`` connects to, after the SSH config's Host/HostName rules."""
        try:
            done = subprocess.run(
                [*self.base, "-G", destination], capture_output=True, text=True, timeout=SSH_TIMEOUT_S
            )
        except FileNotFoundError:
            raise DeploymentError(f"{self.base[0]}: not found (install an OpenSSH client)") from None
        if done.returncode != 0:
            raise DeploymentError(f"ssh -G {destination}: {done.stderr.strip()}")
        for line in done.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname":
                return value.strip()
        return destination.rpartition("@")[2]


def remote_path(path: str) -> str:
    """A shell word for a remote path; a leading ``~/`` stays the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def assign_hosts(plan: RunPlan, spread: list[str]) -> dict[str, list[str]]:
    """destination -> its agents: the topology's ``host`` first, then ``-o hosts`` round-robin."""
    out: dict[str, list[str]] = {}
    missing = []
    i = 0
    for agent in plan.agents:
        if agent.host:
            dest = agent.host
        elif spread:
            dest = spread[i % len(spread)]
            i += 1
        else:
            missing.append(agent.id)
            continue
        out.setdefault(dest, []).append(agent.id)
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ConfigError(
            "--backend ssh",
            f"agents {shown} have no host",
            "set overrides.<agent>.host in the topology, or spread them with -o hosts=user@h1,user@h2",
        )
    return out


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def supervisor_loop(index: int, remote_command: str, max_restarts: int) -> str:
    """The remote host's supervisor (POSIX sh): runs the daemon, restarts it when it exits with an
    error (backoff 1, 2, ... 5 s), gives up after ``max_restarts`` restarts or at once when the
    command cannot run (126/127), stops for good once ``host-N.stop`` exists. ``host-N.pid`` always
    names the current daemon; ``host-N.exit`` gets its last exit code."""
    n = f"host-{index}"
    return (
        "n=0; code=0; while :; do "
        f"[ -e {n}.stop ] && break; "
        f"{remote_command} serve-many --config {n}.json --log-level info >> {n}.out 2>> {n}.log & "
        f"echo $! > {n}.pid; wait $!; code=$?; "
        f"[ -e {n}.stop ] && break; [ $code -eq 0 ] && break; "
        "[ $code -eq 126 ] && break; [ $code -eq 127 ] && break; "
        f"n=$((n+1)); if [ $n -gt {max_restarts} ]; then "
        f'echo "mtl supervisor: the daemon exited with code $code after {max_restarts} restarts" >> {n}.log; '
        "break; fi; "
        f'echo "mtl supervisor: the daemon exited with code $code; restart $n" >> {n}.log; '
        f"sleep $(( n < 5 ? n : 5 )); done; echo $code > {n}.exit"
    )


def tar_bundle(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed tar of ``name -> (data, mode)`` (directories 0700)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in sorted({name.rpartition("/")[0] for name in files} - {""}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def host_part(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
