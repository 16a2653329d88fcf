"""The gRPC face of an agent: a thin servicer over the Agent, plus health and reflection.

Every Node call is first put to mtl_node.auth (who may call what); GetModel then serves the
authenticated requester, which is what a two-faced attack node keys its answer on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mtl_node import messages, wire
from mtl_node.agent import Agent
from mtl_node.auth import DenialLog, authorize, peer_identity
from mtl_node.channel import SERVER_OPTIONS, SERVICE, server_credentials
from mtl_node.core.errors import FetchError
from mtl_node.identity import TlsMaterial
from mtl_node.limits import Limiter, guard
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Upper bound on how long GetModel waits for a round to be published when the caller set no
# deadline (every caller of ours does).
MAX_WAIT_S = 300.0
_ABORT_CODES = {
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "expired": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, agent: Agent, tls: TlsMaterial | None = None) -> None:
        self.agent = agent
        self.tls = tls is not None
        self.trust_domain = tls.trust_domain if tls else ""
        self._denied = DenialLog(agent.id)

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext, requester: str = "") -> str:
        """The authenticated requester; aborts the call when the caller may not make it."""
        peer = peer_identity(context.auth_context()) if self.tls else None
        decision = authorize(method, peer, requester, tls=self.tls, trust_domain=self.trust_domain)
        if not decision.allowed:
            self._denied(method, peer, decision)
            await context.abort(getattr(grpc.StatusCode, decision.code), decision.reason)
        return decision.requester

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        await self._authorize("GetInfo", context)
        return messages.info_to_pb(self.agent)

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        requester = await self._authorize("GetModel", context, request.requester)
        remaining = context.time_remaining()
        timeout = MAX_WAIT_S if remaining is None else min(MAX_WAIT_S, max(remaining - 0.05, 0.0))
        try:
            round_, payload, digest = await self.agent.payload_for(request.round, requester, timeout)
        except FetchError as exc:
            await context.abort(_ABORT_CODES.get(exc.reason, grpc.StatusCode.UNAVAILABLE), str(exc))
            return
        header = pb.ModelHeader(
            round=round_,
            format=wire.FORMAT,
            total_bytes=len(payload),
            digest=digest,
            agent_id=self.agent.id,
        )
        # Already serialized ModelChunk messages (see _handlers): a large model is not copied
        # three times per request by protobuf.
        for frame in wire.frames(payload, header):
            yield frame
        self.agent.observer.served(len(payload))

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeStatus:
        await self._authorize("GetStatus", context)
        return messages.status_to_pb(self.agent.status)

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.NodeStatus]:
        await self._authorize("WatchStatus", context)
        while True:
            status = self.agent.status
            yield messages.status_to_pb(status)
            if status.state in ("done", "failed"):
                return
            # The status may have changed while the reader took the last one: only wait when not
            # (waiting regardless would miss that change, and the run's last status with it).
            if self.agent.status is status:
                await self.agent.wait_status_change()


class _Collect:
    """Stands in for a server to capture what the generated code registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def _handlers(servicer: NodeServicer) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The generated method handlers, GetModel's with an identity response serializer.

    GetModel yields ModelChunk messages it serialized itself (wire.frames); every other method,
    including any added to the proto later, is registered exactly as the generated code does.
    """
    collect = _Collect()
    pb_grpc.add_NodeServicer_to_server(servicer, collect)
    handlers = collect.handlers
    handlers["GetModel"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetModel,
        request_deserializer=pb.GetModelRequest.FromString,
        response_serializer=None,
    )
    return collect.service, handlers


def bind(server: grpc.aio.Server, address: str, tls: TlsMaterial | None) -> int:
    """Bind ``address`` (mutual TLS unless ``tls`` is None); a port in use is an OSError naming it."""
    try:
        port = (
            server.add_secure_port(address, server_credentials(tls))
            if tls
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or not available here")
    return port


async def create_server(
    agent: Agent, address: str, tls: TlsMaterial | None = None
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Start serving ``agent`` on ``address`` (port 0 picks a free port); returns the bound port.

    ``tls`` None serves plaintext (``--insecure``). Health stays NOT_SERVING until the caller
    marks it SERVING (once the agent is ready).
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service, handlers = _handlers(NodeServicer(agent, tls))
    limiter = Limiter(agent.config.limits, lambda: agent.store.latest_round, lambda: agent.observer)
    handlers = guard(handlers, limiter)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]  # not in the stubs
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Node"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = bind(server, address, tls)
    await server.start()
    for service in ("", SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port, health_servicer


async def create_health_server(
    health_servicer: health_aio.HealthServicer, address: str
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1 only (``health_listen``), for probes that cannot
    present a client certificate: Kubernetes' gRPC probes, Docker's HEALTHCHECK. It says SERVING or
    NOT_SERVING and nothing else, so it can stay unauthenticated (docs/deployment.md)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, address, None)
    await server.start()
    return server, port


async def set_serving(health_servicer: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE):
        await health_servicer.set(service, status)


async def stop_server(server: grpc.aio.Server, grace: float = 2.0) -> None:
    await asyncio.shield(server.stop(grace))
