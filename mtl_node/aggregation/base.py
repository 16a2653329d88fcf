"""The rule interface, its parameters and the registry of rules."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mtl_node.core import names
from mtl_node.core.registry import Registry
from mtl_node.kernels.decisions import Decision

__all__ = ["RULES", "Aggregation", "Candidate", "Decision", "NeighborDecision", "Rule", "RuleParams"]


class RuleParams(BaseModel):
    """Knobs shared by the rules. ``nu`` is the paper's forgetting factor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nu: float = Field(0.1, gt=0.0, le=1.0, description="EMA forgetting factor, in (0, 1]")
    ema_init: float | None = Field(
        10.0,
        ge=0.0,
        description="EMA value before the first observation (the reference code uses 10); "
        "null starts each neighbour's EMA at its first observed value",
    )
    floor: float = Field(
        1e-12,
        ge=1e-300,  # 1/floor must stay finite: a subnormal floor made every weight inf/inf = NaN
        description="scores below this count as this when inverted, so a zero or tiny score "
        "cannot give a neighbour infinite weight",
    )
    # Robust baselines (mtl_node/aggregation/robust.py) and hardened rules (hardened.py).
    f: int = Field(
        1,
        ge=0,
        le=100_000,
        description="robust rules: Byzantine neighbours assumed at most (median, trimmed-mean and "
        "geometric-median need 2f+1 members, krum 2f+3; trimmed-mean drops f values per side)",
    )
    clip_tau: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="self-clipping: radius around the agent's own model each neighbour's pull is clipped to",
    )
    weiszfeld_iters: int = Field(
        50, ge=1, le=10_000, description="geometric-median: Weiszfeld iterations (a fixed number)"
    )
    weiszfeld_eps: float = Field(
        1e-8,
        gt=0.0,
        allow_inf_nan=False,
        description="geometric-median: distances below this count as this (no division by zero)",
    )
    clip_scale: float = Field(
        2.0,
        gt=0.0,
        allow_inf_nan=False,
        description="loss-filtered-clipped: the clipping radius is clip_scale times the agent's own "
        "typical adaptation step (EMA of ||psi_k - theta_k(i-1)||^2, square-rooted)",
    )
    weight_cap: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="loss-filtered-capped: no neighbour's weight may exceed weight_cap times the "
        "agent's own weight",
    )
    # Decentralized defenses (mtl_node/aggregation/decentralized.py); clipped-gossip and ios use f.
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="ubar, balance: weight of the agent's own model; the mean of the neighbours "
        "kept gets 1 - alpha",
    )
    ubar_rho: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="ubar: share of the neighbours (rounded up) kept by the distance stage",
    )
    balance_gamma: float = Field(
        0.3,
        gt=0.0,
        allow_inf_nan=False,
        description="balance: acceptance radius at round 0, as a multiple of ||own model||",
    )
    balance_kappa: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="balance: decay of the radius, gamma * exp(-kappa * round / balance_rounds)",
    )
    balance_rounds: int = Field(
        100, ge=1, le=10**9, description="balance: T, the round count over which the radius decays"
    )


@dataclass(frozen=True)
class Candidate:
    """One member of the neighbourhood this round, as the round loop saw it.

    ``loss`` is the loss of the member's model on *our* data; ``sq_distance`` is
    ||theta_self(i-1) - psi_member||^2; ``model`` is the member's model flattened to one float64
    vector (only for rules with ``needs_models``, e.g. coordinate-wise median). All are None when
    the member's model did not arrive or was rejected, in which case ``missing_reason`` says why.
    """

    agent_id: str
    loss: float | None = None
    sq_distance: float | None = None
    missing_reason: str | None = None
    model: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def present(self) -> bool:
        return self.missing_reason is None


@dataclass(frozen=True)
class NeighborDecision:
    agent_id: str
    decision: Decision
    weight: float
    ema: float
    loss: float
    reason: str = ""


@dataclass(frozen=True)
class Aggregation:
    """Weights (summing to 1 over present members, the agent itself included) and decisions.

    Rules that do not combine linearly (median, geometric median, clipping) set ``combined``, the
    new model as a flattened vector; the round loop then uses it instead of the weighted sum, and
    ``weights`` describes who contributed (for the decision log).
    """

    weights: dict[str, float]
    decisions: list[NeighborDecision] = field(default_factory=list)
    combined: np.ndarray | None = field(default=None, repr=False, compare=False)

    def count(self, decision: Decision) -> int:
        return sum(1 for d in self.decisions[1:] if d.decision == decision)


class Rule(ABC):
    """A stateful per-agent rule: it keeps its running scores across rounds."""

    name: ClassVar[str]
    needs_loss: ClassVar[bool] = False
    needs_distance: ClassVar[bool] = False
    needs_models: ClassVar[bool] = False

    def __init__(self, params: RuleParams | None = None) -> None:
        self.params = params or RuleParams()

    @abstractmethod
    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        """``candidates[0]`` is the agent itself; it is always present."""

    # -- crash-only state hooks (mtl_node/state.py): JSON-able, stateless rules keep the default --

    def state(self) -> dict[str, Any]:
        """The running state a resumed agent needs to continue exactly (e.g. EMA per neighbour)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned."""
        return None  # stateless by default


RULES: Registry[type[Rule]] = Registry("rule", names.RULES)


def make_rule(name: str, params: RuleParams | None = None) -> Rule:
    return RULES.get(name, field="rule")(params)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
