"""What every rendered format shares: ports, paths and labels inside a container, DNS-safe names
for agent ids, each agent's daemon config, and its TLS material (see orchestrator.render)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtl_node.core.errors import ConfigError
from mtl_node.core.protocol import AGENT_PORT, SERVICE
from orchestrator.plan import RunPlan
from orchestrator.tls import RunCerts

METRICS_PORT = 9464  # every agent's Prometheus endpoint in its container/Pod (mtl_node.metrics)
HEALTH_PORT = 8081  # plaintext grpc.health.v1 only, for probes (see the module doc)
TLS_DIR = "/etc/mtl/tls"
IMAGE_UID = 10001  # the image's non-root user (deploy/Dockerfile)
DEFAULT_IMAGE = "resilient-mtl-node:latest"
DEFAULT_NAMESPACE = "resilient-mtl"
FORMATS = ("compose", "k8s", "prometheus")
PROMETHEUS_BACKENDS = ("local", "docker", "k8s")
CONFIGMAP_LIMIT = 1_000_000  # Kubernetes refuses ConfigMaps over 1 MiB
APP_LABEL = "app.kubernetes.io/name"
AGENT_LABEL = "resilient-mtl.io/agent"
RUN_LABEL = "resilient-mtl.io/run"
HEALTH_SERVICE = SERVICE
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def dns_label(agent_id: str, prefix: str = "") -> str:
    """A DNS-safe name for an agent id: ids may hold '_', '.' and capitals, which resolvers and
    Kubernetes names do not take."""
    label = re.sub(r"[^a-z0-9-]", "-", agent_id.lower()).strip("-") or "agent"
    return (prefix + label)[:60].rstrip("-")


def agent_hostnames(ids: Sequence[str], prefix: str = "") -> dict[str, str]:
    """Distinct DNS labels for every agent (suffixed where two ids map to the same label)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for agent_id in ids:
        base = dns_label(agent_id, prefix)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        out[agent_id] = name
    return out


@dataclass(frozen=True)
class Rendered:
    """What a format wrote, and the command that deploys it."""

    files: list[Path]
    next_step: str


def pick_rule(plan: RunPlan, rule: str | None) -> str:
    """A deployment runs one rule: by default the paper's (loss-filtered) if the plan compares it,
    else the plan's first."""
    if rule is None:
        return "loss-filtered" if "loss-filtered" in plan.rules else plan.rules[0]
    if rule not in plan.rules:
        raise ConfigError(
            "--rule", f"{rule!r} is not one of the topology's rules", f"use one of: {', '.join(plan.rules)}"
        )
    return rule


def tls_config(agent_id: str, certs: RunCerts | None) -> dict[str, Any]:
    """An agent's TLS fields inside a container: its files under TLS_DIR, or ``insecure``."""
    if certs is None:
        return {"insecure": True}
    base = f"{TLS_DIR}/{agent_id}"
    return {
        "ca": f"{base}/ca.crt",
        "cert": f"{base}/tls.crt",
        "key": f"{base}/tls.key",
        "trust_domain": certs.trust_domain,
    }


def tls_files(agent_id: str, certs: RunCerts) -> dict[str, bytes]:
    """What goes into an agent's TLS_DIR/<id>/ (a Secret's data, or files to mount)."""
    return {
        "ca.crt": certs.ca.read_bytes(),
        "tls.crt": certs.cert(agent_id).read_bytes(),
        "tls.key": certs.key(agent_id).read_bytes(),
    }


def write_tls_dir(directory: Path, agent_id: str, certs: RunCerts, owner: int | None) -> Path:
    """``directory/<id>/`` with the agent's files (key 0600, directory 0700), handed to ``owner``
    (the container's uid) when given: bind mounts keep the host's ownership."""
    target = directory / agent_id
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    for name, data in tls_files(agent_id, certs).items():
        path = target / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if owner is not None:
            os.chown(path, owner, owner)
    if owner is not None:
        os.chown(target, owner, owner)
    return target


def agent_configs(
    plan: RunPlan,
    rule: str,
    hostnames: dict[str, str],
    certs: RunCerts | None = None,
    health_host: str = "127.0.0.1",
) -> dict[str, dict[str, Any]]:
    """Each agent's daemon config (NodeConfig fields) for a one-agent-per-container deployment."""
    configs = {}
    for agent in plan.agents:
        data = plan.node_config_data(agent, rule)
        data["listen"] = f"0.0.0.0:{AGENT_PORT}"
        data["metrics_listen"] = f"0.0.0.0:{METRICS_PORT}"
        data["health_listen"] = f"{health_host}:{HEALTH_PORT}"
        data["neighbors"] = {n: f"{hostnames[n]}:{AGENT_PORT}" for n in agent.neighbors}
        data["results_dir"] = f"/results/{agent.id}"
        data |= tls_config(agent.id, certs)
        configs[agent.id] = data
    return configs


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=110)
