"""``render --format prometheus``: a scrape config for the agents of a run, as a backend runs them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mtl_node.core.errors import ConfigError
from orchestrator.plan import RunPlan
from orchestrator.render.common import (
    DEFAULT_NAMESPACE,
    METRICS_PORT,
    PROMETHEUS_BACKENDS,
    Rendered,
    agent_hostnames,
    dns_label,
    dump,
)


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
        f"# {plan.name}: scrape config, {backend} backend (mtl-orchestrate render)\n" + dump(config)
    )
    return Rendered([path], f"prometheus --config.file={path}")
