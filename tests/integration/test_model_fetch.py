"""A multi-chunk model over real gRPC on loopback: the server's hand-framed chunks read by the raw
client path (ModelStub, what GrpcTransport uses) and by a generated-stub client, byte for byte."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from daemons import shared_ca
from pydantic import BaseModel

from mtl_node import messages, wire
from mtl_node.agent import Agent
from mtl_node.channel import create_channel
from mtl_node.client import GrpcTransport, ModelStub, fetch_payload
from mtl_node.config import NodeConfig
from mtl_node.core.errors import FetchError
from mtl_node.identity import agent_id
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from mtl_node.server import create_server, set_serving, stop_server
from mtl_node.tasks import Metrics, Task, TaskContext
from mtl_node.transport import InMemoryTransport
from mtl_node.wire import StateDict

pytestmark = pytest.mark.integration

PARAMS = 700_000  # 2.8 MB of float32: three chunks


class NoParams(BaseModel):
    pass


class Big(Task):
    name = "test-big"
    Params = NoParams

    def init_model(self) -> StateDict:
        g = torch.Generator().manual_seed(3)
        return {"w": torch.randn(PARAMS, generator=g), "b": torch.randn(3, dtype=torch.float64, generator=g)}

    def adapt(self, model: StateDict, round_: int) -> StateDict:
        return model

    def losses(self, models: Any, round_: int) -> list[float]:
        return [0.0 for _ in models]

    def evaluate(self, model: StateDict, round_: int) -> Metrics:
        return Metrics(loss=0.0)


async def fetch_both_ways() -> tuple[Agent, list[tuple[pb.ModelHeader, bytearray]], StateDict]:
    agent = Agent(
        NodeConfig(id="big", rule="none", rounds=0),
        InMemoryTransport({}),
        task=Big(TaskContext("big", 0, torch.device("cpu")), NoParams()),
    )
    ca = shared_ca()
    server, port, health = await create_server(agent, "127.0.0.1:0", ca.material("big"))
    await set_serving(health, True)
    tester = ca.material("tester")
    try:
        async with create_channel(
            f"127.0.0.1:{port}", tls=tester, expected_identity=agent_id("big")
        ) as channel:
            info = await pb_grpc.NodeStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
            manifest = messages.manifest_from_pb(info.manifest)
            got = [
                await fetch_payload(stub, 0, "tester", 10.0, manifest)
                for stub in (ModelStub(channel), pb_grpc.NodeStub(channel))
            ]
            with pytest.raises(FetchError) as missing:
                await fetch_payload(ModelStub(channel), 1, "tester", 0.5, manifest)
            assert missing.value.reason == "timeout"
            # Far past the latest round: refused at once (mtl_node.limits), not parked.
            with pytest.raises(FetchError) as refused:
                await fetch_payload(ModelStub(channel), 5, "tester", 30.0, manifest)
            assert "OUT_OF_RANGE" in str(refused.value)
        transport = GrpcTransport({"big": f"127.0.0.1:{port}"}, tls=tester)
        transport.expect(agent.manifest)
        state = await transport.fetch("big", 0, "tester", 10.0)
        await transport.close()
    finally:
        await stop_server(server, grace=0.1)
    return agent, got, state


def test_a_multi_chunk_model_arrives_intact_on_both_client_paths() -> None:
    agent, got, state = asyncio.run(fetch_both_ways())
    payload = wire.encode(agent.theta)
    assert len(payload) > 2 * wire.CHUNK_BYTES
    for header, body in got:
        assert header.total_bytes == len(payload) and header.digest == wire.digest(payload)
        assert header.agent_id == "big" and header.round == 0
        assert body == payload
    wire.validate_state(state, agent.manifest)
    for name, tensor in agent.theta.items():
        assert torch.equal(state[name], tensor), name
