"""``mtl-orchestrate``: deploy a topology, follow it, collect results, draw the paper's plots."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
            help="backend option KEY=VALUE (local: metrics_port; docker: image, agents_per_container; "
            "ssh: ssh_config, remote_command, remote_dir; k8s: image, namespace, kubectl)",
        ),
    ] = None,
    detach: Annotated[bool, typer.Option(help="run in the background; see status/logs/down")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="write plots and report.md at the end")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Deploy TOPOLOGY, run every rule to the last round, write results and plots."""
    from orchestrator.backends import BACKENDS

    _setup_logging(log_level)
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
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)

    if detach:
        _detach(sys.argv[1:], out)
        return

    from orchestrator.runner import run_plan

    typer.echo(
        f"{plan.name}: {len(plan.agents)} agents ({len(plan.agents) - len(plan.normal_ids)} Byzantine), "
        f"{plan.rounds} rounds, rules {', '.join(plan.rules)}, backend {backend} -> {out}"
    )
    options = {**backend_options, **({"processes": processes} if processes else {})} or None
    try:
        summary = run_plan(plan, backend=backend, out=out, show_progress=progress, backend_options=options)
    except KeyboardInterrupt:
        typer.echo("interrupted: every agent was stopped", err=True)
        raise typer.Exit(130) from None
    except MTLError as exc:
        raise _fail(exc) from None
    _print_summary(summary)
    if report:
        from orchestrator.report import write_report

        written = write_report(out)
        typer.echo(f"report: {', '.join(str(p) for p in written)}")


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
) -> None:
    """Write deployment manifests for TOPOLOGY: a compose project, Kubernetes objects, or a
    Prometheus scrape config for its agents."""
    from orchestrator.render import render as render_plan

    try:
        plan = load_plan(topology, seed, rounds, None)
        rendered = render_plan(
            plan,
            format,
            out,
            image=image,
            rule=rule,
            namespace=namespace,
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
    (out / DEPLOYMENT_FILE).write_text(
        json.dumps({"pid": proc.pid, "argv": args, "started": time.time()}, indent=1)
    )
    typer.echo(f"started in the background (pid {proc.pid}); results in {out}")
    typer.echo(f"  mtl-orchestrate status {out}   mtl-orchestrate logs {out}   mtl-orchestrate down {out}")


def _read_deployment(out: Path) -> dict[str, Any]:
    path = out / DEPLOYMENT_FILE
    if not path.exists():
        raise ConfigError("DIR", f"{path} not found", "give the --out directory of `up --detach`")
    return json.loads(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


@app.command()
def status(out: Annotated[Path, typer.Argument(help="results directory of a detached run")]) -> None:
    """Show whether a detached run is still going and how far it got."""
    try:
        dep = _read_deployment(out)
    except MTLError as exc:
        raise _fail(exc) from None
    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    alive = _alive(dep["pid"])
    state = progress.get("state", "starting")
    if not alive and state == "running":
        state = "stopped"
    typer.echo(f"state: {state} (supervisor pid {dep['pid']} {'running' if alive else 'exited'})")
    current = progress.get("current")
    if current:
        loss = current["mean_loss"]
        typer.echo(
            f"rule {current['rule']}: round {current['round']}/{current['rounds']}, "
            f"mean loss {'-' if loss is None else f'{loss:.4g}'}, accepted {current['accepted']:.1f}, "
            f"filtered {current['filtered']:.1f}, missing {current['missing']:.1f}"
        )


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
    out: Annotated[Path, typer.Argument(help="results directory of a detached run")],
    timeout: Annotated[float, typer.Option(help="seconds to wait before killing")] = 20.0,
) -> None:
    """Stop a detached run and every agent it started."""
    try:
        dep = _read_deployment(out)
    except MTLError as exc:
        raise _fail(exc) from None
    pid = dep["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    # Agents whose supervisor died without cleaning up.
    for pids_file in (out / "work").glob("*/pids.json"):
        for agent_pid in json.loads(pids_file.read_text()):
            if _alive(agent_pid):
                os.kill(agent_pid, signal.SIGKILL)
    typer.echo(f"stopped {out}")


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
