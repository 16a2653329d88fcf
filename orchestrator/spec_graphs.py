"""The graph kinds of a topology file (``graph: {kind: ring, k: 2}``), one pydantic model a kind.

Plain data, validated on their own; orchestrator.spec checks them against the agent ids, and
orchestrator.graphs / orchestrator.planner turn them into neighbourhoods. Torch-free.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompleteGraph(_Model):
    """Every agent is a neighbour of every other."""

    kind: Literal["complete"]


class RingGraph(_Model):
    """Agents on a ring in id order, each linked to ``k`` agents on each side."""

    kind: Literal["ring"]
    k: int = Field(1, ge=1, description="neighbours on each side")


class GeometricGraph(_Model):
    """The paper's figure 1a: agents within ``radius`` of each other may be neighbours.

    Each agent keeps at most ``max_degree`` members in its neighbourhood, itself included (as the
    reference code's findNeighbors), sampled per agent, so neighbourhoods may be directed.
    """

    kind: Literal["geometric"]
    radius: float = Field(gt=0, description="communication range")
    max_degree: int | None = Field(
        None, ge=1, description="neighbourhood size cap, the agent itself included; null: no cap"
    )
    area: float = Field(3.0, gt=0, description="positions not given are drawn in [0, area]^2")
    seed: int | None = Field(None, ge=0, description="seed of the neighbour sampling; default: the run's")


class ErdosRenyiGraph(_Model):
    """Each unordered pair linked independently with probability ``p``."""

    kind: Literal["erdos-renyi"]
    p: float = Field(ge=0.0, le=1.0, description="link probability, in [0, 1]")
    seed: int | None = Field(None, ge=0, description="seed of the graph; default: the run's")


class KRegularGraph(_Model):
    """A random undirected graph where every agent has exactly ``k`` neighbours."""

    kind: Literal["k-regular"]
    k: int = Field(ge=0, description="neighbours of every agent (n*k must be even, k < n)")
    seed: int | None = Field(None, ge=0, description="seed of the graph; default: the run's")


class EdgesGraph(_Model):
    """Explicit links. A directed edge [a, b] means b fetches a's model (a is in b's neighbourhood)."""

    kind: Literal["edges"]
    edges: list[tuple[str, str]] = Field(default_factory=list, description="pairs of agent ids")
    directed: bool = Field(False, description="false: each edge links both ways")


class AdjacencyGraph(_Model):
    """Explicit neighbourhoods: agent id -> the agents it fetches from."""

    kind: Literal["adjacency"]
    adjacency: dict[str, list[str]] = Field(default_factory=dict, description="agent -> its neighbours")
    directed: bool = Field(True, description="true: lists taken as given; false: every link both ways")


GraphSpec = Annotated[
    CompleteGraph
    | RingGraph
    | GeometricGraph
    | ErdosRenyiGraph
    | KRegularGraph
    | EdgesGraph
    | AdjacencyGraph,
    Discriminator("kind"),
]
GRAPH_KINDS: dict[str, type[BaseModel]] = {
    "complete": CompleteGraph,
    "ring": RingGraph,
    "geometric": GeometricGraph,
    "erdos-renyi": ErdosRenyiGraph,
    "k-regular": KRegularGraph,
    "edges": EdgesGraph,
    "adjacency": AdjacencyGraph,
}
