"""``status``, ``logs`` and ``down``: look at and stop a run from its results directory alone, so
they work after the ``up`` that started it died (DESIGN §5 "Crash-only")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mtl_node.core.errors import ConfigError, MTLError
from orchestrator.cli.common import app, fail


@app.command()
def status(out: Annotated[Path, typer.Argument(help="results directory of a run")]) -> None:
    """Show whether a run is still going and how far it got (works after `up` died)."""
    from orchestrator.deployment import orchestrator_alive, read_deployment, running_agents

    try:
        dep = read_deployment(out)
        agents = running_agents(out)
    except MTLError as exc:
        raise fail(exc) from None
    progress_path = out / "progress.json"
    if dep is None and not progress_path.exists():
        raise fail(ConfigError("DIR", f"{out} holds no run", "give the --out directory of `up`"))
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
def logs(
    out: Annotated[Path, typer.Argument(help="results directory")],
    tail: Annotated[int, typer.Option(help="lines from the end of each log")] = 20,
) -> None:
    """Print the tail of the orchestrator's and the agent processes' logs."""
    files = [out / "orchestrator.log", *sorted((out / "work").glob("*/host-*.log"))]
    found = [f for f in files if f.exists()]
    if not found:
        raise fail(ConfigError("DIR", f"no logs under {out}", "give the --out directory of a run"))
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
        raise fail(exc) from None
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
