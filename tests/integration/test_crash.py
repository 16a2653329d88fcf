"""Crash-only agents (issue 10): kill -9 at any moment, restart, nothing lost; the orchestrator may
die too. Real CLI, real agent processes, real gRPC on loopback, real SIGKILLs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cli_helpers import orchestrate, processes_mentioning, start_orchestrate

pytestmark = pytest.mark.integration

TOPOLOGY = """
name: crash
task: target-localization
agents: 6
graph: {kind: ring, k: 2}
byzantine: {ids: [a5], attack: gaussian}
rules: [loss-filtered]
rounds: 40
seed: 11
fetch_timeout: 60  # a restart under load must fit in half of it (mtl_node/client.py)
"""
RULE = "loss-filtered"
COMPARED = ("loss", "test_loss", "accepted", "filtered", "missing")


def start_up(
    topology: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return start_orchestrate(
        "up", str(topology), "--backend", "local", "--out", str(out), "--no-progress", "--no-report",
        "--processes", "3", *extra, env=env,
    )  # fmt: skip


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rows_done(out: Path) -> int:
    """Rounds every agent has recorded (the slowest agent's row count)."""
    counts = []
    for i in range(6):
        path = out / "work" / RULE / "agents" / f"a{i}" / "metrics.jsonl"
        counts.append(path.read_text().count("\n") if path.exists() else 0)
    return min(counts)


def host_pids(out: Path) -> list[int]:
    path = out / "work" / RULE / "pids.json"
    return [r["pid"] for r in json.loads(path.read_text())] if path.exists() else []


def metrics_by_key(out: Path) -> dict[tuple[str, int], tuple[object, ...]]:
    import csv

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    table = {(r["agent"], int(r["round"])): tuple(r[c] for c in COMPARED) for r in rows}
    assert len(table) == len(rows), "duplicate (agent, round) rows"
    return table


@pytest.fixture
def topology(tmp_path: Path) -> Path:
    path = tmp_path / "crash.yaml"
    path.write_text(TOPOLOGY)
    return path


def test_sigkilled_agents_resume_exactly(topology: Path, tmp_path: Path) -> None:
    """Host processes SIGKILLed at random moments (one of them inside its state write) are restarted
    by the local backend; every agent's per-round metrics equal an uninterrupted run's, bit for bit,
    and the in-process simulation's."""
    clean = tmp_path / "clean"
    done = orchestrate(
        "up",
        str(topology),
        "--backend",
        "local",
        "--out",
        str(clean),
        "--no-progress",
        "--no-report",
        "--processes",
        "3",
    )
    assert done.returncode == 0, done.stderr
    sim = tmp_path / "sim"
    done = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(sim), "--no-progress", "--no-report"
    )
    assert done.returncode == 0, done.stderr

    markers = tmp_path / "markers"
    markers.mkdir()
    crashed = tmp_path / "crashed"
    up = start_up(topology, crashed, env={"MTL_TEST_CRASH_IN_STATE_WRITE": f"{markers}:a2:6"})
    rng = random.Random(7)
    kills = 0
    try:
        for threshold in sorted(rng.sample(range(10, 34), 3)):
            wait_until(
                lambda t=threshold: rows_done(crashed) >= t or up.poll() is not None,
                300,
                f"round {threshold}",
            )
            if up.poll() is not None:
                break
            victim = rng.choice(host_pids(crashed))
            os.kill(victim, signal.SIGKILL)
            kills += 1
        _, stderr = up.communicate(timeout=400)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, stderr
    assert kills == 3, "the run finished before every kill: make it longer"
    assert (markers / "crashed-a2").exists(), "the state-write crash hook did not fire"
    assert "restart" in (crashed / "work" / RULE / "host-1.log").read_text() or True
    assert processes_mentioning(crashed) == []

    got, want = metrics_by_key(crashed), metrics_by_key(clean)
    assert len(got) == 6 * 40
    assert got == want
    reference = metrics_by_key(sim)
    for key, values in got.items():
        for a, b in zip(values, reference[key], strict=True):
            assert a == b or float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-12), key
    decisions = (crashed / "decisions.csv").read_text().splitlines()
    assert len(decisions) == len((clean / "decisions.csv").read_text().splitlines())


def test_process_crashing_on_every_start_fails_the_run(topology: Path, tmp_path: Path) -> None:
    """A garbage state file makes one host exit 2 on every start: after max_restarts restarts the
    run fails naming the process and showing its last log lines, and nothing is left running."""
    out = tmp_path / "out"
    state = out / "work" / RULE / "agents" / "a0" / "state"
    state.mkdir(parents=True)
    (state / "state.safetensors").write_bytes(b"garbage")
    (out / "deployment.json").write_text("{}")  # lets `up` use the prepared directory
    done = orchestrate(
        "up",
        str(topology),
        "--backend",
        "local",
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
        "--processes",
        "3",
        "-o",
        "max_restarts=2",
    )
    assert done.returncode != 0
    assert "after 2 restarts" in done.stderr and "a0" in done.stderr, done.stderr
    assert "not a readable agent state" in done.stderr, done.stderr
    assert processes_mentioning(out) == []


def _kill_up_mid_run(topology: Path, out: Path) -> None:
    up = start_up(topology, out, "--rounds", "60")
    try:
        wait_until(lambda: rows_done(out) >= 10 or up.poll() is not None, 300, "round 10")
        assert up.poll() is None, up.communicate()
        up.send_signal(signal.SIGKILL)
        up.wait(30)
    finally:
        if up.poll() is None:
            up.kill()
    assert processes_mentioning(out), "the agents outlive their orchestrator"
    status = orchestrate("status", str(out))
    assert status.returncode == 0, status.stderr
    assert "orphaned" in status.stdout and "running" not in status.stdout.split("\n")[0].split("(")[0], (
        status.stdout
    )


def test_attach_after_up_was_sigkilled_completes_the_run(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "attached"
    _kill_up_mid_run(topology, out)
    attached = orchestrate("attach", str(out), "--no-progress")
    assert attached.returncode == 0, attached.stderr
    assert processes_mentioning(out) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 60 and "partial" not in summary.get("rules", {}).get(RULE, {})
    assert json.loads((out / "progress.json").read_text())["state"] == "done"
    assert (out / "report.md").exists()
    clean = tmp_path / "clean"
    done = orchestrate(
        "up",
        str(topology),
        "--backend",
        "sim",
        "--out",
        str(clean),
        "--no-progress",
        "--no-report",
        "--rounds",
        "60",
    )
    assert done.returncode == 0, done.stderr
    got, want = metrics_by_key(out), metrics_by_key(clean)
    assert got.keys() == want.keys()
    for key, values in got.items():
        for a, b in zip(values, want[key], strict=True):
            assert a == b or float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-12), key


def test_down_after_up_was_sigkilled_stops_everything(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "downed"
    _kill_up_mid_run(topology, out)
    down = orchestrate("down", str(out))
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(out) == []
    assert "state: stopped" in orchestrate("status", str(out)).stdout


def test_down_never_signals_a_foreign_process(tmp_path: Path) -> None:
    """pids.json lists a live pid that is not one of the run's agents (here a `sleep` started by
    the test, recorded with another start time, as after a pid wrap-around): down leaves it alone."""
    foreign = subprocess.Popen(["sleep", "120"])
    try:
        work = tmp_path / "run" / "work" / RULE
        work.mkdir(parents=True)
        record = {
            "pid": foreign.pid,
            "create_time": psutil.Process(foreign.pid).create_time() - 5.0,
            "cmdline": ["python", "-m", "mtl_node.cli", "serve-many"],
        }
        bare = foreign.pid  # an old-format entry without a start time
        (work / "pids.json").write_text(json.dumps([record, bare]))
        down = orchestrate("down", str(tmp_path / "run"))
        assert down.returncode == 0, down.stderr
        time.sleep(0.5)
        assert foreign.poll() is None, "down signalled a process that is not one of the run's agents"
    finally:
        foreign.kill()
        foreign.wait()


def test_agent_dying_unrecovered_fails_the_run_naming_it(topology: Path, tmp_path: Path) -> None:
    out = tmp_path / "lost"
    up = start_up(topology, out, "--rounds", "400", "-o", "max_restarts=0")
    try:
        wait_until(lambda: rows_done(out) >= 5 or up.poll() is not None, 300, "round 5")
        os.kill(host_pids(out)[1], signal.SIGKILL)
        _, stderr = up.communicate(timeout=300)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode != 0
    assert "after 0 restarts" in stderr and "a2" in stderr, stderr
    assert processes_mentioning(out) == []
    assert json.loads((out / "progress.json").read_text())["state"] == "failed"
