"""An agent always answers: health and status during every round, and SIGTERM within seconds, even
when its round loop has nothing to wait for (rule none, no neighbours) and when several agents
share one ``serve-many`` process (they must run side by side, not one after another)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import RPC_TIMEOUT_S, STOP_TIMEOUT_S, AgentSpec, DaemonSet, ServeMany
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtl_node.channel import SERVICE
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

# Far more rounds than the test lasts: before the fix, the loop ran them all without answering.
ENDLESS = 5_000_000
POLLS = 8


def _health_and_round(channel_of: Any, agent: str) -> tuple[int, int, str]:
    """(health status, round, state) of ``agent``; an RPC error fails the test."""
    with channel_of(agent) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S
        )
        status = pb_grpc.NodeStub(channel).GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
    return health.status, status.round, status.state


def _stop_within(proc: subprocess.Popen[bytes], seconds: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds:.0f}s after SIGTERM")


def test_rule_none_agent_answers_every_round_and_stops(tmp_path: Path) -> None:
    with DaemonSet(tmp_path, [AgentSpec("solo")], ENDLESS, seed=1, rule="none", save_models_every=0) as ds:
        seen: list[int] = []
        while len(seen) < POLLS:
            health, round_, state = _health_and_round(ds.channel, "solo")
            assert health == health_pb2.HealthCheckResponse.SERVING
            if state == "running" and round_ > 0:
                seen.append(round_)
            time.sleep(0.1)
        # Answered while the rounds went on: every answer saw a later round than the one before.
        assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
        assert seen[-1] < ENDLESS
        proc = ds["solo"].proc
        assert proc is not None
        _stop_within(proc, STOP_TIMEOUT_S)
        assert proc.returncode == 0, ds["solo"].stderr()[-2000:]


def test_serve_many_runs_agents_side_by_side(tmp_path: Path) -> None:
    ids = ["m0", "m1", "m2"]
    configs = [
        {"id": a, "rule": "none", "rounds": ENDLESS, "seed": 3, "results_dir": str(tmp_path / a)} for a in ids
    ]
    with ServeMany(tmp_path, configs, links={a: [b for b in ids if b != a] for a in ids}) as many:
        together = 0
        deadline = time.monotonic() + 120
        while together < POLLS:
            rounds = {}
            for a in ids:
                health, round_, state = _health_and_round(many.channel, a)
                assert health == health_pb2.HealthCheckResponse.SERVING
                rounds[a] = (round_, state)
            # Side by side: all agents are mid-run at the same moment.
            if all(st == "running" and 0 < r < ENDLESS for r, st in rounds.values()):
                together += 1
            assert time.monotonic() < deadline, f"agents never ran together: {rounds}"
            time.sleep(0.1)
        assert many.proc is not None
        _stop_within(many.proc, STOP_TIMEOUT_S)
        assert many.proc.returncode == 0, many.stderr_path.read_text()[-2000:]


def test_watch_status_follows_an_agent_that_never_awaits(tmp_path: Path) -> None:
    """A WatchStatus stream sees round after round from a rule-none agent with no neighbours."""
    with DaemonSet(tmp_path, [AgentSpec("w")], ENDLESS, seed=2, rule="none", save_models_every=0) as ds:
        with ds.channel("w") as channel:
            stream = pb_grpc.NodeStub(channel).WatchStatus(pb.WatchStatusRequest(), timeout=60)
            rounds: list[int] = []
            try:
                for status in stream:
                    if status.round > 0:
                        rounds.append(status.round)
                    if len(rounds) >= 5:
                        break
            finally:
                stream.cancel()
        assert len(rounds) >= 5 and rounds == sorted(rounds), rounds
