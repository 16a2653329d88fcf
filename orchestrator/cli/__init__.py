"""``mtl-orchestrate``: deploy a topology, follow it, collect results, draw the paper's plots.

One module a group of commands, all on the one typer app of ``orchestrator.cli.common``:
``run`` (up, attach), ``artifacts`` (certs, render, report), ``sweep``, ``manage`` (status, logs,
down). Importing this package registers them all; ``main`` is the console script.
"""

from __future__ import annotations

import signal

from orchestrator.cli import artifacts, manage, run, sweep  # noqa: F401 - registers the commands
from orchestrator.cli.common import app, load_plan

__all__ = ["app", "load_plan", "main"]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (from `down`) unwinds like Ctrl-C so every backend stops its agents.
    signal.signal(signal.SIGTERM, _terminate)
    app()
