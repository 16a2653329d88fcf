"""``render --format k8s``: Kubernetes objects, a Service and a Pod per agent (the k8s backend
applies them with kubectl)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from mtl_node.core.errors import ConfigError
from orchestrator.plan import AgentPlan, RunPlan
from orchestrator.render.common import (
    AGENT_LABEL,
    AGENT_PORT,
    APP_LABEL,
    CONFIGMAP_LIMIT,
    DEFAULT_IMAGE,
    DEFAULT_NAMESPACE,
    HEALTH_PORT,
    HEALTH_SERVICE,
    IMAGE_UID,
    METRICS_PORT,
    NAMESPACE_PATTERN,
    RUN_LABEL,
    TLS_DIR,
    Rendered,
    agent_configs,
    agent_hostnames,
    dns_label,
    dump,
    dump_all,
    pick_rule,
    tls_files,
)
from orchestrator.tls import RunCerts


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
    if not NAMESPACE_PATTERN.match(namespace):
        raise ConfigError(
            "--namespace", f"{namespace!r} is not a valid namespace", "lowercase letters, digits, '-'"
        )
    hostnames = agent_hostnames([a.id for a in plan.agents], prefix="mtl-")
    configs = agent_configs(plan, rule, hostnames, certs, health_host="0.0.0.0")
    run = dns_label(plan.name)
    labels = {APP_LABEL: "resilient-mtl", RUN_LABEL: run}
    data = {f"{a}.yaml": dump(c) for a, c in configs.items()}
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
        "00-namespace.yaml": dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}
        ),
        "10-configmap.yaml": dump(configmap),
        "20-services.yaml": dump_all(services),
        "30-pods.yaml": dump_all(pods),
    }
    if certs is not None:
        secrets = [_secret(agent, hostnames[agent.id], namespace, labels, certs) for agent in plan.agents]
        written["15-secrets.yaml"] = dump_all(secrets)
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
