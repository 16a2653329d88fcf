"""Server limits (mtl_node.limits) over real gRPC on loopback: every refusal is immediate and a
clear status; a reader that stops reading loses its call and frees its slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from test_model_fetch import Big, NoParams

from mtl_node.agent import Agent
from mtl_node.channel import create_channel
from mtl_node.config import NodeConfig, ServerLimits
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from mtl_node.server import create_server, set_serving, stop_server
from mtl_node.tasks import TaskContext
from mtl_node.transport import InMemoryTransport

pytestmark = pytest.mark.integration

# Refusals must come back at once, far inside this deadline.
DEADLINE_S = 30.0
PROMPT_S = 5.0


def other_peer(address: str) -> grpc.aio.Channel:
    """A channel on its own connection: another peer while peers are told apart by address (two
    channels with the same target and options share one connection otherwise)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def get(stub: pb_grpc.NodeStub, round_: int, requester: str = "p") -> grpc.aio.UnaryStreamCall:
    return stub.GetModel(pb.GetModelRequest(round=round_, requester=requester), timeout=DEADLINE_S)


@asynccontextmanager
async def serving(limits: ServerLimits, big: bool = False) -> AsyncIterator[str]:
    config = NodeConfig(id="victim", rule="none", rounds=0, limits=limits)
    task = Big(TaskContext("victim", 0, __import__("torch").device("cpu")), NoParams()) if big else None
    agent = Agent(config, InMemoryTransport({}), task=task)
    server, port, health = await create_server(agent, "127.0.0.1:0")
    await set_serving(health, True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await stop_server(server, grace=0.1)


async def refused(call: object) -> grpc.aio.AioRpcError:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    assert time.monotonic() - started < PROMPT_S, "refusal was not immediate"
    return err.value


def test_requests_for_far_rounds_and_long_requesters_are_refused_at_once() -> None:
    async def go() -> None:
        async with (
            serving(ServerLimits(max_rounds_ahead=2)) as address,
            create_channel(address, tls=None) as channel,
        ):
            stub = pb_grpc.NodeStub(channel)
            far = await refused(get(stub, 1000))
            assert far.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "max_rounds_ahead" in (far.details() or "")
            long = await refused(get(stub, 0, "r" * 1000))
            assert long.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_requester_bytes" in (long.details() or "")
            huge = await refused(get(stub, 0, "r" * (1 << 20)))
            assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the server's request cap
            # The latest round is still served.
            got = [m async for m in get(stub, 0)]
            assert got and got[0].header.round == 0

    asyncio.run(go())


def test_calls_and_watchers_are_bounded_per_peer_and_per_server() -> None:
    limits = ServerLimits(max_rpcs_per_peer=3, max_concurrent_rpcs=5, max_watchers=2, max_watchers_per_peer=1)

    async def go() -> None:
        async with (
            serving(limits) as address,
            create_channel(address, tls=None) as one,
            other_peer(address) as two,
        ):
            s1, s2 = pb_grpc.NodeStub(one), pb_grpc.NodeStub(two)
            # Round 1 is never published (rounds=0): each call waits, holding a slot.
            parked = [get(s1, 1) for _ in range(3)]
            await asyncio.sleep(1.0)
            over = await refused(get(s1, 1))
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_rpcs_per_peer" in (over.details() or "")
            # Another peer still gets answers, up to the server's total.
            info = await s2.GetInfo(pb.GetInfoRequest(), timeout=PROMPT_S)
            assert info.agent_id == "victim"
            watcher = s2.WatchStatus(pb.WatchStatusRequest(), timeout=DEADLINE_S)
            first = await watcher.read()
            assert first.agent_id == "victim"
            second = await refused(s2.WatchStatus(pb.WatchStatusRequest(), timeout=DEADLINE_S))
            assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_watchers_per_peer" in (second.details() or "")
            # 3 parked + 1 watcher in progress; one more fills the server, the next is refused.
            s2_parked = get(s2, 1, "q")
            await asyncio.sleep(1.0)
            full = await refused(get(s2, 1, "q"))
            assert "max_concurrent_rpcs" in (full.details() or ""), full.details()
            for call in [*parked, watcher, s2_parked]:
                call.cancel()
            # Slots come back once calls end.
            await asyncio.sleep(1.0)
            again = get(s1, 0)
            assert [m async for m in again]

    asyncio.run(go())


def test_a_reader_that_stops_reading_holds_only_its_own_slot_until_its_deadline() -> None:
    limits = ServerLimits(max_rpcs_per_peer=1)
    stall_deadline = 4.0

    async def go() -> None:
        # No window growth (BDP probing): the client buffers only one stream window, so a reader
        # that stops reading really stops the server's writes.
        small_window = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
        async with (
            serving(limits, big=True) as address,
            grpc.aio.insecure_channel(address, options=small_window) as channel,
            other_peer(address) as honest_channel,
        ):
            stub, honest = pb_grpc.NodeStub(channel), pb_grpc.NodeStub(honest_channel)
            stalled = stub.GetModel(pb.GetModelRequest(round=0, requester="slow"), timeout=stall_deadline)
            await stalled.read()  # the first chunk, then nothing more: the rest cannot be sent
            busy = await refused(get(stub, 0))
            assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another peer gets the whole model meanwhile.
            chunks = [m async for m in get(honest, 0, "honest")]
            assert sum(len(c.data) for c in chunks) == chunks[0].header.total_bytes
            # The stalled call ends at its deadline and its slot comes back.
            deadline = time.monotonic() + 30
            while True:
                try:
                    await stub.GetInfo(pb.GetInfoRequest(), timeout=PROMPT_S)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert time.monotonic() < deadline, "the stalled reader kept its slot past its deadline"
                await asyncio.sleep(0.5)

    asyncio.run(go())
