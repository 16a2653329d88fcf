"""Deployment manifests from a run plan: a Docker Compose project, or Kubernetes objects.

``mtl-orchestrate render TOPOLOGY --format compose|k8s --out DIR`` writes files a user applies
with their own tools (``docker compose up -d``, ``kubectl apply -f``); the docker and k8s backends
use the same agent configs. Torch-free: rendering happens on machines that never run an agent.

Every agent gets the config the daemons already understand (mtl_node.config.NodeConfig fields):
it listens on 0.0.0.0:50051 in its own container/Pod and reaches each neighbour by a DNS name
(compose service / Kubernetes Service) on that port. Results go to ``/results/<agent>`` inside
the container: a named volume with compose, an emptyDir per Pod with Kubernetes (copied out with
``kubectl cp`` by the k8s backend, or by hand).

Mutual TLS (given ``certs``): each agent finds its own material under ``/etc/mtl/tls/<id>/`` as
``ca.crt``, ``tls.crt``, ``tls.key``, the key names of a Kubernetes TLS Secret and of the Secrets
cert-manager writes, so a cert-manager Certificate can replace the rendered Secret as is
(docs/deployment.md). With Kubernetes every agent's material is its own Secret; with compose, files
under ``tls/<id>/`` mounted read-only. Probes cannot present client certificates, so every agent
also answers grpc.health.v1 (and nothing else) in plaintext on ``HEALTH_PORT``: on 127.0.0.1 in a
compose service (the image's HEALTHCHECK runs inside the container), on the Pod's IP with
Kubernetes (the kubelet's gRPC probes).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtl_node.core.errors import ConfigError
from mtl_node.core.protocol import AGENT_PORT, SERVICE
from orchestrator.plan import AgentPlan, RunPlan
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
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------------------- naming


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


# -------------------------------------------------------------------------------------- configs


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


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)


def _dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=110)


# -------------------------------------------------------------------------------------- compose


def render_compose(
    plan: RunPlan,
    out: Path,
    *,
    image: str = DEFAULT_IMAGE,
    rule: str | None = None,
    certs: RunCerts | None = None,
) -> Rendered:
    """``compose.yaml`` (one service per agent on one network, ports published on 127.0.0.1 only)
    plus ``agents/<id>.yaml`` and (with ``certs``) ``tls/<id>/`` mounted into each service."""
    rule = pick_rule(plan, rule)
    hostnames = agent_hostnames([a.id for a in plan.agents])
    configs = agent_configs(plan, rule, hostnames, certs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agents").mkdir(exist_ok=True)
    files: list[Path] = []
    services: dict[str, Any] = {}
    for agent in plan.agents:
        path = out / "agents" / f"{agent.id}.yaml"
        path.write_text(_dump(configs[agent.id]))
        files.append(path)
        services[hostnames[agent.id]] = {
            "image": image,
            "command": ["serve", "--config", "/etc/mtl/agent.yaml"],
            "labels": {
                "org.resilient-mtl.run": plan.name,
                "org.resilient-mtl.agent": agent.id,
                "org.resilient-mtl.role": agent.role,
            },
            "networks": ["mtl"],
            # Published on loopback only: `docker compose port <service> 50051` tells which port.
            "ports": [f"127.0.0.1::{AGENT_PORT}", f"127.0.0.1::{METRICS_PORT}"],
            "volumes": [
                f"./agents/{agent.id}.yaml:/etc/mtl/agent.yaml:ro",
                "results:/results",
                *([f"./tls/{agent.id}:{TLS_DIR}/{agent.id}:ro"] if certs else []),
            ],
            "environment": {"MTL_HEALTH_ADDRESSES": f"127.0.0.1:{HEALTH_PORT}"},
            "stop_grace_period": "10s",
            # Crash-only: a crashed agent is started again and resumes from /results/<id>/state
            # (the named volume outlives the container); a clean exit is not restarted.
            "restart": "on-failure",
            "init": False,  # the image's entrypoint is tini already
        }
    if certs is not None:
        # The image's user must read its key: hand the files to it when we can (as root).
        owner = IMAGE_UID if os.geteuid() == 0 else None
        for agent in plan.agents:
            files.extend(sorted(write_tls_dir(out / "tls", agent.id, certs, owner).iterdir()))
    compose = {
        # "3.8" keeps docker-compose v1 happy; Compose v2 ignores the version.
        "version": "3.8",
        "services": services,
        "networks": {"mtl": {"driver": "bridge"}},
        # A named volume starts with the image's /results (owned by the non-root user).
        "volumes": {"results": {}},
    }
    path = out / "compose.yaml"
    path.write_text(
        f"# {plan.name}: {len(plan.agents)} agents, rule {rule}, {plan.rounds} rounds "
        f"(rendered by mtl-orchestrate render)\n" + _dump(compose)
    )
    files.insert(0, path)
    return Rendered(files, f"docker compose -f {path} up -d")


# ----------------------------------------------------------------------------------- kubernetes


def render_k8s(
    plan: RunPlan,
    out: Path,
    *,
    image: str = DEFAULT_IMAGE,
    rule: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    pull_policy: str = "IfNotPresent",
    certs: RunCerts | None = None,
) -> Rendered:
    """A Namespace, one ConfigMap (the plan and every agent's config), one Service + Pod per agent,
    and with ``certs`` one TLS Secret per agent (its key is in no other object).

    Pods, not a Deployment or StatefulSet: every agent has its own config. A crashed agent's
    container is restarted in its Pod (restartPolicy OnFailure) and resumes from its state in
    /results/<id>/state, an emptyDir, which lives as long as the Pod and so survives container
    restarts (crash-only, DESIGN §5). A deleted or evicted Pod loses it, as a device that lost its
    disk would.
    """
    rule = pick_rule(plan, rule)
    if not _NAMESPACE.match(namespace):
        raise ConfigError(
            "--namespace", f"{namespace!r} is not a valid namespace", "lowercase letters, digits, '-'"
        )
    hostnames = agent_hostnames([a.id for a in plan.agents], prefix="mtl-")
    configs = agent_configs(plan, rule, hostnames, certs, health_host="0.0.0.0")
    run = dns_label(plan.name)
    labels = {APP_LABEL: "resilient-mtl", RUN_LABEL: run}
    data = {f"{a}.yaml": _dump(c) for a, c in configs.items()}
    data["plan.json"] = json.dumps(plan.to_json(), indent=1)
    size = sum(len(v) for v in data.values())
    if size > CONFIGMAP_LIMIT:
        raise ConfigError(
            "agents", f"the agents' configs take {size} bytes, over a ConfigMap's 1 MiB", "split the topology"
        )
    configmap_name = f"mtl-{run}"[:63].rstrip("-")
    configmap: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name, "namespace": namespace, "labels": labels},
        "data": data,
    }
    services = [_service(agent, hostnames[agent.id], namespace, labels) for agent in plan.agents]
    pods = [
        _pod(
            agent,
            hostnames[agent.id],
            namespace,
            labels,
            image,
            pull_policy,
            configmap_name,
            certs is not None,
        )
        for agent in plan.agents
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "00-namespace.yaml": _dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}
        ),
        "10-configmap.yaml": _dump(configmap),
        "20-services.yaml": _dump_all(services),
        "30-pods.yaml": _dump_all(pods),
    }
    if certs is not None:
        secrets = [_secret(agent, hostnames[agent.id], namespace, labels, certs) for agent in plan.agents]
        written["15-secrets.yaml"] = _dump_all(secrets)
    files = []
    for name, text in sorted(written.items()):
        path = out / name
        path.write_text(text)
        if name == "15-secrets.yaml":
            path.chmod(0o600)  # private keys
        files.append(path)
    return Rendered(files, f"kubectl apply -f {out}")


def secret_name(hostname: str) -> str:
    return f"{hostname}-tls"[:63]


def _secret(
    agent: AgentPlan, name: str, namespace: str, labels: dict[str, str], certs: RunCerts
) -> dict[str, Any]:
    """The agent's certificate, key and CA as a kubernetes.io/tls Secret (cert-manager's layout)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": secret_name(name),
            "namespace": namespace,
            "labels": {**labels, AGENT_LABEL: name},
            "annotations": {"resilient-mtl.io/agent-id": agent.id},
        },
        "data": {k: base64.b64encode(v).decode() for k, v in tls_files(agent.id, certs).items()},
    }


def _service(agent: AgentPlan, name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, AGENT_LABEL: name}},
        "spec": {
            "selector": {**labels, AGENT_LABEL: name},
            "ports": [{"name": "grpc", "port": AGENT_PORT, "targetPort": "grpc", "protocol": "TCP"}],
            # Neighbours must be reachable before they are Ready: round 1 waits for them itself.
            "publishNotReadyAddresses": True,
        },
    }


def _pod(
    agent: AgentPlan,
    name: str,
    namespace: str,
    labels: dict[str, str],
    image: str,
    pull_policy: str,
    configmap: str,
    tls: bool = False,
) -> dict[str, Any]:
    # The kubelet's gRPC probes speak plaintext without client certificates: they ask the
    # health-only port (agent_configs' health_listen), never the agent's mTLS port.
    probe = {"grpc": {"port": HEALTH_PORT, "service": HEALTH_SERVICE}}
    tls_mount = [{"name": "tls", "mountPath": f"{TLS_DIR}/{agent.id}", "readOnly": True}] if tls else []
    tls_volume = (
        # 0440 with fsGroup: readable by the agent's user only.
        [{"name": "tls", "secret": {"secretName": secret_name(name), "defaultMode": 0o440}}] if tls else []
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, AGENT_LABEL: name, "resilient-mtl.io/role": agent.role},
            "annotations": {
                "resilient-mtl.io/agent-id": agent.id,
                # The conventional annotations most Prometheus setups scrape by (and the job
                # `render --format prometheus --backend k8s` writes).
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "restartPolicy": "OnFailure",
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": IMAGE_UID,
                "runAsGroup": IMAGE_UID,
                "fsGroup": IMAGE_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "agent",
                    "image": image,
                    "imagePullPolicy": pull_policy,
                    "args": ["serve", "--config", "/etc/mtl/agent.yaml"],
                    "ports": [
                        {"name": "grpc", "containerPort": AGENT_PORT, "protocol": "TCP"},
                        {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                    ],
                    "env": [{"name": "MTL_HEALTH_ADDRESSES", "value": f"127.0.0.1:{HEALTH_PORT}"}],
                    # torch's import takes a while on small devices: the startup probe covers it.
                    "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},
                    "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
                    "livenessProbe": {
                        **probe,
                        "periodSeconds": 20,
                        "timeoutSeconds": 5,
                        "failureThreshold": 3,
                    },
                    "resources": {
                        "requests": {"cpu": "250m", "memory": "512Mi"},
                        "limits": {"memory": "2Gi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/mtl", "readOnly": True},
                        {"name": "results", "mountPath": "/results"},
                        *tls_mount,
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "config",
                    "configMap": {
                        "name": configmap,
                        "items": [{"key": f"{agent.id}.yaml", "path": "agent.yaml"}],
                    },
                },
                {"name": "results", "emptyDir": {}},
                *tls_volume,
            ],
        },
    }


# ----------------------------------------------------------------------------------- prometheus


def render_prometheus(
    plan: RunPlan,
    out: Path,
    *,
    backend: str = "local",
    metrics_port: int = METRICS_PORT,
    processes: int | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    scrape_interval: str = "15s",
) -> Rendered:
    """``prometheus.yml``: a scrape job for the agents of ``plan`` as ``backend`` runs them.

    local: one target per agent process, 127.0.0.1:metrics_port+k (run with ``up --backend local
    -o metrics_port=PORT``, and the same ``--processes``); docker: each compose service on
    METRICS_PORT (run Prometheus on the compose network); k8s: Pods of the run found through the
    API by their ``prometheus.io/*`` annotations. Every series carries the ``agent`` label itself.
    """
    if backend not in PROMETHEUS_BACKENDS:
        raise ConfigError(
            "--backend",
            f"no Prometheus targets for backend {backend!r}",
            f"use one of: {', '.join(PROMETHEUS_BACKENDS)}",
        )
    if not re.match(r"^[0-9]+(ms|s|m|h)$", scrape_interval):
        raise ConfigError("--scrape-interval", f"{scrape_interval!r} is not a duration", "e.g. 15s or 1m")
    job = f"mtl-{dns_label(plan.name)}"
    labels = {"run": plan.name, "backend": backend}
    scrape: dict[str, Any] = {"job_name": job, "scrape_interval": scrape_interval, "metrics_path": "/metrics"}
    if backend == "local":
        from orchestrator.backends.local import default_processes

        count = min(len(plan.agents), processes or default_processes(len(plan.agents)))
        if not 1 <= metrics_port <= 65535 - count + 1:
            raise ConfigError("--metrics-port", f"{metrics_port} leaves no room for {count} processes")
        targets = [f"127.0.0.1:{metrics_port + k}" for k in range(count)]
        scrape["static_configs"] = [{"targets": targets, "labels": labels}]
    elif backend == "docker":
        hostnames = agent_hostnames([a.id for a in plan.agents])
        scrape["static_configs"] = [
            {"targets": [f"{hostnames[a.id]}:{METRICS_PORT}"], "labels": labels} for a in plan.agents
        ]
    else:
        run = dns_label(plan.name)
        scrape["kubernetes_sd_configs"] = [{"role": "pod", "namespaces": {"names": [namespace]}}]
        scrape["relabel_configs"] = [
            {
                "source_labels": ["__meta_kubernetes_pod_label_resilient_mtl_io_run"],
                "regex": run,
                "action": "keep",
            },
            {
                "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                "regex": "true",
                "action": "keep",
            },
            {
                "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                "regex": r"([^:]+)(?::\d+)?;(\d+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            {"target_label": "run", "replacement": plan.name},
        ]
    config = {"global": {"scrape_interval": scrape_interval}, "scrape_configs": [scrape]}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prometheus.yml"
    path.write_text(
        f"# {plan.name}: scrape config, {backend} backend (mtl-orchestrate render)\n" + _dump(config)
    )
    return Rendered([path], f"prometheus --config.file={path}")


def render(
    plan: RunPlan,
    fmt: str,
    out: Path,
    *,
    image: str = DEFAULT_IMAGE,
    rule: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    certs: RunCerts | None = None,
    backend: str = "local",
    metrics_port: int = METRICS_PORT,
    processes: int | None = None,
    scrape_interval: str = "15s",
) -> Rendered:
    if fmt == "prometheus":
        return render_prometheus(
            plan,
            out,
            backend=backend,
            metrics_port=metrics_port,
            processes=processes,
            namespace=namespace,
            scrape_interval=scrape_interval,
        )
    if fmt == "compose":
        return render_compose(plan, out, image=image, rule=rule, certs=certs)
    if fmt == "k8s":
        return render_k8s(plan, out, image=image, rule=rule, namespace=namespace, certs=certs)
    raise ConfigError("--format", f"unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
