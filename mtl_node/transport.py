"""The transport seam: how an agent gets a neighbour's model for a round.

``GrpcTransport`` (in mtl_node.client) crosses the network; ``InMemoryTransport`` here hands over
the published tensors of agents living in the same process. The round loop only sees
``Transport``, so the same agent code runs as a daemon or inside the in-process engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from mtl_node.core.errors import FetchError
from mtl_node.wire import Manifest, StateDict

if TYPE_CHECKING:
    from mtl_node.config import NodeConfig


class ModelSource(Protocol):
    """Whatever answers GetModel for one agent: its store, or an attack crafting per request."""

    async def model_for(self, round_: int, requester: str, timeout: float) -> StateDict: ...


class Transport(ABC):
    def expect(self, manifest: Manifest) -> None:  # noqa: B027 - optional hook
        """Told once by the agent what models look like, to bound what it accepts."""

    @abstractmethod
    async def fetch(self, neighbor: str, round_: int, requester: str, timeout: float) -> StateDict:
        """The model ``neighbor`` published for ``round_``; raises FetchError or WireError."""

    async def latest_round(self, neighbor: str, timeout: float) -> int:
        """The latest round ``neighbor`` has published (a cheap liveness probe); raises FetchError
        when it does not answer within ``timeout``."""
        raise FetchError(f"{type(self).__name__} cannot probe {neighbor}", reason="unavailable")

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def local_config(self, agent_id: str) -> NodeConfig | None:
        """The config of ``agent_id`` when it lives in this process (omniscient attacks rebuild its
        task from it); None for transports that cross the network."""
        return None


class InMemoryTransport(Transport):
    """Agents in one process: fetch straight from the neighbour's model source."""

    def __init__(self, sources: Mapping[str, ModelSource]) -> None:
        self.sources = sources

    async def fetch(self, neighbor: str, round_: int, requester: str, timeout: float) -> StateDict:
        source = self.sources.get(neighbor)
        if source is None:
            raise FetchError(f"no agent {neighbor!r} in this process", reason="unavailable")
        # model_for bounds its own wait by ``timeout`` (no extra wait_for task on the hot path).
        return await source.model_for(round_, requester, timeout)

    def local_config(self, agent_id: str) -> NodeConfig | None:
        config = getattr(self.sources.get(agent_id), "config", None)
        from mtl_node.config import NodeConfig

        return config if isinstance(config, NodeConfig) else None

    async def latest_round(self, neighbor: str, timeout: float) -> int:
        source = self.sources.get(neighbor)
        store = getattr(source, "store", None)
        if store is None:
            raise FetchError(f"no agent {neighbor!r} in this process", reason="unavailable")
        return int(store.latest_round)
