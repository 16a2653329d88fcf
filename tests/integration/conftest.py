"""Integration tests: real daemons in subprocesses and real gRPC, loopback only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# The helpers (daemons.py, fake_peer.py) live next to the tests; make them importable however
# pytest was invoked.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/cli_helpers.py

from daemons import TestCA, shared_ca


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    """Whatever a test started, it must have stopped: no child process outlives the test."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    described = [f"{p.pid}: {' '.join(p.cmdline())}" for p in left]
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {described}"


@pytest.fixture(scope="session")
def ca() -> TestCA:
    """The CA every daemon of this test session gets its certificate from (daemons.shared_ca)."""
    return shared_ca()
