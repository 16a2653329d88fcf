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

One module a format (compose, k8s, prometheus) over ``common`` (ports, names, agent configs, TLS
files); this package's names are the public API the backends and tests import.
"""

from __future__ import annotations

from pathlib import Path

from mtl_node.core.errors import ConfigError
from orchestrator.plan import RunPlan
from orchestrator.render.common import (
    AGENT_LABEL,
    AGENT_PORT,
    APP_LABEL,
    CONFIGMAP_LIMIT,
    DEFAULT_IMAGE,
    DEFAULT_NAMESPACE,
    FORMATS,
    HEALTH_PORT,
    HEALTH_SERVICE,
    IMAGE_UID,
    METRICS_PORT,
    PROMETHEUS_BACKENDS,
    RUN_LABEL,
    TLS_DIR,
    Rendered,
    agent_configs,
    agent_hostnames,
    dns_label,
    pick_rule,
    tls_config,
    tls_files,
    write_tls_dir,
)
from orchestrator.render.compose import render_compose
from orchestrator.render.k8s import render_k8s, secret_name
from orchestrator.render.prometheus import render_prometheus
from orchestrator.tls import RunCerts

__all__ = [
    "AGENT_LABEL",
    "AGENT_PORT",
    "APP_LABEL",
    "CONFIGMAP_LIMIT",
    "DEFAULT_IMAGE",
    "DEFAULT_NAMESPACE",
    "FORMATS",
    "HEALTH_PORT",
    "HEALTH_SERVICE",
    "IMAGE_UID",
    "METRICS_PORT",
    "PROMETHEUS_BACKENDS",
    "RUN_LABEL",
    "TLS_DIR",
    "Rendered",
    "agent_configs",
    "agent_hostnames",
    "dns_label",
    "pick_rule",
    "render",
    "render_compose",
    "render_k8s",
    "render_prometheus",
    "secret_name",
    "tls_config",
    "tls_files",
    "write_tls_dir",
]


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
