"""``sweep``: every cell of a grid of runs on the in-process engine, resumable, then heat-maps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mtl_node.core.errors import MTLError
from orchestrator.cli.common import app, fail, setup_cli_logging


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

    setup_cli_logging(log_level)
    try:
        EXECUTORS.get(executor, field="--executor")
        spec = load_sweep(sweep_file)
    except MTLError as exc:
        raise fail(exc) from None
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
        raise fail(exc) from None
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
