"""Prometheus metrics of real daemons: every agent's endpoint (``--metrics-listen``) tells the rounds
it completed, its fetches by outcome, bytes both ways and its neighbour decisions, next to the
standard process metrics, with only bounded labels; and a real Prometheus server scrapes a local
run through the config ``mtl-orchestrate render --format prometheus`` writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from daemons import AgentSpec, DaemonSet
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent.parent
ALLOWED_LABELS = {"agent", "neighbor", "outcome", "decision", "kind", "method", "code", "le"}
# Labels of the standard python_info and GC collectors.
PLATFORM_LABELS = {"implementation", "major", "minor", "patchlevel", "version", "generation"}


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metrics_address(stdout: str) -> str:
    match = re.search(r"mtl-node: metrics on (\S+)", stdout)
    assert match, stdout
    return match.group(1)


def test_daemon_metrics_count_rounds_fetches_and_bytes(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    rounds = 12
    specs = [AgentSpec(a, [n for n in ids if n != a]) for a in ids]
    with DaemonSet(tmp_path, specs, rounds, seed=4, common_args=["--metrics-listen", "127.0.0.1:0"]) as ds:
        ds.wait_done()
        for a in ids:
            samples = scrape(metrics_address(ds[a].stdout_path.read_text()))
            agent = (("agent", a),)
            assert samples[("mtl_rounds_completed_total", agent)] == rounds
            assert samples[("mtl_round", agent)] == rounds
            assert samples[("mtl_round_duration_seconds_count", agent)] == rounds
            for n in ids:
                if n != a:
                    key = ("mtl_fetches_total", (("agent", a), ("neighbor", n), ("outcome", "ok")))
                    assert samples[key] == rounds
            assert samples[("mtl_received_bytes_total", agent)] > 0
            assert samples[("mtl_served_bytes_total", agent)] > 0
            decisions = {
                d: samples[("mtl_neighbor_decisions_total", (("agent", a), ("decision", d)))]
                for d in ("accepted", "filtered", "missing")
            }
            assert sum(decisions.values()) == rounds * (len(ids) - 1)
            assert decisions["missing"] == 0
            assert samples[("mtl_agent_starts_total", (("agent", a), ("kind", "start")))] == 1
            assert ("process_resident_memory_bytes", ()) in samples
            labels = {k for _, ls in samples for k, _ in ls}
            assert labels <= ALLOWED_LABELS | {
                "implementation",
                "major",
                "minor",
                "patchlevel",
                "version",
                "generation",
            }


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s1:
            s1.bind(("127.0.0.1", 0))
            base = s1.getsockname()[1]
            if base >= 65535:
                continue
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise AssertionError("no two consecutive free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "the prometheus binary is not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return found


def query(prom: str, expr: str) -> dict[str, float]:
    url = f"http://{prom}/api/v1/query?query={urllib.parse.quote(expr)}"
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return {r["metric"].get("agent", ""): float(r["value"][1]) for r in reply["data"]["result"]}


TOPOLOGY = """
name: prom-e2e
task: target-localization
agents: 4
graph: complete
rules: [loss-filtered]
rounds: 1000000
seed: 3
"""


def test_prometheus_scrapes_a_local_run_through_the_rendered_config(tmp_path: Path) -> None:
    binary = prometheus_binary()
    topology = tmp_path / "prom.yaml"
    topology.write_text(TOPOLOGY)
    base = _free_port_pair()
    rendered = subprocess.run(
        [
            str(BIN / "mtl-orchestrate"),
            "render",
            str(topology),
            "--format",
            "prometheus",
            "--out",
            str(tmp_path / "prom"),
            "--backend",
            "local",
            "--metrics-port",
            str(base),
            "--processes",
            "2",
            "--scrape-interval",
            "1s",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr
    config = tmp_path / "prom" / "prometheus.yml"
    prom = f"127.0.0.1:{_free_port()}"
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={prom}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    up = subprocess.Popen(
        [
            str(BIN / "mtl-orchestrate"),
            "up",
            str(topology),
            "--backend",
            "local",
            "--processes",
            "2",
            "-o",
            f"metrics_port={base}",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--no-report",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "up.log", "wb"),  # noqa: SIM115
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 240
        first: dict[str, float] = {}
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                first = query(prom, "mtl_rounds_completed_total")
            except OSError:
                first = {}
            if len(first) == 4 and min(first.values()) >= 3:
                break
            assert time.monotonic() < deadline, f"Prometheus has {first}"
            time.sleep(1)
        assert set(first) == {"a0", "a1", "a2", "a3"}
        # Live: a later scrape sees every agent further on.
        while True:
            later = query(prom, "mtl_rounds_completed_total")
            if all(later.get(a, 0) > first[a] for a in first):
                break
            assert time.monotonic() < deadline, f"no progress: {first} -> {later}"
            time.sleep(1)
        jobs = query(prom, "up")
        assert jobs and all(v == 1 for v in jobs.values()), jobs
    finally:
        for proc in (up, prometheus):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (up, prometheus):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        prom_log.close()
