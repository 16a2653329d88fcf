"""``mtl-orchestrate sweep`` end to end: the real CLI in a subprocess, real worker processes.

- a cell's numbers equal ``mtl-orchestrate up --backend sim`` on the cell's topology;
- an interrupted sweep (SIGINT, and SIGKILL of the whole process group) resumes to the same table
  as an uninterrupted one, skipping the cells it had logged;
- the report files exist and say something.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import BIN, orchestrate

from orchestrator.results import window_bounds
from orchestrator.sweep.spec import parse_sweep
from orchestrator.sweep.store import LOG_FILE, CellLog, read_csv

pytestmark = pytest.mark.integration

SMALL: dict[str, Any] = {
    "name": "small",
    "tasks": [{"task": "target-localization"}],
    "topologies": [
        {"name": "complete", "agents": 8, "graph": "complete"},
        {"name": "ring", "agents": 8, "graph": {"kind": "ring", "k": 2}},
    ],
    "rules": ["none", "average", "loss-filtered"],
    "attacks": [{"attack": "constant", "params": {"low": 15.0, "high": 16.0}}, "sign-flip"],
    "fractions": [0.0, 0.25],
    "seeds": 2,
    "rounds": 30,
    "window": 0.2,
}
# Larger, so that there is time to interrupt it between cells (one worker).
SLOW: dict[str, Any] = {**SMALL, "name": "slow", "seeds": 3, "rounds": 400, "fractions": [0.0, 0.25, 0.5]}


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def table(out: Path) -> list[dict[str, Any]]:
    return read_csv(out / "results.csv")


def sweep(tmp: Path, data: dict[str, Any], name: str, *extra: str) -> Path:
    spec = write(tmp / f"{name}.yaml", data)
    out = tmp / name
    done = orchestrate("sweep", str(spec), "--out", str(out), "--no-progress", *extra)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small grid, swept once by the local executor with two workers."""
    return sweep(tmp_path_factory.mktemp("sweep"), SMALL, "small", "--workers", "2")


def test_sweep_writes_one_row_per_cell_and_normal_agent(small: Path) -> None:
    rows = table(small)
    cells = parse_sweep(SMALL).cells()
    expected = sum(c.topology.agents - c.byzantine for c in cells)
    assert len(rows) == expected
    assert {r["cell"] for r in rows} == {c.id for c in cells}
    for r in rows:
        assert r["final"] is not None and r["alone"] is not None
        assert r["metric"] == "test_loss"
    # The alone reference is rule none's own number for the same agent, topology and seed.
    for r in rows:
        if r["rule"] == "none":
            assert r["final"] == r["alone"]
    # Averaging drags normal agents to the attackers; the numbers must show it (the test can fail).
    avg = [r["final"] for r in rows if r["rule"] == "average" and r["attack"] == "constant"]
    alone = [r["alone"] for r in rows if r["rule"] == "average" and r["attack"] == "constant"]
    assert sum(avg) / len(avg) > 10 * sum(alone) / len(alone)


def test_a_cell_equals_up_backend_sim(small: Path, tmp_path: Path) -> None:
    cell = next(
        c for c in parse_sweep(SMALL).cells() if c.rule == "loss-filtered" and c.attack_label == "constant"
    )
    topology = write(tmp_path / "cell.yaml", cell.topology_spec())
    out = tmp_path / "up"
    done = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(out), "--no-progress", "--no-report"
    )
    assert done.returncode == 0, done.stderr
    first, last = window_bounds(cell.rounds, cell.window)
    sums: dict[str, list[float]] = {}
    with (out / "metrics.csv").open() as f:
        for r in csv.DictReader(f):
            if r["role"] == "normal" and first <= int(r["round"]) <= last:
                sums.setdefault(r["agent"], []).append(float(r["test_loss"]))
    mine = {r["agent"]: r["final"] for r in table(small) if r["cell"] == cell.id}
    assert set(mine) == set(sums) and len(mine) == cell.topology.agents - cell.byzantine
    for agent, values in sums.items():
        assert mine[agent] == sum(values) / len(values), agent
    summary = json.loads((out / "summary.json").read_text())
    mean = summary["rules"]["loss-filtered"]["test_loss"]["mean"]
    assert mean == pytest.approx(sum(mine.values()) / len(mine), rel=1e-12)


def test_report_files_exist_and_say_something(small: Path) -> None:
    report = (small / "report.md").read_text()
    for word in ("none", "average", "loss-filtered", "constant", "sign-flip", "25% Byzantine"):
        assert word in report
    for name in ("heatmap-target-localization.png", "worse-than-alone-target-localization.png"):
        png = small / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_rerun_of_a_finished_sweep_runs_nothing(small: Path, tmp_path: Path) -> None:
    before = (small / LOG_FILE).read_bytes()
    spec = write(tmp_path / "small.yaml", SMALL)
    done = orchestrate("sweep", str(spec), "--out", str(small), "--no-progress", "--no-report")
    assert done.returncode == 0, done.stderr
    assert f"0 cells run, {len(parse_sweep(SMALL).cells())} already done" in done.stdout
    assert (small / LOG_FILE).read_bytes() == before


def _interrupt(spec: Path, out: Path, sig: signal.Signals, after: int) -> int:
    """Start a one-worker sweep, wait until ``after`` cells are logged, send ``sig`` (SIGKILL: to
    the whole process group, as a lost machine); return the cells logged by then."""
    proc = subprocess.Popen(
        [
            str(BIN / "mtl-orchestrate"),
            "sweep",
            str(spec),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = out / LOG_FILE
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.read_bytes().count(b"\n") >= after:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.communicate()}"
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "rerun the same command to resume" in err
    return len(CellLog(out).read())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupt_and_resume_gives_the_same_table(tmp_path: Path, sig: signal.Signals) -> None:
    total = len(parse_sweep(SLOW).cells())
    reference = sweep(tmp_path, SLOW, "reference", "--workers", "2", "--no-report")
    spec = write(tmp_path / "slow.yaml", SLOW)
    out = tmp_path / "interrupted"
    logged = _interrupt(spec, out, sig, after=3)
    assert 3 <= logged < total
    if sig == signal.SIGKILL:
        # Killed mid-write: a torn last line must be dropped, not break the resume.
        with (out / LOG_FILE).open("ab") as f:
            f.write(b'{"id":"torn","fin')
    done = orchestrate(
        "sweep", str(spec), "--out", str(out), "--no-progress", "--no-report", "--workers", "2"
    )
    assert done.returncode == 0, done.stderr
    assert f"{total - logged} cells run, {logged} already done" in done.stdout
    assert table(out) == table(reference)
    assert (out / "results.csv").read_bytes() == (reference / "results.csv").read_bytes()


def test_cell_log_drops_a_torn_tail_and_keeps_appending(tmp_path: Path) -> None:
    log = CellLog(tmp_path)
    log.append({"id": "a", "final": [1.0]})
    with log.path.open("ab") as f:
        f.write(b'{"id": "b", "fi')
    assert set(log.read()) == {"a"}
    log.append({"id": "c", "final": [2.0]})
    assert set(log.read()) == {"a", "c"}
    assert log.path.read_bytes().count(b"\n") == 2


def test_a_per_agent_engine_cell_equals_up_backend_sim(tmp_path: Path) -> None:
    """The same on the per-agent (torch) engine: a har cell, run in a worker with one torch thread,
    gives exactly the numbers `up --backend sim` gets in its own process."""
    har = {
        **SMALL,
        "name": "har-cell",
        "tasks": [
            {
                "task": "har",
                "nu": 0.001,
                "ema_init": 1.0,
                "task_params": {"lr": 0.01, "optimizer": "sgd", "batch_size": 10, "test_fraction": 0.3},
            }
        ],
        "topologies": [{"name": "complete", "agents": 4, "graph": "complete"}],
        "rules": ["loss-filtered"],
        "attacks": ["constant"],
        "fractions": [0.25],
        "seeds": 1,
        "rounds": 8,
    }
    swept = sweep(tmp_path, har, "har", "--no-report")
    (cell,) = parse_sweep(har).cells()
    topology = write(tmp_path / "cell.yaml", cell.topology_spec())
    out = tmp_path / "up"
    done = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(out), "--no-progress", "--no-report"
    )
    assert done.returncode == 0, done.stderr
    first, last = window_bounds(cell.rounds, cell.window)
    values: dict[str, list[float]] = {}
    with (out / "metrics.csv").open() as f:
        for r in csv.DictReader(f):
            if r["role"] == "normal" and first <= int(r["round"]) <= last:
                values.setdefault(r["agent"], []).append(float(r["test_accuracy"]))
    mine = {r["agent"]: r["final"] for r in table(swept)}
    assert len(mine) == 3
    assert mine == {a: sum(v) / len(v) for a, v in values.items()}
