"""The docker backend end to end through the CLI: same numbers as the in-process simulation, and
nothing left behind (containers, network)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import orchestrate, start_orchestrate

# The first test's setup may build the image (deploy/build-image.sh: minutes when cold).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

TOPOLOGY = """
name: docker-e2e
task: target-localization
agents: 5
graph: {{kind: ring, k: 2}}
byzantine: {{ids: [a4], attack: constant}}
rules: {rules}
rounds: {rounds}
seed: 7
"""
AGENTS = 5


@pytest.fixture
def topology(tmp_path: Path) -> Callable[..., Path]:
    """Writes the test's topology file, with the rules and rounds a test asks for, and gives its path."""

    def write(rules: str = "[average, loss-filtered]", rounds: int = 20) -> Path:
        path = tmp_path / "topology.yaml"
        path.write_text(TOPOLOGY.format(rules=rules, rounds=rounds))
        return path

    return write


def start_up(
    topology: Path, out: Path, image: str, *extra: str, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``mtl-orchestrate up --backend docker`` in the background (the test stops or follows it)."""
    return start_orchestrate(
        "up", str(topology), "--backend", "docker", "-o", f"image={image}", "--out", str(out),
        "--no-progress", *extra, stdout=stdout,
    )  # fmt: skip


def wait_for_rows(up: subprocess.Popen[str], work: Path, rows: int, timeout: float) -> str | None:
    """The run id of the rule's run in ``work`` once agent a1 has recorded ``rows`` rounds; None if
    ``up`` ended or ``timeout`` seconds passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and up.poll() is None:
        metrics = work / "agents" / "a1" / "metrics.jsonl"
        if (
            (work / "containers.json").exists()
            and metrics.exists()
            and metrics.read_text().count("\n") >= rows
        ):
            return str(json.loads((work / "containers.json").read_text())["run"])
        time.sleep(0.1)
    return None


def run_labels(docker_client: Any, run_id: str) -> tuple[list[Any], list[Any]]:
    label = f"org.resilient-mtl.run={run_id}"
    containers = docker_client.containers.list(all=True, filters={"label": label})
    networks = docker_client.networks.list(filters={"label": label})
    return containers, networks


def assert_summary_equals_sim(topology: Path, out: Path, tmp_path: Path) -> None:
    """The docker run's summary.json equals the in-process simulation's of the same topology."""
    sim_out = tmp_path / "sim"
    sim = orchestrate(
        "up", str(topology), "--backend", "sim", "--out", str(sim_out), "--no-progress", "--no-report"
    )
    assert sim.returncode == 0, sim.stderr
    summary = json.loads((out / "summary.json").read_text())
    sim_summary = json.loads((sim_out / "summary.json").read_text())
    assert summary.pop("backend") == "docker" and sim_summary.pop("backend") == "sim"
    summary.pop("wall_seconds")
    sim_summary.pop("wall_seconds")
    assert_same(summary, sim_summary)


def assert_same(a: Any, b: Any, where: str = "summary") -> None:
    """Equal structure, keys, strings and integers; floats equal to 1e-9 relative (the sim
    backend's vectorized engine sums in another order than the per-agent daemons: last-bit
    differences, as tests/integration/test_orchestrator.py allows for the local backend)."""
    assert type(a) is type(b), (where, a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


def test_docker_summary_equals_sim(
    node_image: str, docker_client: Any, topology: Callable[..., Path], tmp_path: Path
) -> None:
    topo = topology()
    out = tmp_path / "docker"
    done = orchestrate(
        "up", str(topo), "--backend", "docker", "-o", f"image={node_image}",
        "--out", str(out), "--no-progress", "--no-report",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    # Every agent's rows came back from its container, for both rules.
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == AGENTS * 20 * 2
    # Containers and networks of both rules' runs are gone.
    for rule in ("average", "loss-filtered"):
        info = json.loads((out / "work" / rule / "containers.json").read_text())
        assert len(info["containers"]) == AGENTS
        assert run_labels(docker_client, info["run"]) == ([], [])
        assert "serving a0 on 0.0.0.0:50051" in (out / "work" / rule / "host-a0.log").read_text()
        # Mutual TLS: each container's agent got its own certificate (mounted read-only).
        config = json.loads((out / "work" / rule / f"{info['containers'][0]}.json").read_text())
        (agent,) = config["agents"]
        assert agent["cert"] == f"/etc/mtl/tls/{agent['id']}/tls.crt" and not agent.get("insecure")
    assert (out / "certs" / "ca.pem").exists()
    assert_summary_equals_sim(topo, out, tmp_path)


def test_missing_image_is_a_clear_error(
    docker_client: Any, topology: Callable[..., Path], tmp_path: Path
) -> None:
    done = orchestrate(
        "up", str(topology()), "--backend", "docker", "-o", "image=resilient-mtl-node:no-such-tag",
        "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 2
    assert "no-such-tag not found" in done.stderr and "deploy/build-image.sh" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_removes_every_container_and_the_network(
    node_image: str, docker_client: Any, topology: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    proc = start_up(topology(), out, node_image, "--rounds", "100000", "--rule", "loss-filtered")
    try:
        deadline = time.monotonic() + 300
        running = False
        while time.monotonic() < deadline and proc.poll() is None:
            progress = out / "progress.json"
            if progress.exists():
                current = json.loads(progress.read_text()).get("current") or {}
                if current.get("round", 0) >= 2:
                    running = True
                    break
            time.sleep(0.5)
        assert running, proc.stderr.read() if proc.poll() is not None and proc.stderr else "no progress"
        info = json.loads((out / "work" / "loss-filtered" / "containers.json").read_text())
        containers, networks = run_labels(docker_client, info["run"])
        assert len(containers) == AGENTS and len(networks) == 1
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "every agent was stopped" in stderr
    assert run_labels(docker_client, info["run"]) == ([], [])


def test_docker_container_killed_mid_run_is_restarted_and_summary_equals_sim(
    node_image: str, docker_client: Any, topology: Callable[..., Path], tmp_path: Path
) -> None:
    """The agent process of one container is SIGKILLed mid-run (from the host, as an OOM kill or a
    crash would): Docker's restart policy starts the container again, its agent resumes from its
    state under /results, and the run's summary equals the in-process simulation's."""
    topo = topology(rules="[loss-filtered]", rounds=80)
    out = tmp_path / "docker"
    up = start_up(topo, out, node_image, "--no-report")
    killed = None
    try:
        run_id = wait_for_rows(up, out / "work" / "loss-filtered", rows=10, timeout=900)
        assert run_id, "the run never reached round 10"
        (container,) = [
            c
            for c in docker_client.containers.list(filters={"label": f"org.resilient-mtl.run={run_id}"})
            if "a1" in c.labels.get("org.resilient-mtl.agents", "").split(",")
        ]
        container.reload()
        killed = container.attrs["State"]["Pid"]
        os.kill(killed, signal.SIGKILL)
        _, stderr = up.communicate(timeout=900)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.communicate(timeout=120)
    assert up.returncode == 0, stderr
    assert run_labels(docker_client, run_id) == ([], [])
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == AGENTS * 80
    assert_summary_equals_sim(topo, out, tmp_path)


def test_down_after_up_was_sigkilled_removes_the_containers(
    node_image: str, docker_client: Any, topology: Callable[..., Path], tmp_path: Path
) -> None:
    """`up` dies with SIGKILL mid-run: its containers keep running (restart policy, nobody to stop
    them); `mtl-orchestrate down DIR` finds them from the results directory and removes them all,
    with the run's network."""
    out = tmp_path / "docker"
    up = start_up(topology(rules="[loss-filtered]", rounds=2000), out, node_image, "--no-report",
                  stdout=subprocess.DEVNULL)  # fmt: skip
    run_id = None
    try:
        run_id = wait_for_rows(up, out / "work" / "loss-filtered", rows=3, timeout=600)
        if run_id is None and up.poll() is not None and up.stderr:
            pytest.fail(up.stderr.read())
        assert run_id, "the run never reached round 3"
        up.kill()
        up.wait(timeout=60)
        containers, networks = run_labels(docker_client, run_id)
        assert len(containers) == AGENTS and len(networks) == 1  # orphaned, still there
        done = orchestrate("down", str(out), timeout=300)
        assert done.returncode == 0, done.stderr
        assert run_labels(docker_client, run_id) == ([], [])
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if run_id:  # never leave containers behind, whatever failed above
            subprocess.run(["docker", "rm", "--force", *[c.id for c in run_labels(docker_client, run_id)[0]]],
                           capture_output=True, check=False)  # fmt: skip
            subprocess.run(["docker", "network", "rm", run_id], capture_output=True, check=False)
