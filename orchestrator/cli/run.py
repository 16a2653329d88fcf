"""``up`` and ``attach``: deploy a topology (or follow a run whose ``up`` died) to its end, then the
summary table and the report; ``--detach`` re-runs ``up`` in the background."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from mtl_node.core.errors import ConfigError, MTLError
from orchestrator.cli.common import (
    DEPLOYMENT_FILE,
    app,
    certs_for_run,
    fail,
    load_plan,
    parse_options,
    setup_cli_logging,
)
from orchestrator.plan import RunPlan


def refuse_in_process_only(plan: RunPlan) -> None:
    """Attacks that read their victims' data (adaptive's ``omniscient: true``) run only on the sim
    backend; every daemon would refuse them (mtl_node.attack_api.Attack.check_network), so say so
    once, before anything starts."""
    for agent in plan.agents:
        if agent.attack is not None and agent.attack_params.get("omniscient") is True:
            raise ConfigError(
                "byzantine.attack_params.omniscient",
                f"agent {agent.id}: attack {agent.attack} reads its victims' data, which only the "
                "in-process engine can do",
                "run it with --backend sim, or drop omniscient",
            )


@app.command()
def up(
    topology: Annotated[Path, typer.Argument(help="topology YAML file")],
    backend: Annotated[str, typer.Option(help="sim, local, docker, ssh or k8s")] = "local",
    out: Annotated[Path | None, typer.Option(help="results directory")] = None,
    seed: Annotated[int | None, typer.Option(help="override the topology's seed")] = None,
    rounds: Annotated[int | None, typer.Option(help="override the number of rounds")] = None,
    rule: Annotated[list[str] | None, typer.Option(help="rule(s) to run instead of the file's")] = None,
    processes: Annotated[int | None, typer.Option(help="local: agent processes to spread over")] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="backend option KEY=VALUE (sim: engine=auto|batched|per-agent; local: metrics_port; "
            "docker: image, agents_per_container; "
            "ssh: ssh_config, remote_command, remote_dir; k8s: image, namespace, kubectl)",
        ),
    ] = None,
    detach: Annotated[bool, typer.Option(help="run in the background; see status/logs/down")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="write plots and report.md at the end")] = True,
    certs: Annotated[
        Path | None,
        typer.Option(help="certificates (mtl-orchestrate certs); default: a new CA in OUT/certs"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plaintext gRPC, no identities (opt-out)")
    ] = False,
    trust_domain: Annotated[str | None, typer.Option(help="SPIFFE trust domain of a new CA")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    log_format: Annotated[str, typer.Option(help="text, or json (one JSON object a line)")] = "text",
) -> None:
    """Deploy TOPOLOGY, run every rule to the last round, write results and plots.

    Agents talk mutual TLS: with a CA made for the run under OUT/certs, or the certificates in
    --certs DIR; --insecure runs them on plaintext.
    """
    from orchestrator.backends import BACKENDS

    setup_cli_logging(log_level, log_format)
    try:
        BACKENDS.get(backend, field="--backend")
        if processes is not None and processes < 1:
            raise ConfigError("--processes", f"{processes} is below 1", "give 1 or more agent processes")
        plan = load_plan(topology, seed, rounds, rule)
        backend_options = parse_options(option or [])
        if backend != "sim":
            refuse_in_process_only(plan)
    except MTLError as exc:
        raise fail(exc) from None
    if out is None:
        out = Path("results") / f"{plan.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()) and not (out / DEPLOYMENT_FILE).exists():
        raise fail(ConfigError("--out", f"{out} exists and is not empty", "choose a new directory"))
    if (out / "progress.json").exists():
        # Its agents' state directories would be resumed: a run there is continued with `attach`.
        raise fail(
            ConfigError("--out", f"{out} holds a run already", "`attach` continues it, or choose another")
        )
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)

    if detach:
        _detach(sys.argv[1:], out)
        return

    from orchestrator.runner import run_plan

    run_certs = None
    if backend != "sim":
        try:
            run_certs = certs_for_run(plan, out, certs, insecure, trust_domain)
        except MTLError as exc:
            raise fail(exc) from None
    typer.echo(
        f"{plan.name}: {len(plan.agents)} agents ({len(plan.agents) - len(plan.normal_ids)} Byzantine), "
        f"{plan.rounds} rounds, rules {', '.join(plan.rules)}, backend {backend} -> {out}"
    )
    options = {**backend_options, **({"processes": processes} if processes else {})} or None
    from orchestrator.deployment import write_deployment

    # Before any agent starts: status/attach/down work from here even if this process dies.
    write_deployment(out, backend, options)
    _run_to_the_end(
        lambda: run_plan(
            plan,
            backend=backend,
            out=out,
            show_progress=progress,
            backend_options=options,
            certs=run_certs,
            insecure=insecure,
        ),
        out,
        report,
    )


def _run_to_the_end(run: Callable[[], dict[str, Any]], out: Path, report: bool) -> None:
    """`up` and `attach`: follow a run to its end, then summary and report; Ctrl-C exits 130,
    lost agents exit 1, a user mistake exits 2 with one line."""
    from orchestrator.runner import LostAgents

    try:
        summary = run()
    except KeyboardInterrupt:
        typer.echo("interrupted: every agent was stopped", err=True)
        raise typer.Exit(130) from None
    except LostAgents as exc:
        typer.echo(f"mtl-orchestrate: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except MTLError as exc:
        raise fail(exc) from None
    _finish(summary, out, report)


def _finish(summary: dict[str, Any], out: Path, report: bool) -> None:
    _print_summary(summary)
    if report:
        from orchestrator.report import write_report

        written = write_report(out)
        typer.echo(f"report: {', '.join(str(p) for p in written)}")


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    first, last = summary["window"]
    table = Table(title=f"{summary['topology']}: normal agents, rounds {first}-{last}")
    table.add_column("rule")
    metrics = sorted({m for r in summary["rules"].values() for m in r if isinstance(r[m], dict)})
    for m in metrics:
        table.add_column(f"{m} mean [min, max]")
    for rule, stats in summary["rules"].items():
        cells = []
        for m in metrics:
            s = stats.get(m)
            cells.append("-" if not s else f"{s['mean']:.4g} [{s['min']:.3g}, {s['max']:.3g}]")
        table.add_row(rule, *cells)
    Console().print(table)
    typer.echo(f"wall time: {summary['wall_seconds']:.1f}s")


def _detach(argv: list[str], out: Path) -> None:
    """Re-run this command in a new session without --detach; remember its pid in OUT."""
    out.mkdir(parents=True, exist_ok=True)
    args = [a for a in argv if a != "--detach"]
    if "--out" not in args:
        args += ["--out", str(out)]
    args += ["--no-progress"]
    log_file = open(out / "orchestrator.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    from orchestrator.deployment import write_deployment

    write_deployment(out, "detached", {"argv": args}, pid=proc.pid)  # the child rewrites it
    typer.echo(f"started in the background (pid {proc.pid}); results in {out}")
    typer.echo(f"  mtl-orchestrate status {out}   mtl-orchestrate logs {out}   mtl-orchestrate down {out}")


@app.command()
def attach(
    out: Annotated[Path, typer.Argument(help="results directory of a run whose `up` died")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="write plots and report.md at the end")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Follow a run to its end and collect it, as if `up` had never died (local backend)."""
    from orchestrator.deployment import attach as attach_run

    setup_cli_logging(log_level)
    _run_to_the_end(lambda: attach_run(out, show_progress=progress), out, report)
