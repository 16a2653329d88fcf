"""Launching a set of real ``mtl-node serve`` daemons on loopback for integration tests.

Ports come from ``reserved_ports`` so every daemon can be told its neighbours' addresses before
any of them starts; the reservation is released once all of them print their serving line.
stdout and stderr go to files (never pipes that could fill and block a daemon), so tests can read
the logged reasons afterwards. ``DaemonSet`` is a context manager whose exit always kills every
process it started and checks that none is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import psutil

from mtl_node.channel import create_sync_channel
from mtl_node.ports import reserved_ports
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
# Generous bounds: the machine is small and shared, and every daemon imports torch on start.
START_TIMEOUT_S = 180.0
RPC_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 20.0


@dataclass
class AgentSpec:
    """One daemon to start: its id, neighbours in aggregation order, and extra CLI arguments."""

    id: str
    neighbors: Sequence[str] = ()
    args: Sequence[str] = ()
    # Neighbours that are not daemons of this set (e.g. a peer served by the test): id -> address.
    external: dict[str, str] = field(default_factory=dict)


@dataclass
class Daemon:
    id: str
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def results_dir(self) -> Path:
        return self.directory / "results"

    @property
    def stdout_path(self) -> Path:
        return self.directory / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.directory / "stderr.log"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.results_dir / "metrics.jsonl")

    def decisions(self) -> list[dict[str, Any]]:
        return read_jsonl(self.results_dir / "decisions.jsonl")

    def model_path(self, round_: int) -> Path:
        return self.results_dir / "models" / f"round-{round_:06d}.safetensors"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mtl_node_command() -> list[str]:
    """The venv's ``mtl-node`` script next to this interpreter, else ``python -m mtl_node.cli``."""
    script = Path(sys.executable).parent / "mtl-node"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mtl_node.cli"]


class DaemonSet:
    """Start ``specs`` as daemons running ``rounds`` rounds with ``seed``; stop all on exit."""

    def __init__(
        self,
        base_dir: Path,
        specs: Sequence[AgentSpec],
        rounds: int,
        seed: int,
        rule: str = "loss-filtered",
        common_args: Sequence[str] = (),
        save_models_every: int = 1,
    ) -> None:
        self.base_dir = base_dir
        self.specs = list(specs)
        self.rounds = rounds
        self.seed = seed
        self.rule = rule
        self.common_args = list(common_args)
        self.save_models_every = save_models_every
        self.daemons: dict[str, Daemon] = {}
        self._pids: list[int] = []
        self._stdio: list[Any] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> DaemonSet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        with reserved_ports(len(self.specs), HOST) as ports:
            for spec, port in zip(self.specs, ports, strict=True):
                directory = self.base_dir / spec.id
                directory.mkdir(parents=True, exist_ok=True)
                self.daemons[spec.id] = Daemon(spec.id, port, directory)
            for spec in self.specs:
                self._launch(spec)
            self.wait_serving()
        # The reservation is gone now; every daemon is bound and listening on its port.

    def _command(self, spec: AgentSpec) -> list[str]:
        d = self.daemons[spec.id]
        addresses = {n: self.daemons[n].address for n in spec.neighbors if n in self.daemons}
        addresses |= spec.external
        order = [*spec.neighbors, *(n for n in spec.external if n not in spec.neighbors)]
        neighbors = ",".join(f"{n}={addresses[n]}" for n in order)
        cmd = [
            *mtl_node_command(),
            "serve",
            "--id",
            spec.id,
            "--listen",
            d.address,
            "--rounds",
            str(self.rounds),
            "--seed",
            str(self.seed),
            "--rule",
            self.rule,
            "--results-dir",
            str(d.results_dir),
            "--save-models-every",
            str(self.save_models_every),
        ]
        if neighbors:
            cmd += ["--neighbors", neighbors]
        return [*cmd, *self.common_args, *spec.args]

    def _launch(self, spec: AgentSpec) -> None:
        d = self.daemons[spec.id]
        out = open(d.stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        err = open(d.stderr_path, "wb")  # noqa: SIM115
        self._stdio += [out, err]
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        d.proc = subprocess.Popen(
            self._command(spec), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
        )
        self._pids.append(d.proc.pid)

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every daemon printed ``mtl-node: serving ID on HOST:PORT`` (its bound port)."""
        deadline = time.monotonic() + timeout
        pending = dict(self.daemons)
        while pending:
            for nid, d in list(pending.items()):
                text = d.stdout_path.read_text(errors="replace")
                if f"mtl-node: serving {nid} on {d.address}" in text:
                    del pending[nid]
                    continue
                assert d.proc is not None
                if d.proc.poll() is not None:
                    raise AssertionError(
                        f"daemon {nid} exited with {d.proc.returncode} before serving:\n"
                        f"{text}\n{d.stderr()[-4000:]}"
                    )
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"daemons not serving after {timeout:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every daemon, wait, SIGKILL stragglers; then check that no process is left."""
        for d in self.daemons.values():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for d in self.daemons.values():
            if d.proc is None:
                continue
            try:
                d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(timeout=STOP_TIMEOUT_S)
        for f in self._stdio:
            f.close()
        self._stdio.clear()
        alive = [pid for pid in self._pids if _alive(pid)]
        assert not alive, f"daemon processes left behind: {alive}"

    # -- control and observation ------------------------------------------------------------------

    def __getitem__(self, agent_id: str) -> Daemon:
        return self.daemons[agent_id]

    def __iter__(self) -> Iterator[Daemon]:
        return iter(self.daemons.values())

    def kill(self, agent_id: str) -> None:
        proc = self.daemons[agent_id].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)

    def pause(self, agent_id: str) -> None:
        """SIGSTOP the daemon (resume with ``resume``)."""
        proc = self.daemons[agent_id].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def resume(self, agent_id: str) -> None:
        proc = self.daemons[agent_id].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def restart(self, agent_id: str) -> None:
        """Start the daemon again on its port (after ``kill``), with the same command line."""
        spec = next(s for s in self.specs if s.id == agent_id)
        self._launch(spec)
        d = self.daemons[agent_id]
        deadline = time.monotonic() + START_TIMEOUT_S
        while f"mtl-node: serving {agent_id} on {d.address}" not in d.stdout_path.read_text(errors="replace"):
            assert d.proc is not None and d.proc.poll() is None, d.stderr()[-4000:]
            assert time.monotonic() < deadline, f"{agent_id} not serving after restart"
            time.sleep(0.05)

    def status(self, agent_id: str) -> pb.NodeStatus:
        with create_sync_channel(self.daemons[agent_id].address) as channel:
            return pb_grpc.NodeStub(channel).GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)

    def wait_until(
        self,
        agent_ids: Sequence[str],
        ready: Any,
        timeout: float,
        what: str,
    ) -> dict[str, pb.NodeStatus]:
        """Poll GetStatus of ``agent_ids`` until ``ready(status)`` holds for all of them."""
        deadline = time.monotonic() + timeout
        channels = {a: create_sync_channel(self.daemons[a].address) for a in agent_ids}
        stubs = {a: pb_grpc.NodeStub(c) for a, c in channels.items()}
        last: dict[str, pb.NodeStatus] = {}
        try:
            while True:
                for a, stub in stubs.items():
                    proc = self.daemons[a].proc
                    if proc is not None and proc.poll() is not None:
                        raise AssertionError(
                            f"daemon {a} exited with {proc.returncode} while waiting for {what}:\n"
                            f"{self.daemons[a].stderr()[-4000:]}"
                        )
                    try:
                        last[a] = stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
                    except grpc.RpcError:
                        continue
                if len(last) == len(stubs) and all(ready(s) for s in last.values()):
                    return last
                if time.monotonic() > deadline:
                    summary = {a: (s.state, s.round) for a, s in last.items()}
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {summary}")
                time.sleep(0.1)
        finally:
            for c in channels.values():
                c.close()

    def wait_done(self, agent_ids: Sequence[str] | None = None, timeout: float = 180.0) -> None:
        ids = list(agent_ids) if agent_ids is not None else list(self.daemons)
        statuses = self.wait_until(ids, lambda s: s.state in ("done", "failed"), timeout, "state done")
        failed = {a: s.state for a, s in statuses.items() if s.state != "done"}
        assert not failed, f"agents failed: {failed}\n" + "\n".join(
            self.daemons[a].stderr()[-2000:] for a in failed
        )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ServeMany:
    """One ``mtl-node serve-many`` process hosting ``configs`` (NodeConfig field dicts), each agent
    on its own reserved loopback port; ``links`` gives each agent's neighbours (ids of ``configs``);
    ``addresses`` maps agent id to HOST:PORT once started."""

    def __init__(
        self,
        base_dir: Path,
        configs: Sequence[dict[str, Any]],
        args: Sequence[str] = (),
        links: dict[str, list[str]] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.configs = [dict(c) for c in configs]
        self.links = links or {}
        self.args = list(args)
        self.addresses: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdio: list[Any] = []

    @property
    def stdout_path(self) -> Path:
        return self.base_dir / "serve-many.out"

    @property
    def stderr_path(self) -> Path:
        return self.base_dir / "serve-many.err"

    def __enter__(self) -> ServeMany:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with reserved_ports(len(self.configs), HOST) as ports:
            for cfg, port in zip(self.configs, ports, strict=True):
                cfg["listen"] = self.addresses[cfg["id"]] = f"{HOST}:{port}"
            for cfg in self.configs:
                cfg["neighbors"] = {n: self.addresses[n] for n in self.links.get(cfg["id"], [])}
            config_path = self.base_dir / "serve-many.json"
            config_path.write_text(json.dumps({"agents": self.configs}))
            out = open(self.stdout_path, "wb")
            err = open(self.stderr_path, "wb")
            self._stdio += [out, err]
            self.proc = subprocess.Popen(
                [*mtl_node_command(), "serve-many", "--config", str(config_path), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while self.stdout_path.read_text(errors="replace").count("mtl-node: serving ") < len(
                    self.configs
                ):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            f"serve-many did not serve (exit {self.proc.poll()}):\n"
                            f"{self.stderr_path.read_text(errors='replace')[-4000:]}"
                        )
                    time.sleep(0.05)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        for f in self._stdio:
            f.close()
        self._stdio.clear()
