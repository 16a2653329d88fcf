"""Fetching models from other agents over gRPC: the network side of the transport seam."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import grpc
from google.protobuf.message import DecodeError

from mtl_node import wire
from mtl_node.channel import create_channel, is_identity_error
from mtl_node.core.errors import FetchError, WireError
from mtl_node.identity import TlsMaterial, agent_id
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from mtl_node.transport import Transport
from mtl_node.wire import Manifest, StateDict

log = logging.getLogger(__name__)

GET_MODEL = f"/{pb.DESCRIPTOR.services_by_name['Node'].full_name}/GetModel"


class ModelStub:
    """GetModel with every response left as the serialized ModelChunk.

    ``fetch_payload`` then reads each chunk's data in place in the received message
    (wire.split_chunk), where protobuf would copy it twice: for large models those copies, not the
    network, set the pace of a fetch (benchmarks/bench_fetch.py).
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.GetModel = channel.unary_stream(
            GET_MODEL,
            request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=None,
        )


def _chunk_parts(
    message: bytes | pb.ModelChunk, want_header: bool
) -> tuple[pb.ModelHeader | None, wire.Buffer]:
    """(header if wanted and present, data) of one GetModel response, raw or parsed."""
    if isinstance(message, pb.ModelChunk):
        return (message.header if want_header and message.HasField("header") else None), message.data
    raw_header, data = wire.split_chunk(message)
    if raw_header is None:
        return None, data
    if not want_header:  # servers send the header once; a later one is not even checked by us
        raise wire.BadPayload("a chunk after the first carries a header")
    try:
        return pb.ModelHeader.FromString(raw_header), data
    except DecodeError:
        raise wire.BadPayload("chunk header is not a ModelHeader") from None


async def fetch_payload(
    stub: pb_grpc.NodeStub | ModelStub,
    round_: int,
    requester: str,
    timeout: float,
    manifest: Manifest,
    wait_for_ready: bool = False,
) -> tuple[pb.ModelHeader, bytearray]:
    """Stream one model, checking the header against ``manifest`` before reading the rest.

    Returns the header and the payload, complete and matching its digest; a ``ModelStub`` makes
    this cheaper than a generated ``NodeStub`` for large models.
    """
    call = stub.GetModel(
        pb.GetModelRequest(round=round_, requester=requester),
        timeout=timeout,
        wait_for_ready=wait_for_ready,
    )
    header: pb.ModelHeader | None = None
    assembler: wire.PayloadAssembler | None = None
    try:
        async for message in call:
            chunk_header, data = _chunk_parts(message, want_header=assembler is None)
            if assembler is None:
                if chunk_header is None:
                    raise wire.BadPayload("first chunk carries no header")
                header = chunk_header
                if round_ and header.round != round_:
                    raise wire.BadPayload(f"asked for round {round_}, got round {header.round}")
                assembler = wire.PayloadAssembler(header.total_bytes, header.digest, header.format, manifest)
            assembler.add(data)
    except WireError:
        call.cancel()
        raise
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        reason = {
            grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
            grpc.StatusCode.NOT_FOUND: "expired",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "oversized",
            grpc.StatusCode.PERMISSION_DENIED: "refused",
            grpc.StatusCode.UNAUTHENTICATED: "refused",
        }.get(code, "unavailable")
        if is_identity_error(exc.details()):
            reason = "identity"
        raise FetchError(f"{code.name}: {exc.details()}", reason=reason) from None
    if assembler is None or header is None:
        raise wire.TruncatedPayload("stream ended before any chunk")
    return header, assembler.finish()


# Round 1: how often a neighbour that is not listening yet is tried again.
STARTUP_RETRY_S = 0.25


class GrpcTransport(Transport):
    """One channel per neighbour; fetches validate size and digest, then decode safetensors.

    With ``tls`` every channel is mutual TLS and must reach the certificate of the neighbour it is
    for; a neighbour answering with another identity (certificate or model header) is left out
    with reason ``identity``.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        device: str = "cpu",
        tls: TlsMaterial | None = None,
    ) -> None:
        self.addresses = dict(addresses)
        self.manifest: Manifest | None = None
        self.device = device
        self.tls = tls
        self._stubs: dict[str, ModelStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._info_stubs: dict[str, pb_grpc.NodeStub] = {}
        self._seen: set[str] = set()
        # Neighbours that stayed unreachable for a whole deadline: asked once per round, without
        # waiting, until they answer again (the channel keeps reconnecting in the background).
        self._down: set[str] = set()
        # Told the size of every payload received (metrics); None: nobody is counting.
        self.on_received: Callable[[int], None] | None = None

    def _stub(self, neighbor: str) -> ModelStub:
        stub = self._stubs.get(neighbor)
        if stub is None:
            address = self.addresses.get(neighbor)
            if address is None:
                raise FetchError(f"no address for neighbour {neighbor!r}", reason="unavailable")
            expected = agent_id(neighbor, self.tls.trust_domain) if self.tls else None
            channel = self._channels[neighbor] = create_channel(
                address, tls=self.tls, expected_identity=expected
            )
            stub = self._stubs[neighbor] = ModelStub(channel)
        return stub

    def expect(self, manifest: Manifest) -> None:
        self.manifest = manifest

    async def fetch(self, neighbor: str, round_: int, requester: str, timeout: float) -> StateDict:
        if self.manifest is None:
            raise RuntimeError("GrpcTransport.expect(manifest) must be called before fetch")
        stub = self._stub(neighbor)
        # Crash-only (DESIGN §5): a neighbour that is not listening or whose stream broke (it was
        # killed and is restarting) is asked again until the deadline, in every round, so a restart
        # within the deadline changes no result (rounds are idempotent to fetch). An UNAVAILABLE its
        # own server sent (a refusal: "<id>: ..."), an identity failure or a deadline ends it at once.
        if neighbor in self._down:
            header, payload = await fetch_payload(stub, round_, requester, timeout, self.manifest)
            self._down.discard(neighbor)
        else:
            header, payload = await self._fetch_retrying(stub, neighbor, round_, requester, timeout)
        if header.agent_id != neighbor:
            raise FetchError(
                f"{neighbor}: the model's header names {header.agent_id[:64]!r}", reason="identity"
            )
        self._seen.add(neighbor)
        if self.on_received is not None:
            self.on_received(len(payload))
        # Full validation (names, shapes, finite) happens in the round loop for every transport.
        return wire.parse(payload, self.manifest, self.device)

    async def _fetch_retrying(
        self, stub: ModelStub, neighbor: str, round_: int, requester: str, timeout: float
    ) -> tuple[pb.ModelHeader, bytearray]:
        """Try again while the neighbour is unreachable, until ``timeout``. Unlike gRPC's
        wait_for_ready this sees why a connection failed, so a certificate naming someone else
        fails at once (reason ``identity``) instead of after the whole wait."""
        assert self.manifest is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # After round 1, an unreachable neighbour is waited for half the deadline only: our own
        # neighbours wait for our next round with the same deadline, and must get it within theirs
        # (a wait of a whole deadline here would make them time out on us in turn).
        unreachable_until = deadline if round_ == 1 else loop.time() + timeout / 2
        while True:
            remaining = deadline - loop.time()
            try:
                return await fetch_payload(stub, round_, requester, max(remaining, 0.01), self.manifest)
            except FetchError as exc:
                refused = str(exc).startswith(f"UNAVAILABLE: {neighbor}: ")
                if exc.reason != "unavailable" or refused:
                    raise
                if unreachable_until - loop.time() <= STARTUP_RETRY_S:
                    if round_ > 1:
                        self._down.add(neighbor)  # gone for a whole deadline: do not wait again
                    raise
                log.debug("%s: round %d: unreachable (%s); asking again", neighbor, round_, exc)
            await asyncio.sleep(STARTUP_RETRY_S)

    async def latest_round(self, neighbor: str, timeout: float) -> int:
        self._stub(neighbor)
        info = self._info_stubs.get(neighbor)
        if info is None:
            info = self._info_stubs[neighbor] = pb_grpc.NodeStub(self._channels[neighbor])
        try:
            reply = await info.GetInfo(pb.GetInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise FetchError(f"{exc.code().name}: {exc.details()}", reason="unavailable") from None
        return int(reply.round)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
