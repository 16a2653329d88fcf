"""Decentralized defenses since 2021 (issue 13), applied per agent over its neighbourhood.

As for the robust baselines (``robust.py``), missing members are left out before the maths and
``n`` is the number of present members, the agent itself included. Neighbours are weighed
uniformly. The maths lives in ``mtl_node.kernels.decentralized`` (batches of neighbourhoods); a
rule here calls it with one row and turns the result into decisions.

=================  ====================================================  =========================
rule               new model                                             assumption (n members)
=================  ====================================================  =========================
ubar               keep the ceil(rho * m) neighbours closest to the      none (alpha keeps a share
                   agent's own model (m present), then those whose loss  of the own model; at least
                   on the agent's batch is <= its own (at least the      the best neighbour is kept)
                   best); alpha * own + (1 - alpha) * mean(kept)
balance            accept psi_l iff ||own - psi_l|| <= gamma *           none (own model only when
                   exp(-kappa * i / T) * ||own||;                        none is accepted)
                   alpha * own + (1 - alpha) * mean(accepted)
clipped-gossip     own + (1/n) sum_l clip(psi_l - own, tau), tau the     n >= 2f + 2 (the 2f
                   distance of the (2f+1)-th farthest neighbour (CS+)    farthest are clipped)
ios                f times: drop the neighbour farthest from the mean    n >= 2f + 1
                   of the members left (self included); mean of the rest
=================  ====================================================  =========================

``i`` for balance is the number of rounds the rule has aggregated (1 in the first round), kept in
the rule's state so that a resumed agent continues the schedule. A combined model that is not
finite is replaced by the agent's own, as for the robust rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtl_node.aggregation.base import RULES, Aggregation, Candidate, NeighborDecision
from mtl_node.aggregation.robust import RobustRule, keep_own
from mtl_node.kernels import decentralized as kernels
from mtl_node.kernels import decisions as reasons

NAN = math.nan

DECENTRALIZED_RULES = ("ubar", "balance", "clipped-gossip", "ios")


def _loss(c: Candidate) -> float:
    return c.loss if c.loss is not None else NAN


def _missing(c: Candidate) -> NeighborDecision:
    return NeighborDecision(c.agent_id, "missing", 0.0, NAN, NAN, c.missing_reason or "missing")


class _OneRow(RobustRule):
    """The robust rules' plumbing, with the present members alone as the row."""

    present_only = True

    def _mixed(
        self,
        candidates: Sequence[Candidate],
        present: list[Candidate],
        z: np.ndarray,
        keep: np.ndarray,
        why: dict[str, str],
    ) -> Aggregation:
        """alpha * own + (1 - alpha) * mean(kept): own weight alpha (1 without any kept)."""
        if not np.isfinite(z).all():
            return keep_own(candidates, reasons.COMBINED_NOT_FINITE)
        row = kernels.mixed_weights(keep[None, :], np.array([self.params.alpha]))[0].tolist()
        members = enumerate(zip(present, row, strict=True))
        weights = {c.agent_id: w for s, (c, w) in members if s == 0 or keep[s]}
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif c.agent_id in weights:
                decisions.append(NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], NAN, _loss(c)))
            else:
                decisions.append(
                    NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), why[c.agent_id])
                )
        return Aggregation(weights, decisions, combined=z)


@RULES.register("ubar")
class Ubar(_OneRow):
    name = "ubar"
    needs_loss = True

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        p = self.params
        loss = np.array([[_loss(c) for c in present]], dtype=np.float64)
        z, selected, keep = kernels.ubar(X, mask, loss, np.array([p.ubar_rho]), np.array([p.alpha]))
        k = int(selected[0].sum())
        own = float(loss[0, 0])
        why = {
            c.agent_id: reasons.ubar_loss(_loss(c), own) if selected[0, s] else reasons.ubar_far(k)
            for s, c in enumerate(present)
        }
        return self._mixed(candidates, present, z[0], keep[0], why)


@RULES.register("balance")
class Balance(_OneRow):
    name = "balance"

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.rounds = 0

    def state(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        self.rounds += 1
        return super().aggregate(candidates)

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        p = self.params
        z, accepted, radius = kernels.balance(
            X,
            mask,
            np.array([p.balance_gamma]),
            np.array([p.balance_kappa]),
            np.array([float(self.rounds)]),
            np.array([float(p.balance_rounds)]),
            np.array([p.alpha]),
        )
        d = kernels.distances_to_own(X)[0]
        why = {
            c.agent_id: reasons.outside_radius(float(d[s]), float(radius[0])) for s, c in enumerate(present)
        }
        return self._mixed(candidates, present, z[0], accepted[0], why)


@RULES.register("clipped-gossip")
class ClippedGossip(_OneRow):
    name = "clipped-gossip"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        z, scales, tau = kernels.clipped_gossip(X, mask, np.array([self.params.f]))
        if not np.isfinite(z).all():
            return keep_own(candidates, reasons.COMBINED_NOT_FINITE)
        ids = [c.agent_id for c in present]
        scale = dict(zip(ids, scales[0].tolist(), strict=True))
        row = kernels.clipped_weights(scales, mask)[0].tolist()
        weights = {a: w for s, (a, w) in enumerate(zip(ids, row, strict=True)) if s == 0 or scale[a] > 0.0}
        radius = float(tau[0])
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif c.agent_id not in weights:
                why = reasons.PULL_NOT_FINITE if radius > 0.0 else reasons.pull_clipped(radius)
                decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), why))
            else:
                why = reasons.pull_clipped(radius) if scale[c.agent_id] < 1.0 else ""
                decisions.append(
                    NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], NAN, _loss(c), why)
                )
        return Aggregation(weights, decisions, combined=z[0])


@RULES.register("ios")
class Ios(_OneRow):
    name = "ios"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        z, keep = kernels.ios(X, mask, np.array([self.params.f]))
        if not np.isfinite(z).all():
            return keep_own(candidates, reasons.COMBINED_NOT_FINITE)
        row = kernels.ios_weights(keep)[0].tolist()
        weights = {c.agent_id: w for c, w, k in zip(present, row, keep[0].tolist(), strict=True) if k}
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif c.agent_id in weights:
                decisions.append(NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], NAN, _loss(c)))
            else:
                decisions.append(
                    NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), reasons.IOS_DROPPED)
                )
        return Aggregation(weights, decisions, combined=z[0])
