"""``mtl-orchestrate sweep --executor ray`` against a real two-node Ray cluster on loopback.

The test starts a head and a second node with ``ray start`` (one CPU each, small memory), runs a
small grid on it through the CLI and compares the table byte for byte with the local executor's.
Both nodes must have run cells. ``ray stop`` tears the cluster down in the finalizer.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.sweep.spec import parse_sweep

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
GRID: dict[str, Any] = {
    "name": "ray-small",
    "tasks": [{"task": "target-localization"}],
    "topologies": [{"name": "ring", "agents": 8, "graph": {"kind": "ring", "k": 2}}],
    "rules": ["none", "average", "loss-filtered"],
    "attacks": [{"attack": "constant", "params": {"low": 15.0, "high": 16.0}}],
    "fractions": [0.0, 0.25],
    "seeds": 2,
    "rounds": 60,
}
NODE = [
    "--node-ip-address=127.0.0.1",
    "--num-cpus=1",
    "--memory=1000000000",
    "--object-store-memory=100000000",
    "--disable-usage-stats",
]

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    if not HAVE_RAY:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed in CI (it is in the [dev] extra)")
        pytest.skip("ray is not installed: pip install -e '.[dev]' (or '.[ray]')")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # A short temp dir: Ray's unix sockets live under it (path length limit).
    temp = tempfile.mkdtemp(prefix="rmtl-ray-", dir="/tmp")
    try:
        head = _ray(
            "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *NODE
        )
        assert head.returncode == 0, head.stderr[-3000:]
        worker = _ray("start", f"--address={address}", *NODE)
        assert worker.returncode == 0, worker.stderr[-3000:]
        deadline = time.monotonic() + 180
        nodes = 0
        while time.monotonic() < deadline:
            status = _ray("status", f"--address={address}", timeout=60)
            active = status.stdout.split("Active:")[-1].split("Pending:")[0]
            nodes = len(re.findall(r"node_[0-9a-f]+", active))
            if nodes == 2:
                break
            time.sleep(1)
        assert nodes == 2, f"the second Ray node never joined: {status.stdout[-2000:]}"
        yield address
    finally:
        _ray("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


def _sweep(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            str(BIN / "mtl-orchestrate"),
            "sweep",
            str(spec),
            "--out",
            str(out),
            "--no-progress",
            "--no-report",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ray_cluster_gives_the_local_table(cluster: str, tmp_path: Path) -> None:
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    on_ray = _sweep(spec, tmp_path / "ray", "--executor", "ray", "--address", cluster, "--log-level", "info")
    _sweep(spec, tmp_path / "local", "--workers", "2")
    ray_csv = (tmp_path / "ray" / "results.csv").read_bytes()
    assert ray_csv == (tmp_path / "local" / "results.csv").read_bytes()
    assert ray_csv.count(b"\n") > 30
    # Both nodes ran cells.
    match = re.search(r"ray: (\d+) cells on (\d+) nodes", on_ray.stderr)
    assert match, on_ray.stderr[-3000:]
    assert match.groups() == (str(len(parse_sweep(GRID).cells())), "2")


def test_unreachable_ray_address_is_a_clear_error(cluster: str, tmp_path: Path) -> None:
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    done = subprocess.run(
        [str(BIN / "mtl-orchestrate"), "sweep", str(spec), "--out", str(tmp_path / "o"), "--no-progress",
         "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--address: cannot join the Ray cluster" in done.stderr
