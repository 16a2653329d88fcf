"""Helpers for container tests: agent configs for containers, status over published ports."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from orchestrator.backends.common import agent_channel
from orchestrator.plan import RunPlan
from orchestrator.render import AGENT_PORT, IMAGE_UID, agent_configs, agent_hostnames, write_tls_dir
from orchestrator.tls import RunCerts, run_certs

RPC_TIMEOUT_S = 5.0


def container_user() -> str | None:
    """None: the image's own non-root user (root hands it the bind-mounted dirs); otherwise the
    caller's uid, who owns them."""
    return None if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"


def write_configs(
    plan: RunPlan, rule: str, directory: Path
) -> tuple[dict[str, Path], dict[str, str], RunCerts, dict[str, Path]]:
    """One config file per agent (as mtl-orchestrate render writes them), the agents' hostnames,
    the run's certificates and each agent's TLS directory to mount (readable by the container's
    user only); a results directory per agent, writable by the container's user."""
    hostnames = agent_hostnames([a.id for a in plan.agents])
    certs = run_certs(directory, [a.id for a in plan.agents], None, None)
    configs = agent_configs(plan, rule, hostnames, certs)
    owner = IMAGE_UID if os.geteuid() == 0 else None
    tls_dirs = {a.id: write_tls_dir(directory / "tls", a.id, certs, owner) for a in plan.agents}
    paths = {}
    (directory / "configs").mkdir(parents=True, exist_ok=True)
    for agent_id, data in configs.items():
        path = directory / "configs" / f"{agent_id}.yaml"
        path.write_text(yaml.safe_dump(data))
        path.chmod(0o644)
        paths[agent_id] = path
        results = directory / "results" / agent_id
        results.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(results, IMAGE_UID, IMAGE_UID)
    return paths, hostnames, certs, tls_dirs


def published(container: Any) -> str:
    """The agent's address on this machine: its port as published on 127.0.0.1."""
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"][f"{AGENT_PORT}/tcp"]
    assert bindings, "port not published"
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings  # loopback only
    return f"127.0.0.1:{bindings[0]['HostPort']}"


class StatusClient:
    """GetStatus of every agent as the run's operator (mutual TLS, checking each agent's identity)."""

    def __init__(self, addresses: dict[str, str], certs: RunCerts | None) -> None:
        self.channels = {a: agent_channel(a, addr, certs) for a, addr in addresses.items()}
        self.stubs = {a: pb_grpc.NodeStub(ch) for a, ch in self.channels.items()}

    def status(self, agent_id: str) -> pb.NodeStatus | None:
        try:
            return self.stubs[agent_id].GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            return None

    def wait(self, agents: list[str], done: Any, timeout: float, what: str) -> dict[str, pb.NodeStatus]:
        """Poll until ``done(status)`` holds for every agent in ``agents``."""
        deadline = time.monotonic() + timeout
        last: dict[str, pb.NodeStatus] = {}
        while True:
            for agent_id in agents:
                st = self.status(agent_id)
                if st is not None:
                    last[agent_id] = st
            if all(a in last and done(last[a]) for a in agents):
                return last
            if time.monotonic() > deadline:
                got = {a: (s.state, s.round) for a, s in last.items()}
                raise AssertionError(f"not {what} within {timeout:.0f}s: {got}")
            time.sleep(0.5)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
