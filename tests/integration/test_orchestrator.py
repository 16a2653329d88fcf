"""mtl-orchestrate end to end: real CLI, real agent processes, real gRPC on loopback."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from cli_helpers import assert_same_statistics, orchestrate, processes_mentioning, start_orchestrate

pytestmark = pytest.mark.integration

TOPOLOGY = """
name: e2e
task: target-localization
agents: 6
graph: {kind: ring, k: 2}
byzantine: {ids: [a5], attack: constant}
rules: [none, loss-filtered]
rounds: 30
seed: 3
"""


@pytest.fixture
def topology(tmp_path: Path) -> Path:
    path = tmp_path / "e2e.yaml"
    path.write_text(TOPOLOGY)
    return path


def test_up_local_writes_results_and_leaves_nothing_behind(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "local"
    done = orchestrate("up", str(topology), "--backend", "local", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert processes_mentioning(out) == []

    for name in ("metrics.csv", "decisions.csv", "summary.json", "plan.json"):
        assert (out / name).stat().st_size > 0, name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["round", "agent", "role", "rule", "loss", "test_loss", "test_accuracy"]
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 * 30 * 2  # agents x rounds x rules: nothing lost
    decisions = (out / "decisions.csv").read_text()
    assert ",a5," in decisions and "filtered" in decisions

    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "local" and summary["rounds"] == 30 and summary["seed"] == 3
    assert summary["window"] == [25, 30]
    assert set(summary["rules"]) == {"none", "loss-filtered"}

    report = orchestrate("report", str(out))
    assert report.returncode == 0, report.stderr
    for png in ("loss.png", "network.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss-filtered" in (out / "report.md").read_text()

    # The same seeded topology in one process gives the same statistics.
    sim_out = tmp_path / "sim"
    sim = orchestrate("up", str(topology), "--backend", "sim", "--out", str(sim_out), "--no-progress")
    assert sim.returncode == 0, sim.stderr
    sim_summary = json.loads((sim_out / "summary.json").read_text())
    assert_same_statistics(summary, sim_summary)


def test_ctrl_c_stops_every_agent(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = start_orchestrate(
        "up", str(topology), "--backend", "local", "--out", str(out), "--no-progress",
        "--rounds", "100000", "--rule", "loss-filtered",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            progress = out / "progress.json"
            if progress.exists():
                current = json.loads(progress.read_text()).get("current")
                if current and current["round"] >= 5:
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        else:
            pytest.fail("the run never reached round 5")
        assert processes_mentioning(out), "agent processes should be running"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert processes_mentioning(out) == []
        # What the agents recorded before the interrupt is kept.
        assert list((out / "work" / "loss-filtered" / "agents").glob("*/metrics.jsonl"))
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in processes_mentioning(out):
            leftover.kill()


def test_detach_status_down(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "detached"
    started = orchestrate(
        "up",
        str(topology),
        "--backend",
        "local",
        "--out",
        str(out),
        "--detach",
        "--rounds",
        "100000",
        "--rule",
        "average",
    )
    assert started.returncode == 0, started.stderr
    deployment = json.loads((out / "deployment.json").read_text())
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = orchestrate("status", str(out))
            assert status.returncode == 0, status.stderr
            if "round" in status.stdout and "rule average" in status.stdout:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"status never showed progress: {status.stdout}")
        logs = orchestrate("logs", str(out))
        assert logs.returncode == 0 and "orchestrator.log" in logs.stdout
        down = orchestrate("down", str(out))
        assert down.returncode == 0, down.stderr
        assert (
            not psutil.pid_exists(deployment["pid"])
            or psutil.Process(deployment["pid"]).status() == psutil.STATUS_ZOMBIE
        )
        assert processes_mentioning(out) == []
        assert "state: stopped" in orchestrate("status", str(out)).stdout
    finally:
        for leftover in processes_mentioning(out):
            leftover.kill()
        if psutil.pid_exists(deployment["pid"]):
            os.kill(deployment["pid"], signal.SIGKILL)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--backend", "nomad"], "--backend"),
        (["--rule", "median-of-nothing"], "--rule"),
        (["--rounds", "-3"], "--rounds"),
    ],
)
def test_bad_flags_exit_2_with_one_line(topology: Path, tmp_path: Path, args: list[str], field: str) -> None:
    done = orchestrate("up", str(topology), "--out", str(tmp_path / "x"), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtl-orchestrate: error:"), done.stderr
    assert field in lines[0]
    assert "Traceback" not in done.stderr


def test_bad_topology_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOPOLOGY.replace("kind: ring, k: 2", "kind: geometric, radius: -1, max_degree: 5"))
    done = orchestrate("up", str(bad), "--backend", "sim", "--out", str(tmp_path / "y"))
    assert done.returncode == 2
    assert "graph" in done.stderr and "radius" in done.stderr and "Traceback" not in done.stderr
