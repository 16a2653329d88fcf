"""Launching a set of real ``mtl-node serve`` daemons on loopback for integration tests.

Every daemon binds a free port of its own (``--listen 127.0.0.1:0``) and waits for a peers file;
once all printed their serving line the file is written with everyone's address (mtl_node.ports:
one owner per port, no reservation to race). Daemons talk mutual TLS with certificates from a CA
made once per test process (``shared_ca()``), as every deployment does by default; ``insecure=True``
runs them with ``--insecure``. stdout and stderr go to files (never pipes that could fill and block
a daemon), so tests can read the logged reasons afterwards. ``DaemonSet`` is a context manager
whose exit always kills every process it started and checks that none is left behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import psutil

from mtl_node.ca import Issued, issue, make_ca, write_private, write_public
from mtl_node.channel import create_sync_channel
from mtl_node.identity import SpiffeId, TlsMaterial, agent_id, load_material
from mtl_node.ports import serving_addresses, write_peers_file
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
# Generous bounds: the machine is small and shared, and every daemon imports torch on start.
START_TIMEOUT_S = 180.0
RPC_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 20.0


class TestCA:
    """A CA in ``directory`` that issues agent and operator certificates on demand (files named
    as ``mtl-orchestrate certs`` names them)."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, trust_domain: str = "resilient-mtl") -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        directory.mkdir(parents=True, exist_ok=True)
        self.ca: Issued = make_ca(trust_domain)
        write_public(directory / "ca.pem", self.ca.cert_pem(), force=True)
        self._issued: set[str] = set()

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def files(self, name: str, kind: str = "agent") -> tuple[Path, Path, Path]:
        """(ca.pem, <name>.pem, <name>.key), issuing the certificate the first time."""
        stem = name if kind == "agent" else f"{kind}-{name}"
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        if stem not in self._issued:
            identity = SpiffeId(self.trust_domain, kind, name)
            made = issue(self.ca, identity)
            write_public(cert, made.cert_pem(), force=True)
            write_private(key, made.key_pem(), force=True)
            self._issued.add(stem)
        return self.ca_path, cert, key

    def args(self, name: str) -> list[str]:
        ca, cert, key = self.files(name)
        return ["--ca", str(ca), "--cert", str(cert), "--key", str(key)]

    def material(self, name: str, kind: str = "agent") -> TlsMaterial:
        return load_material(*self.files(name, kind))

    @property
    def operator(self) -> TlsMaterial:
        return self.material("operator", "operator")


_TEST_CA: TestCA | None = None


def shared_ca() -> TestCA:
    """The CA of this test process (made once, removed at exit)."""
    global _TEST_CA
    if _TEST_CA is None:
        directory = Path(tempfile.mkdtemp(prefix="mtl-test-ca-"))
        atexit.register(shutil.rmtree, directory, True)
        _TEST_CA = TestCA(directory)
    return _TEST_CA


def operator_channel(address: str, agent: str, insecure: bool = False) -> Any:
    """A blocking channel to ``agent`` at ``address`` as the test CA's operator."""
    if insecure:
        return create_sync_channel(address, tls=None)
    ca = shared_ca()
    return create_sync_channel(address, tls=ca.operator, expected_identity=agent_id(agent, ca.trust_domain))


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
    insecure: bool = False

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
    """The complete rows of a file a running daemon may be appending to: a last line without its
    newline is still being written and is left for the next read."""
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def attack_args(name: str, params: Mapping[str, Any]) -> list[str]:
    """``mtl-node serve``'s flags for attack ``name`` with ``params``."""
    args = ["--attack", name]
    for key, value in params.items():
        args += ["--attack-param", f"{key}={value}"]
    return args


def in_process_models(configs: Sequence[dict[str, Any]], keep: Sequence[str]) -> dict[str, list[Any]]:
    """Per agent in ``keep``, its model of every round when ``configs`` (NodeConfig fields) run on
    the in-process engine: what the daemons' checkpoints must equal."""
    from mtl_node.config import build_config
    from mtl_node.engine import run_agents

    records = run_agents([build_config(c) for c in configs], keep_models=True)
    return {a: records[a].models for a in keep}


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
        insecure: bool = False,
        stand_ins: dict[str, str] | None = None,
        cert_args: Any = None,
        operator: TlsMaterial | None = None,
        via: dict[str, str] | None = None,
    ) -> None:
        """``stand_ins``: neighbour id -> id of a daemon of this set whose address it gets (an
        impostor); ``cert_args(id)`` / ``operator``: certificates of another CA than the shared
        test CA (e.g. made with openssl); ``via``: daemon id -> address its neighbours are told
        instead of its own (a proxy in front of it)."""
        self.base_dir = base_dir
        self.specs = list(specs)
        self.rounds = rounds
        self.seed = seed
        self.rule = rule
        self.common_args = list(common_args)
        self.save_models_every = save_models_every
        self.insecure = insecure
        self.stand_ins = dict(stand_ins or {})
        self.via = dict(via or {})
        self.cert_args = cert_args
        self.operator = operator
        self.peers_file = base_dir / "peers.json"
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
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.peers_file.unlink(missing_ok=True)
        for spec in self.specs:
            directory = self.base_dir / spec.id
            directory.mkdir(parents=True, exist_ok=True)
            self.daemons[spec.id] = Daemon(spec.id, 0, directory, insecure=self.insecure)
        for spec in self.specs:
            self._launch(spec)
        self.wait_serving()
        addresses = {d.id: d.address for d in self.daemons.values()}
        addresses |= {alias: addresses[real] for alias, real in self.stand_ins.items()}
        write_peers_file(self.peers_file, addresses | self.via)

    def tls_args(self, spec: AgentSpec) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        if self.cert_args is not None:
            return list(self.cert_args(spec.id))
        return shared_ca().args(spec.id)

    def channel(self, agent: str) -> Any:
        """A blocking channel to ``agent`` as the operator (or plaintext for an insecure set)."""
        if self.operator is not None:
            return create_sync_channel(
                self.daemons[agent].address, tls=self.operator, expected_identity=agent_id(agent)
            )
        return operator_channel(self.daemons[agent].address, agent, self.insecure)

    def _command(self, spec: AgentSpec) -> list[str]:
        d = self.daemons[spec.id]
        # Daemons of this set: addresses from the peers file once all are bound.
        addresses = {n: f"{HOST}:0" for n in spec.neighbors if n in self.daemons or n in self.stand_ins}
        addresses |= spec.external
        order = [*spec.neighbors, *(n for n in spec.external if n not in spec.neighbors)]
        neighbors = ",".join(f"{n}={addresses[n]}" for n in order)
        cmd = [
            *mtl_node_command(),
            "serve",
            "--id",
            spec.id,
            "--listen",
            f"{HOST}:{d.port}",
            "--peers-file",
            str(self.peers_file),
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
        return [*cmd, *self.tls_args(spec), *self.common_args, *spec.args]

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
                served = serving_addresses(text)
                if nid in served:
                    d.port = int(served[nid].rpartition(":")[2])
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
        with self.channel(agent_id) as channel:
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
        channels = {a: self.channel(a) for a in agent_ids}
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
        peers_file = self.base_dir / "peers.json"
        peers_file.unlink(missing_ok=True)
        ca = shared_ca()
        for cfg in self.configs:
            cfg["listen"] = f"{HOST}:0"
            cfg["peers_file"] = str(peers_file)
            cfg["neighbors"] = {n: f"{HOST}:0" for n in self.links.get(cfg["id"], [])}
            ca_path, cert, key = ca.files(cfg["id"])
            cfg |= {"ca": str(ca_path), "cert": str(cert), "key": str(key)}
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
            while True:
                self.addresses = serving_addresses(self.stdout_path.read_text(errors="replace"))
                if len(self.addresses) >= len(self.configs):
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"serve-many did not serve (exit {self.proc.poll()}):\n"
                        f"{self.stderr_path.read_text(errors='replace')[-4000:]}"
                    )
                time.sleep(0.05)
            write_peers_file(peers_file, self.addresses)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def channel(self, agent: str) -> Any:
        """A blocking channel to ``agent`` as the operator."""
        return operator_channel(self.addresses[agent], agent)

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
