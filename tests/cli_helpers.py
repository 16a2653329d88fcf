"""What the tests that drive ``mtl-orchestrate`` as a user would share: running it, and finding the
processes a run left behind (tests/integration and tests/containers put this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

BIN = Path(sys.executable).parent
ORCHESTRATE = str(BIN / "mtl-orchestrate")


def orchestrate(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``mtl-orchestrate ARGS`` to its end; ``timeout`` only bounds a hang (the test fails then)."""
    return subprocess.run(
        [ORCHESTRATE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_orchestrate(
    *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``mtl-orchestrate ARGS`` in the background (the test follows, interrupts or kills it)."""
    return subprocess.Popen(
        [ORCHESTRATE, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def assert_same_statistics(
    summary: dict[str, Any], other: dict[str, Any], metrics: tuple[str, ...] = ("loss", "test_loss")
) -> None:
    """Two summary.json dicts give every rule the same mean/min/max of ``metrics`` (to 1e-9 relative:
    the vectorized in-process engine sums in another order than the daemons, last-bit differences)."""
    for rule, stats in summary["rules"].items():
        for metric in metrics:
            for key in ("mean", "min", "max"):
                assert stats[metric][key] == pytest.approx(
                    other["rules"][rule][metric][key], rel=1e-9, abs=1e-12
                ), (rule, metric, key)


def processes_mentioning(text: str | Path, *, cwd: bool = False) -> list[psutil.Process]:
    """Live processes whose command line mentions ``text`` (agent hosts get their config from a run's
    directory), or with ``cwd`` whose working directory does (the ssh backend's remote daemons)."""
    text = str(text)
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            where = (proc.info["cwd"] or "") if cwd else ""
            if (text in cmdline or text in where) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found
