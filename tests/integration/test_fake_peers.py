"""A real daemon against gRPC peers served by the test: bad payloads, and one round at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import AgentSpec, DaemonSet
from fake_peer import EXPECTED_REASON, FakePeer, PeerServer, RoundGate

from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def peers() -> Iterator[dict[str, PeerServer]]:
    started: dict[str, PeerServer] = {}
    try:
        for mode in EXPECTED_REASON:
            started[mode] = PeerServer(FakePeer(mode, mode))
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_bad_models_rejected(tmp_path: Path, peers: dict[str, PeerServer]) -> None:
    """Each bad peer is left out with its reason, every round, and the daemon finishes its run."""
    rounds = 4
    spec = AgentSpec("honest", external={mode: server.address for mode, server in peers.items()})
    with DaemonSet(tmp_path, [spec], rounds, seed=5) as ds:
        ds.wait_done(timeout=120)
        daemon = ds["honest"]
        metrics = daemon.metrics()
        assert [int(r["round"]) for r in metrics] == list(range(1, rounds + 1))
        assert all(int(r["missing"]) == len(peers) and int(r["accepted"]) == 0 for r in metrics)
        decisions = daemon.decisions()
        stderr = daemon.stderr()
        for mode, server in peers.items():
            # The daemon really asked this peer over gRPC, for every round.
            asked = sorted({r for r, _ in server.peer.requests})
            assert asked == list(range(1, rounds + 1)), (mode, asked)
            rows = [r for r in decisions if r["neighbor"] == mode]
            assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1)), mode
            assert all(r["decision"] == "missing" and r["weight"] == 0.0 for r in rows), rows
            tag = EXPECTED_REASON[mode]
            reasons = {r["reason"] for r in rows}
            assert all(reason.startswith(f"{tag}: ") for reason in reasons), (mode, reasons)
            # The log names the peer and carries the same reason as the decisions file.
            detail = rows[0]["reason"].removeprefix(f"{tag}: ")
            assert f"left out {mode}: {detail}" in stderr, (mode, detail, stderr[-3000:])


def test_watch_status_streams_every_round(tmp_path: Path) -> None:
    """With the only neighbour releasing one round at a time, WatchStatus shows each round once."""
    rounds = 5
    gate = RoundGate()
    server = PeerServer(FakePeer("gated", "honest", gate))
    try:
        spec = AgentSpec("watched", external={"gated": server.address})
        with DaemonSet(tmp_path, [spec], rounds, seed=9) as ds:
            channel = ds.channel("watched")
            try:
                stream = pb_grpc.NodeStub(channel).WatchStatus(pb.WatchStatusRequest(), timeout=120)
                first = next(stream)
                assert first.agent_id == "watched" and first.round == 0 and first.state != "done"
                seen = [(first.round, first.state)]
                for i in range(1, rounds + 1):
                    gate.release(i)
                    status = next(stream)
                    while status.round == 0:  # "starting" -> "running" before round 1
                        seen.append((status.round, status.state))
                        status = next(stream)
                    seen.append((status.round, status.state))
                    assert status.round == i, seen
                    assert status.rounds_total == rounds
                    if i < rounds:
                        assert status.state == "running", seen
                        assert status.accepted + status.filtered == 1 and status.missing == 0, status
                        assert [n.agent_id for n in status.neighbors] == ["watched", "gated"]
                if status.state != "done":  # the last round's own status, then the end of the run
                    status = next(stream)
                    seen.append((status.round, status.state))
                assert (status.round, status.state) == (rounds, "done"), seen
                assert list(stream) == [], "the stream must end once the run is done"
            finally:
                channel.close()
            final = ds.status("watched")
            assert (final.state, final.round) == ("done", rounds)
            assert len(ds["watched"].metrics()) == rounds
    finally:
        gate.release(10**9)
        server.stop()


def test_a_model_header_naming_someone_else_is_missing_with_reason_identity(tmp_path: Path) -> None:
    """The right certificate at the neighbour's address, but a model whose header names another
    agent: left out with reason ``identity`` every round; the run completes."""
    rounds = 3
    server = PeerServer(FakePeer("somebody-else", "honest"), cert_of="liar")
    try:
        spec = AgentSpec("honest", external={"liar": server.address})
        with DaemonSet(tmp_path, [spec], rounds, seed=7) as ds:
            ds.wait_done(timeout=120)
            rows = [r for r in ds["honest"].decisions() if r["neighbor"] == "liar"]
            assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))
            assert all(r["decision"] == "missing" for r in rows), rows
            assert all(r["reason"].startswith("identity: ") and "somebody-else" in r["reason"] for r in rows)
    finally:
        server.stop()
