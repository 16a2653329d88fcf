"""The paper's rules: loss-filtered (eq. 10), loss (eq. 9), distance (eq. 4), average, none."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mtl_node.aggregation.base import (
    RULES,
    Aggregation,
    Candidate,
    Decision,
    NeighborDecision,
    Rule,
    finite,
)

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

    def _update(self, agent_id: str, value: float) -> float:
        nu = self.params.nu
        prev = self.ema.get(agent_id, self.params.ema_init)
        new = value if prev is None else (1.0 - nu) * prev + nu * value
        self.ema[agent_id] = new
        return new

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        own = candidates[0]
        own_score = self.score(own)
        if not finite(own_score):
            return _self_only(candidates, "own score not finite; keeping own model")
        assert own_score is not None
        own_ema = self._update(own.agent_id, own_score)

        kept: list[tuple[Candidate, float]] = [(own, own_ema)]
        rows: list[tuple[Candidate, Decision, float, str]] = [(own, "accepted", own_ema, "")]
        for c in candidates[1:]:
            prev = self.ema.get(c.agent_id, NAN)
            if not c.present:
                rows.append((c, "missing", prev, c.missing_reason or "missing"))
                continue
            value = self.score(c)
            if not finite(value):
                # A NaN/Inf score is excluded and does not poison the neighbour's EMA.
                rows.append((c, "filtered", prev, "score not finite"))
                continue
            assert value is not None
            ema = self._update(c.agent_id, value)
            if self.filtered and ema > own_ema:
                rows.append((c, "filtered", ema, f"ema {ema:.4g} > own {own_ema:.4g}"))
                continue
            kept.append((c, ema))
            rows.append((c, "accepted", ema, ""))

        floor = self.params.floor
        inverse = {c.agent_id: 1.0 / max(ema, floor) for c, ema in kept}
        total = math.fsum(inverse.values())
        weights = {agent: inv / total for agent, inv in inverse.items()}
        decisions = [
            NeighborDecision(c.agent_id, d, weights.get(c.agent_id, 0.0), ema, _loss(c), why)
            for c, d, ema, why in rows
        ]
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
        return _self_only(candidates, "non-cooperative")
