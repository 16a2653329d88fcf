"""``render --format compose``: a Docker Compose project, one service per agent (the docker backend
runs the same agent configs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.plan import RunPlan
from orchestrator.render.common import (
    AGENT_PORT,
    DEFAULT_IMAGE,
    HEALTH_PORT,
    IMAGE_UID,
    METRICS_PORT,
    TLS_DIR,
    Rendered,
    agent_configs,
    agent_hostnames,
    dump,
    pick_rule,
    write_tls_dir,
)
from orchestrator.tls import RunCerts


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
        path.write_text(dump(configs[agent.id]))
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
        f"(rendered by mtl-orchestrate render)\n" + dump(compose)
    )
    files.insert(0, path)
    return Rendered(files, f"docker compose -f {path} up -d")
