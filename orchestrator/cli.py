"""``mtl-orchestrate``: deploy a topology, follow it, collect results, draw the paper's plots."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from mtl_node.errors import ConfigError, MTLError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy and run a Byzantine-resilient multi-task network from a topology file.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"mtl-orchestrate: error: {exc}", err=True)
    return typer.Exit(2)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from mtl_node.logs import setup_logging

    try:
        setup_logging(level, fmt)
    except ConfigError as exc:
        raise _fail(exc) from None


def load_plan(topology: Path, seed: int | None, rounds: int | None, rules: list[str] | None):  # type: ignore[no-untyped-def]
    from orchestrator.planner import plan_topology
    from orchestrator.spec import apply_overrides, load_topology

    spec = load_topology(topology)
    spec = apply_overrides(spec, seed=seed, rounds=rounds, rules=rules)
    return plan_topology(spec)


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

    _setup_logging(log_level, log_format)
    try:
        BACKENDS.get(backend, field="--backend")
        if processes is not None and processes < 1:
            raise ConfigError("--processes", f"{processes} is below 1", "give 1 or more agent processes")
        plan = load_plan(topology, seed, rounds, rule)
        backend_options = _parse_options(option or [])
    except MTLError as exc:
        raise _fail(exc) from None
    if out is None:
        out = Path("results") / f"{plan.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()) and not (out / DEPLOYMENT_FILE).exists():
        raise _fail(ConfigError("--out", f"{out} exists and is not empty", "choose a new directory"))
    if (out / "progress.json").exists():
        # Its agents' state directories would be resumed: a run there is continued with `attach`.
        raise _fail(
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
            run_certs = _run_certs(plan, out, certs, insecure, trust_domain)
        except MTLError as exc:
            raise _fail(exc) from None
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
        raise _fail(exc) from None
    _finish(summary, out, report)


def _finish(summary: dict[str, Any], out: Path, report: bool) -> None:
    _print_summary(summary)
    if report:
        from orchestrator.report import write_report

        written = write_report(out)
        typer.echo(f"report: {', '.join(str(p) for p in written)}")


def _run_certs(plan: Any, out: Path, certs: Path | None, insecure: bool, trust_domain: str | None) -> Any:
    """The run's certificates (orchestrator.tls.RunCerts), or None with --insecure."""
    from orchestrator.tls import run_certs

    if insecure:
        if certs is not None:
            raise ConfigError("--insecure", "given together with --certs", "use one or the other")
        log.warning("--insecure: agents talk plaintext gRPC without identities")
        return None
    return run_certs(out, [a.id for a in plan.agents], certs, trust_domain)


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
    from mtl_node.identity import make_certs

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
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(ConfigError("--out", f"cannot write {exc.filename}: {exc.strerror}")) from None
    typer.echo(f"{len(written)} files in {out} (trust domain {trust_domain}, agents {len(plan.agents)})")


def _parse_options(items: list[str]) -> dict[str, Any]:
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
        run_certs = _run_certs(plan, out, certs, insecure, trust_domain)
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
        raise _fail(exc) from None
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for path in rendered.files:
        typer.echo(str(path))
    typer.echo(f"deploy with: {rendered.next_step}")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(metavar="SWEEP", help="sweep YAML file")],
    out: Annotated[Path, typer.Option(help="results directory (rerun with the same one to resume)")],
    executor: Annotated[str, typer.Option(help="local (worker processes) or ray")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="local: worker processes (default: CPUs); ray: cells in flight")
    ] = None,
    address: Annotated[str | None, typer.Option(help="ray: cluster address, e.g. 10.0.0.1:6379")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="write heat-maps and report.md at the end")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Run every cell of a SWEEP grid (tasks x topologies x rules x attacks x fractions x seeds) on
    the in-process engine; resumable; writes results.csv, heat-maps and report.md."""
    from orchestrator.sweep.executors import EXECUTORS
    from orchestrator.sweep.spec import load_sweep

    _setup_logging(log_level)
    try:
        EXECUTORS.get(executor, field="--executor")
        spec = load_sweep(sweep_file)
    except MTLError as exc:
        raise _fail(exc) from None
    from orchestrator.sweep.runner import run_sweep

    cells = spec.cells()
    typer.echo(f"{spec.name}: {len(cells)} cells, executor {executor} -> {out}")
    try:
        outcome = run_sweep(
            spec, out, executor=executor, workers=workers, address=address, show_progress=progress
        )
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: finished cells are kept in {out}; rerun the same command to resume", err=True
        )
        raise typer.Exit(130) from None
    except MTLError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"{outcome.ran} cells run, {outcome.skipped} already done, {len(outcome.failed)} failed "
        f"in {outcome.wall_seconds:.1f} s; {len(outcome.table)} rows"
    )
    written = list(outcome.written)
    if report:
        from orchestrator.sweep.report import write_report

        command = (
            " ".join(["mtl-orchestrate", "sweep", *sys.argv[2:]])
            if len(sys.argv) > 2
            else "mtl-orchestrate sweep"
        )
        written += write_report(out, spec, outcome.table, command=command, wall_seconds=outcome.wall_seconds)
    typer.echo(f"written: {', '.join(str(p) for p in written)}")
    if outcome.failed:
        for cell_id, error in list(outcome.failed.items())[:5]:
            typer.echo(f"cell {cell_id} failed: {error}", err=True)
        typer.echo(f"{len(outcome.failed)} cells failed; rerun to retry them", err=True)
        raise typer.Exit(1)


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
def status(out: Annotated[Path, typer.Argument(help="results directory of a run")]) -> None:
    """Show whether a run is still going and how far it got (works after `up` died)."""
    from orchestrator.deployment import orchestrator_alive, read_deployment, running_agents

    try:
        dep = read_deployment(out)
        agents = running_agents(out)
    except MTLError as exc:
        raise _fail(exc) from None
    progress_path = out / "progress.json"
    if dep is None and not progress_path.exists():
        raise _fail(ConfigError("DIR", f"{out} holds no run", "give the --out directory of `up`"))
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    alive = orchestrator_alive(dep)
    state = progress.get("state", "starting")
    if not alive and state in ("running", "starting"):
        # Nobody updates progress.json any more: never report a dead run as running.
        state = "orphaned (orchestrator died; `attach` finishes it, `down` stops it)" if agents else "stopped"
    pid = dep.get("pid") if dep else "?"
    typer.echo(f"state: {state} (orchestrator pid {pid} {'running' if alive else 'gone'})")
    typer.echo(f"agent processes running: {len(agents)}")
    current = progress.get("current")
    if current:
        loss = current["mean_loss"]
        typer.echo(
            f"rule {current['rule']}: round {current['round']}/{current['rounds']}, "
            f"mean loss {'-' if loss is None else f'{loss:.4g}'}, accepted {current['accepted']:.1f}, "
            f"filtered {current['filtered']:.1f}, missing {current['missing']:.1f}"
        )
    if progress.get("lost_agents"):
        typer.echo(f"lost agents: {progress['lost_agents']}")


@app.command()
def attach(
    out: Annotated[Path, typer.Argument(help="results directory of a run whose `up` died")],
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="write plots and report.md at the end")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Follow a run to its end and collect it, as if `up` had never died (local backend)."""
    from orchestrator.deployment import attach as attach_run

    _setup_logging(log_level)
    _run_to_the_end(lambda: attach_run(out, show_progress=progress), out, report)


@app.command()
def logs(
    out: Annotated[Path, typer.Argument(help="results directory")],
    tail: Annotated[int, typer.Option(help="lines from the end of each log")] = 20,
) -> None:
    """Print the tail of the orchestrator's and the agent processes' logs."""
    files = [out / "orchestrator.log", *sorted((out / "work").glob("*/host-*.log"))]
    found = [f for f in files if f.exists()]
    if not found:
        raise _fail(ConfigError("DIR", f"no logs under {out}", "give the --out directory of a run"))
    for f in found:
        lines = f.read_text(errors="replace").splitlines()[-tail:]
        typer.echo(f"==> {f} <==")
        for line in lines:
            typer.echo(line)


@app.command()
def down(
    out: Annotated[Path, typer.Argument(help="results directory of a run")],
    timeout: Annotated[float, typer.Option(help="seconds to wait before killing")] = 20.0,
) -> None:
    """Stop a run: its orchestrator and every agent process it started, and nothing else.

    A listed pid is signalled only if its start time and command line match the record."""
    from orchestrator.deployment import orchestrator_alive, read_deployment, running_agents, stop_verified

    try:
        dep = read_deployment(out)
        if dep is None and not (out / "work").is_dir():
            raise ConfigError("DIR", f"{out} holds no run", "give the --out directory of `up`")
    except MTLError as exc:
        raise _fail(exc) from None
    if dep is not None and orchestrator_alive(dep):
        stop_verified([dep], timeout)  # it stops its own agents on SIGTERM
    stopped = stop_verified(running_agents(out), timeout)
    if list(out.glob("work/*/containers.json")):  # a docker run: its containers restart themselves
        from orchestrator.backends.docker import remove_recorded_runs

        stopped += remove_recorded_runs(out)
    progress_path = out / "progress.json"
    if progress_path.exists():
        progress = json.loads(progress_path.read_text())
        if progress.get("state") in ("running", "starting"):
            progress["state"] = "stopped"
            from orchestrator.backends.common import write_atomic

            write_atomic(progress_path, json.dumps(progress))
    typer.echo(f"stopped {out}" + (f" ({stopped} orphaned agent processes or containers)" if stopped else ""))


@app.command()
def report(out: Annotated[Path, typer.Argument(help="results directory")]) -> None:
    """Write the plots (PNG) and report.md for a results directory."""
    from orchestrator.report import write_report

    try:
        written = write_report(out)
    except MTLError as exc:
        raise _fail(exc) from None
    for path in written:
        typer.echo(str(path))


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


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (from `down`) unwinds like Ctrl-C so every backend stops its agents.
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    main()
