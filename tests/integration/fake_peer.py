"""A real gRPC ``mtl.v1.Node`` peer served from the test process, misbehaving on purpose.

A daemon given this peer as a neighbour fetches from it over real gRPC on loopback, so the
daemon's whole receive path (header check, streaming, digest, safetensors parse, manifest and
finiteness validation) is exercised against payloads an honest agent never sends. Its ``mode``
picks the misbehaviour; a ``RoundGate`` can hold back each round until the test releases it,
which makes a daemon advance exactly one round at a time.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import safetensors.torch
import torch
from daemons import shared_ca

from mtl_node.channel import server_credentials
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

MODES = ("honest", "oversized", "truncated", "wrong-shape", "nan")
# The tag the receiving daemon must record for each misbehaviour (mtl_node.core.errors reasons).
EXPECTED_REASON = {
    "oversized": "oversized",
    "truncated": "truncated",
    "wrong-shape": "manifest",
    "nan": "non-finite",
}
# What an oversized stream announces: far beyond any 2-parameter model, never actually sent.
OVERSIZED_ANNOUNCED_BYTES = 64 << 20
GATE_WAIT_S = 60.0


class RoundGate:
    """Rounds up to ``released`` may be served; later ones wait until the test releases them."""

    def __init__(self) -> None:
        self.released = 0
        self._cond = threading.Condition()

    def release(self, round_: int) -> None:
        with self._cond:
            self.released = max(self.released, round_)
            self._cond.notify_all()

    def wait(self, round_: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.released >= round_, timeout)


class FakePeer(pb_grpc.NodeServicer):
    def __init__(self, agent_id: str, mode: str, gate: RoundGate | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.agent_id = agent_id
        self.mode = mode
        self.gate = gate
        self.requests: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def _state(self, round_: int) -> dict[str, torch.Tensor]:
        if self.mode == "wrong-shape":
            return {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
        if self.mode == "nan":
            return {"w": torch.tensor([float("nan"), 1.0], dtype=torch.float64)}
        # A plausible estimate that moves a little every round.
        return {"w": torch.tensor([10.0 + 0.01 * round_, 10.0], dtype=torch.float64)}

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        manifest = pb.ModelManifest(tensors=[pb.TensorSpec(name="w", dtype="F64", shape=[2])], data_bytes=16)
        return pb.NodeInfo(agent_id=self.agent_id, task="target-localization", manifest=manifest)

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        with self._lock:
            self.requests.append((request.round, request.requester))
        if self.gate is not None:
            remaining = context.time_remaining()
            wait = GATE_WAIT_S if remaining is None else min(GATE_WAIT_S, remaining)
            if not self.gate.wait(request.round, wait):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {request.round} not released")
        payload = safetensors.torch.save(self._state(request.round))
        digest = "sha256:" + hashlib.sha256(payload).hexdigest()
        total = len(payload)
        data = payload
        if self.mode == "oversized":
            total = OVERSIZED_ANNOUNCED_BYTES
        elif self.mode == "truncated":
            data = payload[: len(payload) // 2]
        header = pb.ModelHeader(
            round=request.round,
            format="safetensors",
            total_bytes=total,
            digest=digest,
            agent_id=self.agent_id,
        )
        yield pb.ModelChunk(header=header, data=data)

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.NodeStatus:
        return pb.NodeStatus(agent_id=self.agent_id, state="running", role="byzantine")


class PeerServer:
    """One sync gRPC server on an ephemeral loopback port per fake peer."""

    def __init__(self, peer: FakePeer, insecure: bool = False, cert_of: str | None = None) -> None:
        self.peer = peer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_NodeServicer_to_server(peer, self.server)
        if insecure:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:  # with the shared test CA's certificate of the agent it plays
            creds = server_credentials(shared_ca().material(cert_of or peer.agent_id))
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        if self.port == 0:
            raise OSError("cannot bind a loopback port for the fake peer")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait(timeout=10)
