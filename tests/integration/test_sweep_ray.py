"""``mtl-orchestrate sweep --executor ray`` against a real two-node Ray cluster on loopback.

The cluster (a head and a second node, one CPU each, small memory), the sweep that drives it and
``ray stop`` all run in one script inside private network, PID and mount namespaces (``unshare
--net --pid --mount-proc``, with only ``lo`` up): some Ray processes bind every interface whatever
``--node-ip-address`` says, and ``ray stop`` stops every Ray process of the user. Inside the
namespace there is nothing but loopback to bind or reach, and when the script ends every Ray
process it started ends with it. The table must equal the local executor's byte for byte, and both
nodes must have run cells.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
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
NODE = (
    "--node-ip-address=127.0.0.1 --num-cpus=1 --memory=1000000000 --object-store-memory=100000000"
    " --disable-usage-stats"
)

# A loopback-only test cluster: no token authentication. Ray >= 2.5x turns it on for a head when a
# token exists (~/.ray/auth_token, written by any earlier ray.init()), and a second node started
# from the CLI then fails to join; the driver (the sweep) must use the same mode.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}

# Runs as PID 1 of the new namespaces: $1 = bin dir, $2 = temp dir, $3 = sweep file, $4 = out dir.
CLUSTER_SCRIPT = f"""
set -eu
ip link set lo up
bin=$1; temp=$2; address=127.0.0.1:6379
"$bin/ray" start --head --port=6379 --include-dashboard=false --temp-dir="$temp" {NODE} >"$temp/head.log" 2>&1
"$bin/ray" start --address=$address {NODE} >"$temp/node.log" 2>&1
for _ in $(seq 180); do
    active=$("$bin/ray" status --address=$address 2>/dev/null | sed -n '/Active:/,/Pending:/p')
    [ "$(printf '%s' "$active" | grep -c 'node_')" = 2 ] && break
    sleep 1
done
if [ "$(printf '%s' "$active" | grep -c 'node_')" != 2 ]; then
    echo "the second Ray node never joined" >&2; exit 3
fi
"$bin/mtl-orchestrate" sweep "$3" --out "$4" --no-progress --no-report --log-level info \
    --executor ray --address $address
"$bin/ray" stop --force >/dev/null 2>&1 || true
"""

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False


def _need_ray() -> None:
    if HAVE_RAY and shutil.which("unshare") and shutil.which("ip"):
        return
    if os.environ.get("CI"):
        pytest.fail("ray (the [dev] extra), unshare and ip must be installed in CI")
    pytest.skip("needs ray (pip install -e '.[dev]'), and unshare + ip (util-linux, iproute2)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ray_cluster_gives_the_local_table(tmp_path: Path) -> None:
    _need_ray()
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    # A short temp dir: Ray's unix sockets live under it (path length limit).
    temp = tempfile.mkdtemp(prefix="rmtl-ray-", dir="/tmp")
    try:
        on_ray = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
             "bash", "-c", CLUSTER_SCRIPT, "cluster", str(BIN), temp, str(spec), str(tmp_path / "ray")],
            capture_output=True,
            text=True,
            timeout=900,
            env=ENV,
        )  # fmt: skip
        logs = "".join(p.read_text(errors="replace")[-1500:] for p in Path(temp).glob("*.log"))
        assert on_ray.returncode == 0, on_ray.stderr[-3000:] + logs
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    _sweep(spec, tmp_path / "local", "--workers", "2")
    ray_csv = (tmp_path / "ray" / "results.csv").read_bytes()
    assert ray_csv == (tmp_path / "local" / "results.csv").read_bytes()
    assert ray_csv.count(b"\n") > 30
    # Both nodes ran cells.
    match = re.search(r"ray: (\d+) cells on (\d+) nodes", on_ray.stderr)
    assert match, on_ray.stderr[-3000:]
    assert match.groups() == (str(len(parse_sweep(GRID).cells())), "2")


def test_unreachable_ray_address_is_a_clear_error(tmp_path: Path) -> None:
    _need_ray()
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    # In a network namespace of its own too: Ray's driver looks for its own address by reaching out.
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec "$@"', "sweep",
         str(BIN / "mtl-orchestrate"), "sweep", str(spec), "--out", str(tmp_path / "o"), "--no-progress",
         "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--address: cannot join the Ray cluster" in done.stderr
