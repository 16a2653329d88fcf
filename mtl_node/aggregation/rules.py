"""The paper's rules: loss-filtered (eq. 10), loss (eq. 9), distance (eq. 4), average, none."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtl_node.aggregation.base import (
    RULES,
    Aggregation,
    Candidate,
    NeighborDecision,
    Rule,
    finite,
)
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels.ema import ema_step

NAN = math.nan


def _missing(c: Candidate, ema: float) -> NeighborDecision:
    return NeighborDecision(c.agent_id, "missing", 0.0, ema, NAN, c.missing_reason or "missing")


def _self_only(candidates: Sequence[Candidate], reason: str) -> Aggregation:
    """Keep the agent's own model; every neighbour is left out."""
    own = candidates[0]
    decisions = [NeighborDecision(own.agent_id, "accepted", 1.0, NAN, _loss(own), reason)]
    for c in candidates[1:]:
        if not c.present:
            decisions.append(_missing(c, NAN))
        else:
            decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), reason))
    return Aggregation({own.agent_id: 1.0}, decisions)


def _loss(c: Candidate) -> float:
    return c.loss if c.loss is not None else NAN


class _EmaRule(Rule):
    """Shared machinery: an EMA per neighbour of some per-round score, inverse-score weights."""

    filtered: bool = False

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.ema: dict[str, float] = {}

    def score(self, c: Candidate) -> float | None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {"ema": dict(self.ema)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ema = {str(k): float(v) for k, v in state.get("ema", {}).items()}

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        own = candidates[0]
        own_score = self.score(own)
        if not finite(own_score):
            return _self_only(candidates, reasons.OWN_NOT_FINITE)
        # One row of the batched kernel: slot 0 the agent, then its neighbours in order.
        p = self.params
        ids = [c.agent_id for c in candidates]
        scores = [self.score(c) if c.present else None for c in candidates]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            step = ema_step(
                np.array([[NAN if v is None else v for v in scores]], dtype=np.float64),
                np.array([[c.present for c in candidates]]),
                np.array([[self.ema.get(a, NAN) for a in ids]], dtype=np.float64),
                np.array([[a in self.ema for a in ids]]),
                nu=np.array([[p.nu]]),
                ema_init=np.array([[NAN if p.ema_init is None else p.ema_init]]),
                floor=np.array([[p.floor]]),
                filtering=np.array([[self.filtered]]),
                cooperating=np.array([True]),
            )
        ema, updated, worse = step.ema[0].tolist(), step.updated[0].tolist(), step.worse[0].tolist()
        weights_row = step.weights[0].tolist()
        for s, agent in enumerate(ids):
            if updated[s]:
                self.ema[agent] = ema[s]
        weights = {ids[s]: weights_row[s] for s in range(len(ids)) if step.kept[0, s]}
        decisions = []
        for s, c in enumerate(candidates):
            prev = self.ema.get(c.agent_id, NAN)
            if not c.present:
                decisions.append(
                    NeighborDecision(c.agent_id, "missing", 0.0, prev, NAN, c.missing_reason or "missing")
                )
            elif not updated[s]:
                # A NaN/Inf score is excluded and does not poison the neighbour's EMA.
                decisions.append(
                    NeighborDecision(c.agent_id, "filtered", 0.0, prev, _loss(c), reasons.SCORE_NOT_FINITE)
                )
            elif worse[s]:
                why = reasons.worse_than_self(ema[s], ema[0])
                decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, ema[s], _loss(c), why))
            else:
                decisions.append(
                    NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], ema[s], _loss(c))
                )
        return Aggregation(weights, decisions)


@RULES.register("loss")
class LossWeighted(_EmaRule):
    name = "loss"
    needs_loss = True

    def score(self, c: Candidate) -> float | None:
        return c.loss


@RULES.register("loss-filtered")
class LossFiltered(LossWeighted):
    name = "loss-filtered"
    filtered = True


@RULES.register("distance")
class DistanceWeighted(_EmaRule):
    name = "distance"
    needs_distance = True

    def score(self, c: Candidate) -> float | None:
        return c.sq_distance


@RULES.register("average")
class Average(Rule):
    name = "average"

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        present = [c for c in candidates if c.present]
        w = 1.0 / len(present)
        decisions = [
            NeighborDecision(c.agent_id, "accepted", w, NAN, _loss(c)) if c.present else _missing(c, NAN)
            for c in candidates
        ]
        return Aggregation({c.agent_id: w for c in present}, decisions)


@RULES.register("none")
class NonCooperative(Rule):
    name = "none"

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        return _self_only(candidates, reasons.NON_COOPERATIVE)
