"""Server limits: what one daemon accepts at once, so no client can pin its memory or stall rounds.

``guard`` wraps the Node service's method handlers (mtl_node.server registers what it returns):

- calls in progress are bounded per server and per peer (``ServerLimits.max_concurrent_rpcs``,
  ``max_rpcs_per_peer``), WatchStatus streams separately (``max_watchers``,
  ``max_watchers_per_peer``); a call over a limit ends at once with RESOURCE_EXHAUSTED, it is never
  queued, so a flood costs the server one refusal per call;
- GetModel for a round more than ``max_rounds_ahead`` past the latest published one is refused at
  once with OUT_OF_RANGE instead of waiting (a neighbour never asks further ahead than the next
  round), and a requester id longer than ``max_requester_bytes`` with INVALID_ARGUMENT;
- a reader that stops reading holds one slot of its own peer's and one message (at most a
  chunk, ~1 MiB) until its deadline, or until the server's connection age limit ends its
  connection (mtl_node.channel): it cannot hold more than ``max_rpcs_per_peer`` messages, and
  other peers are served meanwhile. (A pending write cannot be abandoned: gRPC cannot end a call
  while one of its messages is still being sent.)

Requests themselves are small, so the server also caps received messages (mtl_node.channel).
``peer_identity`` is the one place that says who a caller is: the identity its certificate proves
(mutual TLS, the default), or its transport address on an ``--insecure`` server.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from mtl_node import auth
from mtl_node.config import ServerLimits
from mtl_node.metrics import AgentObserver

log = logging.getLogger(__name__)

WATCH = "WatchStatus"
GET_MODEL = "GetModel"


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-peer limits: the SPIFFE identity its client certificate proves
    (mutual TLS), else the transport peer ("ipv4:127.0.0.1:40512": one connection, --insecure)."""
    try:
        spiffe = auth.peer_identity(context.auth_context())
    except Exception:  # a certificate without a usable identity: authorization refuses it anyway
        spiffe = None
    return str(spiffe) if spiffe is not None else str(context.peer())


class LimitExceeded(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Slots:
    """A bounded count, overall and per peer."""

    def __init__(self, what: str, total: int, per_peer: int, total_field: str, peer_field: str) -> None:
        self.what = what
        self.total = total
        self.per_peer = per_peer
        self.fields = (total_field, peer_field)
        self.in_use = 0
        self.by_peer: Counter[str] = Counter()

    def acquire(self, peer: str) -> None:
        if self.in_use >= self.total:
            raise LimitExceeded(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.in_use} {self.what} in progress "
                f"(limits.{self.fields[0]} = {self.total}); retry later",
            )
        if self.by_peer[peer] >= self.per_peer:
            raise LimitExceeded(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many {self.what} from {peer}: {self.by_peer[peer]} in progress "
                f"(limits.{self.fields[1]} = {self.per_peer})",
            )
        self.in_use += 1
        self.by_peer[peer] += 1

    def release(self, peer: str) -> None:
        self.in_use -= 1
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]


class Limiter:
    """The limits of one server; ``latest_round`` tells the latest round the agent published."""

    def __init__(
        self,
        limits: ServerLimits,
        latest_round: Callable[[], int],
        observer: Callable[[], AgentObserver] | None = None,
        identity: Callable[[grpc.aio.ServicerContext], str] = peer_identity,
    ) -> None:
        self.limits = limits
        self.latest_round = latest_round
        self.observer = observer or AgentObserver
        self.identity = identity
        self.calls = _Slots(
            "calls",
            limits.max_concurrent_rpcs,
            limits.max_rpcs_per_peer,
            "max_concurrent_rpcs",
            "max_rpcs_per_peer",
        )
        self.watchers = _Slots(
            "WatchStatus streams",
            limits.max_watchers,
            limits.max_watchers_per_peer,
            "max_watchers",
            "max_watchers_per_peer",
        )
        self.refused: Counter[tuple[str, str]] = Counter()

    def check_request(self, method: str, request: Any) -> None:
        if method != GET_MODEL:
            return
        requester = request.requester
        size, most = len(requester.encode()), self.limits.max_requester_bytes
        if size > most:
            raise LimitExceeded(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requester is {size} bytes, over limits.max_requester_bytes = {most}",
            )
        latest, ahead = self.latest_round(), self.limits.max_rounds_ahead
        if request.round > max(latest, 0) + ahead:
            raise LimitExceeded(
                grpc.StatusCode.OUT_OF_RANGE,
                f"round {request.round} is more than limits.max_rounds_ahead = {ahead} "
                f"past the latest published round {latest}; ask again later",
            )

    def _refuse(self, method: str, exc: LimitExceeded) -> None:
        self.refused[(method, exc.code.name)] += 1
        self.observer().rejected(method, exc.code.name)
        log.debug("refused %s: %s", method, exc)

    @staticmethod
    async def _write_all(context: grpc.aio.ServicerContext, items: AsyncIterator[Any]) -> None:
        async for item in items:
            await context.write(item)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        slots = [self.calls, *([self.watchers] if method == WATCH else [])]

        async def enter(request: Any, context: grpc.aio.ServicerContext) -> tuple[str, list[_Slots]]:
            peer = self.identity(context)
            taken: list[_Slots] = []
            try:
                self.check_request(method, request)
                for s in slots:
                    s.acquire(peer)
                    taken.append(s)
            except LimitExceeded as exc:
                for s in taken:
                    s.release(peer)
                self._refuse(method, exc)
                await context.abort(exc.code, str(exc))
            return peer, taken

        def leave(held: tuple[str, list[_Slots]]) -> None:
            peer, taken = held
            for s in taken:
                s.release(peer)

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                held = await enter(request, context)
                try:
                    return await inner_unary(request, context)
                finally:
                    leave(held)

            return handler._replace(unary_unary=unary)  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                held = await enter(request, context)
                items = inner_stream(request, context)
                try:
                    await self._write_all(context, items)
                finally:
                    leave(held)
                    await items.aclose()

            return handler._replace(unary_stream=stream)  # type: ignore[attr-defined,no-any-return]
        return handler  # the Node service has no client-streaming methods


def guard(
    handlers: dict[str, grpc.RpcMethodHandler], limiter: Limiter, methods: Iterable[str] | None = None
) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers`` with every method (or those in ``methods``) under ``limiter``."""
    chosen = set(methods) if methods is not None else set(handlers)
    return {name: limiter.wrap(name, h) if name in chosen else h for name, h in handlers.items()}
