"""What an agent has published: the last few rounds of its model, and waiting for a round.

Asyncio only, no grpc: the gRPC servicer and the in-memory transport both read from here.
Payload bytes are encoded once per round, on first request, and shared by every requester.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from mtl_node import wire
from mtl_node.core.errors import FetchError
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)


@dataclass
class Published:
    round: int
    state: StateDict
    _payload: bytes | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def payload(self) -> tuple[bytes, str]:
        if self._payload is None:
            self._payload = wire.encode(self.state)
            self._digest = wire.digest(self._payload)
        assert self._digest is not None
        return self._payload, self._digest


class ModelStore:
    """Keeps the latest ``keep`` rounds, or more while they fit in ``keep_bytes``.

    Small models (target localization) are kept for the whole run, so a neighbour that fell far
    behind still gets the exact round it asks for; large models keep only the last few rounds.
    """

    def __init__(self, agent_id: str, keep: int = 4, keep_bytes: int = 64 << 20) -> None:
        self.agent_id = agent_id
        self.min_keep = max(1, keep)
        self.keep_bytes = keep_bytes
        self.keep = self.min_keep
        self._rounds: OrderedDict[int, Published] = OrderedDict()
        self._changed = asyncio.Event()
        self.manifest: wire.Manifest | None = None
        self.closed = False

    @property
    def latest_round(self) -> int:
        return next(reversed(self._rounds)) if self._rounds else -1

    def publish(self, round_: int, state: StateDict) -> Published:
        if round_ <= self.latest_round:
            raise ValueError(f"round {round_} already published (latest {self.latest_round})")
        if self.manifest is None:
            self.manifest = wire.manifest_of(state)
            per_round = max(self.manifest.data_bytes, 1)
            self.keep = max(self.min_keep, self.keep_bytes // per_round)
        published = Published(round_, state)
        self._rounds[round_] = published
        while len(self._rounds) > self.keep:
            self._rounds.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()
        return published

    def get(self, round_: int) -> Published | None:
        """The model of ``round_`` (0 = latest) if it is published and still kept."""
        if round_ == 0:
            return self._rounds[self.latest_round] if self._rounds else None
        return self._rounds.get(round_)

    async def wait_for(self, round_: int, timeout: float) -> Published:
        """Wait (at most ``timeout`` s) until ``round_`` is published; 0 waits for any round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            published = self.get(round_)
            if published is not None:
                return published
            if round_ != 0 and round_ <= self.latest_round:
                raise FetchError(
                    f"{self.agent_id}: round {round_} is no longer kept "
                    f"(latest {self.latest_round}, keeping {self.keep})",
                    reason="expired",
                )
            if self.closed:
                raise FetchError(f"{self.agent_id} is shutting down", reason="unavailable")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FetchError(
                    f"{self.agent_id}: round {round_} not published within {timeout:.1f}s "
                    f"(latest {self.latest_round})",
                    reason="timeout",
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def close(self) -> None:
        self.closed = True
        self._changed.set()
