"""``certs``, ``render`` and ``report``: the commands that write files and run nothing: certificates
for a topology, deployment manifests (compose, Kubernetes, a Prometheus scrape config), and the plots
and report of a results directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtl_node.core.errors import ConfigError, MTLError
from orchestrator.cli.common import app, certs_for_run, fail, load_plan


@app.command("certs")
def certs_command(
    topology: Annotated[Path, typer.Argument(help="topology YAML file (its agents get certificates)")],
    out: Annotated[Path, typer.Option(help="directory to write the CA, agent and operator files to")],
    force: Annotated[bool, typer.Option(help="replace certificates that exist")] = False,
    days: Annotated[float, typer.Option(help="validity of agent and operator certificates, days")] = 365,
    trust_domain: Annotated[str, typer.Option(help="SPIFFE trust domain")] = "resilient-mtl",
    operator: Annotated[str, typer.Option(help="name in the operator's identity")] = "operator",
) -> None:
    """Make a CA, a certificate + key per agent and an operator certificate for TOPOLOGY.

    Files: ca.pem (+ ca.key, to issue more), <id>.pem/<id>.key, operator.pem/operator.key; keys
    are mode 0600. Identities: spiffe://TRUST_DOMAIN/agent/<id> (with DNS SAN
    <id>.agent.TRUST_DOMAIN) and spiffe://TRUST_DOMAIN/operator/OPERATOR.
    """
    from mtl_node.ca import make_certs

    try:
        if days <= 0:
            raise ConfigError("--days", f"{days} is not positive")
        plan = load_plan(topology, None, None, None)
        written = make_certs(
            out,
            [a.id for a in plan.agents],
            trust_domain=trust_domain,
            days=days,
            force=force,
            operator=operator,
        )
    except MTLError as exc:
        raise fail(exc) from None
    except OSError as exc:
        raise fail(ConfigError("--out", f"cannot write {exc.filename}: {exc.strerror}")) from None
    typer.echo(f"{len(written)} files in {out} (trust domain {trust_domain}, agents {len(plan.agents)})")


@app.command()
def render(
    topology: Annotated[Path, typer.Argument(help="topology YAML file")],
    format: Annotated[str, typer.Option("--format", help="compose, k8s or prometheus (a scrape config)")],
    out: Annotated[Path, typer.Option(help="directory to write the manifests to")],
    image: Annotated[str, typer.Option(help="agent image (push it where the cluster can pull it)")] = (
        "resilient-mtl-node:latest"
    ),
    rule: Annotated[str | None, typer.Option(help="the rule to deploy (default: the file's first)")] = None,
    namespace: Annotated[str, typer.Option(help="k8s: namespace of every object")] = "resilient-mtl",
    seed: Annotated[int | None, typer.Option(help="override the topology's seed")] = None,
    rounds: Annotated[int | None, typer.Option(help="override the number of rounds")] = None,
    backend: Annotated[str, typer.Option(help="prometheus: targets for local, docker or k8s")] = "local",
    metrics_port: Annotated[
        int, typer.Option(help="prometheus, local: the -o metrics_port of `up` (process k: PORT+k)")
    ] = 9464,
    processes: Annotated[int | None, typer.Option(help="prometheus, local: the --processes of `up`")] = None,
    scrape_interval: Annotated[str, typer.Option(help="prometheus: scrape interval")] = "15s",
    certs: Annotated[
        Path | None, typer.Option(help="certificates (mtl-orchestrate certs); default: a new CA in OUT/certs")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plaintext gRPC, no identities (opt-out)")
    ] = False,
    trust_domain: Annotated[str | None, typer.Option(help="SPIFFE trust domain of a new CA")] = None,
) -> None:
    """Write deployment manifests for TOPOLOGY: a compose project or Kubernetes objects.

    With TLS (the default) each agent's certificate and key go into its own Kubernetes Secret, or
    into OUT/tls/<id>/ for compose; keep OUT private (docs/deployment.md: or let cert-manager
    issue them).
    """
    from orchestrator.render import render as render_plan

    try:
        plan = load_plan(topology, seed, rounds, None)
        run_certs = certs_for_run(plan, out, certs, insecure, trust_domain)
        rendered = render_plan(
            plan,
            format,
            out,
            image=image,
            rule=rule,
            namespace=namespace,
            certs=run_certs,
            backend=backend,
            metrics_port=metrics_port,
            processes=processes,
            scrape_interval=scrape_interval,
        )
    except MTLError as exc:
        raise fail(exc) from None
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for path in rendered.files:
        typer.echo(str(path))
    typer.echo(f"deploy with: {rendered.next_step}")


@app.command()
def report(out: Annotated[Path, typer.Argument(help="results directory")]) -> None:
    """Write the plots (PNG) and report.md for a results directory."""
    from orchestrator.report import write_report

    try:
        written = write_report(out)
    except MTLError as exc:
        raise fail(exc) from None
    for path in written:
        typer.echo(str(path))
