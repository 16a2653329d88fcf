"""What every ``mtl-orchestrate`` command shares: the typer app, the one-line error, loading a plan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from mtl_node.core.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy and run a Byzantine-resilient multi-task network from a topology file.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"


def fail(exc: Exception) -> typer.Exit:
    typer.echo(f"mtl-orchestrate: error: {exc}", err=True)
    return typer.Exit(2)


def setup_cli_logging(level: str, fmt: str = "text") -> None:
    from mtl_node.logs import setup_logging

    try:
        setup_logging(level, fmt)
    except ConfigError as exc:
        raise fail(exc) from None


def load_plan(topology: Path, seed: int | None, rounds: int | None, rules: list[str] | None):  # type: ignore[no-untyped-def]
    from orchestrator.planner import plan_topology
    from orchestrator.spec import apply_overrides, load_topology

    spec = load_topology(topology)
    spec = apply_overrides(spec, seed=seed, rounds=rounds, rules=rules)
    return plan_topology(spec)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` items; values stay strings (each backend converts what it reads)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                "--option", f"{item!r} is not KEY=VALUE", "e.g. -o image=resilient-mtl-node:latest"
            )
        out[key.strip()] = value
    return out


def certs_for_run(plan: Any, out: Path, certs: Path | None, insecure: bool, trust_domain: str | None) -> Any:
    """The run's certificates (orchestrator.tls.RunCerts), or None with --insecure."""
    from orchestrator.tls import run_certs

    if insecure:
        if certs is not None:
            raise ConfigError("--insecure", "given together with --certs", "use one or the other")
        log.warning("--insecure: agents talk plaintext gRPC without identities")
        return None
    return run_certs(out, [a.id for a in plan.agents], certs, trust_domain)
