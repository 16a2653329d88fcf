"""Hardened variants of the paper's loss-filtered rule (eq. 10), each a rule of its own.

The paper's filter keeps a neighbour whose EMA loss on the agent's data is no worse than the
agent's own, and weighs the kept ones by inverse EMA loss. An attacker that stays *just* inside
that budget is accepted with about the agent's own weight every round: "capture" attacks serve the
victim its own model moved a little towards a goal (attacks/capture.py: distance-capture,
loss-budget). The loss only sees the directions the agent's data constrain (target localization:
the direction to the target), so the pull accumulates along the others. docs/robustness.md
measures it; these variants bound it, and keep the paper's filter and weights otherwise.

- ``loss-filtered-capped``: no kept neighbour may weigh more than ``weight_cap`` times the agent's
  own weight; the excess goes to the agent itself. Bounds what one low-loss neighbour can take.
- ``loss-filtered-clipped``: the kept neighbours' pulls psi_l - psi_k are clipped to a radius tau
  around the agent's own model: theta = psi_k + sum_l a_l clip(psi_l - psi_k, tau) (self-centred
  clipping, He et al. 2022), with tau = ``clip_scale`` x the agent's own typical adaptation step
  (an EMA of ||psi_k - theta_k(i-1)||^2 with the rule's nu): a radius that only the agent's own
  data set, so no neighbour can move the agent further per round than clip_scale times its own
  data do, however the kept set is made up. (A radius taken from the kept neighbours' distances,
  e.g. their median, is set by the attackers as soon as they are most of the kept set.)

- ``loss-filtered-median``: the members the filter keeps (the agent included) are combined by their
  coordinate-wise median instead of the inverse-loss weighted mean. The filter picks the agents
  that learn the agent's task (multi-task learning: robust statistics over the whole neighbourhood
  mix the tasks, docs/robustness.md); the median then ignores a minority of kept members whose
  parameters deviate in a few coordinates, which is what a backdoor does (the weights that read the
  trigger) and what a model riding the loss budget does (it moves where the agent's loss is flat).
  It assumes that the attackers are fewer than half of what the filter keeps, the agent included;
  with one kept neighbour it is the plain mean of the two, with none the agent's own model.

The first two reduce exactly to loss-filtered when nothing binds. The round loop scores the agent's own
model on the sample it has just adapted on (docs/design.md), so the own EMA is biased low and
the filter errs towards keeping less; neither variant changes that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mtl_node.aggregation.base import RULES, Aggregation, Candidate
from mtl_node.aggregation.rules import LossFiltered
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels.hardened import cap_weights, clip_pulls, kept_median, own_step_ema

NAN = math.nan

# The hardened rules (the vectorized engine runs them all: mtl_node/batched/engine.py).
HARDENED_RULES = ("loss-filtered-capped", "loss-filtered-clipped", "loss-filtered-median")


@RULES.register("loss-filtered-capped")
class LossFilteredCapped(LossFiltered):
    """a'_l = min(a_l, c a_k) for every kept neighbour l, a'_k = 1 - sum_l a'_l (c = weight_cap).

    Since a'_k >= a_k the cap also holds against the final own weight: a'_l <= c a'_k."""

    name = "loss-filtered-capped"

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        agg = super().aggregate(candidates)
        if len(agg.weights) <= 1:
            return agg
        ids = [c.agent_id for c in candidates]
        row = np.array([[agg.weights.get(a, 0.0) for a in ids]])
        capped, hit = cap_weights(row, np.array([self.params.weight_cap]))
        if not hit.any():
            return agg
        values = capped[0].tolist()
        weights = {a: values[s] for s, a in enumerate(ids) if a in agg.weights}
        why = reasons.weight_capped(self.params.weight_cap)
        flags = dict(zip(ids, hit[0].tolist(), strict=True))
        decisions = [
            replace(d, weight=weights[d.agent_id], reason=why)
            if d.decision == "accepted" and flags[d.agent_id]
            else replace(d, weight=weights.get(d.agent_id, 0.0))
            for d in agg.decisions
        ]
        return Aggregation(weights, decisions)


@RULES.register("loss-filtered-clipped")
class LossFilteredClipped(LossFiltered):
    """theta = psi_k + sum_{l kept} a_l s_l (psi_l - psi_k), s_l = min(1, tau / ||psi_l - psi_k||),
    tau = clip_scale x sqrt(EMA of ||psi_k - theta_k(i-1)||^2): the agent's own adaptation step,
    which only its own data set. Effective weights a_l s_l, the agent's own the rest."""

    name = "loss-filtered-clipped"
    needs_models = True
    needs_distance = True  # the agent's own candidate carries ||theta_k(i-1) - psi_k||^2

    def __init__(self, params=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self.step: float | None = None  # EMA of the squared own step

    def state(self) -> dict[str, Any]:
        return {**super().state(), "step": self.step}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        step = state.get("step")
        self.step = None if step is None else float(step)

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        own = candidates[0]
        step = NAN if own.sq_distance is None else own.sq_distance
        prev = NAN if self.step is None else self.step
        new = float(own_step_ema(np.array([prev]), np.array([step]), np.array([self.params.nu]))[0])
        self.step = None if math.isnan(new) else new
        agg = super().aggregate(candidates)
        members = [c for c in candidates if c is own or agg.weights.get(c.agent_id, 0.0) > 0.0]
        if len(members) == 1 or self.step is None:
            return agg
        for c in members:
            if c.model is None:
                raise ValueError(f"{self.name}: member {c.agent_id} has no model (needs_models)")
        tau = self.params.clip_scale * math.sqrt(self.step)
        X = np.stack([np.asarray(c.model, dtype=np.float64) for c in members])[None, :, :]
        kept = np.ones((1, len(members)), dtype=bool)
        kept[0, 0] = False
        a = np.array([[agg.weights[c.agent_id] for c in members]])
        out = clip_pulls(X, kept, a, np.array([tau]))
        if not out.finite[0]:
            return agg
        ids = [c.agent_id for c in members]
        eff = out.weights[0].tolist()
        weights = {ids[0]: eff[0]}
        weights.update({a: w for a, w in zip(ids[1:], eff[1:], strict=True) if w > 0.0})
        flags = dict(zip(ids, out.clipped[0].tolist(), strict=True))
        dropped = {a for a, d in zip(ids, out.dropped[0].tolist(), strict=True) if d}
        decisions = []
        for d in agg.decisions:
            if d.agent_id in dropped:
                decisions.append(replace(d, decision="filtered", weight=0.0, reason=reasons.PULL_NOT_FINITE))
            elif flags.get(d.agent_id):
                # tau 0 (an agent whose own data have not moved it yet) clips a pull to nothing.
                w = weights.get(d.agent_id, 0.0)
                decisions.append(replace(d, weight=w, reason=reasons.pull_clipped(tau)))
            else:
                decisions.append(replace(d, weight=weights.get(d.agent_id, 0.0)))
        return Aggregation(weights, decisions, combined=out.combined[0])


@RULES.register("loss-filtered-median")
class LossFilteredMedian(LossFiltered):
    """theta = coordinate-wise median of {psi_k} + {psi_l : l kept by the loss filter}. Every member
    of that set is logged as accepted with weight 1/m (m its size): the median is not a weighted
    sum, so the weights say who took part, as the robust baselines' do."""

    name = "loss-filtered-median"
    needs_models = True

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        agg = super().aggregate(candidates)
        members = [c for c in candidates if agg.weights.get(c.agent_id, 0.0) > 0.0]
        if len(members) <= 1 or members[0] is not candidates[0]:
            return agg
        for c in members:
            if c.model is None:
                raise ValueError(f"{self.name}: member {c.agent_id} has no model (needs_models)")
        X = np.stack([np.asarray(c.model, dtype=np.float64) for c in members])[None, :, :]
        kept = np.ones((1, len(members)), dtype=bool)
        with np.errstate(over="ignore", invalid="ignore"):
            combined = kept_median(X, kept)[0]
        if not np.isfinite(combined).all():
            return agg
        w = 1.0 / len(members)
        weights = {c.agent_id: w for c in members}
        decisions = [replace(d, weight=weights.get(d.agent_id, 0.0)) for d in agg.decisions]
        return Aggregation(weights, decisions, combined=combined)
