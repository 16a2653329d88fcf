"""What a vectorized run produced: per-round arrays, and the rows and records made from them.

Decisions are kept as codes per (round, agent, slot) (``mtl_node.kernels.decisions``) and turned
into the decision log's rows, with the same reasons the daemons write, only when asked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl_node.aggregation import NeighborDecision, RuleParams, robust
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels.decisions import (
    CAPPED,
    CLIPPED,
    CLIPPED_AWAY,
    DECISION_NAMES,
    FILTERED,
    IOS_OUT,
    KRUM_OTHER,
    MISSING,
    MISSING_CODES,
    NOT_FINITE,
    OUTSIDE_RADIUS,
    RADIUS_CLIPPED,
    REFUSED,
    UBAR_FAR,
    UBAR_LOSS,
    UNBOUNDED,
)
from mtl_node.recorder import RoundRecord
from mtl_node.tasks import Metrics

# Why a whole row kept only its own model (per round and agent).
ROW_COOPERATED, ROW_NON_COOPERATIVE, ROW_OWN_NOT_FINITE, ROW_TOO_FEW, ROW_COMBINED_NOT_FINITE = range(5)
ROW_REASONS = (
    "",
    reasons.NON_COOPERATIVE,
    reasons.OWN_NOT_FINITE,
    "",  # built from the row: robust.too_few_reason
    reasons.COMBINED_NOT_FINITE,
)


@dataclass(frozen=True)
class Decisions:
    """Per-neighbour decisions, arrays of shape (rounds, agents, slots); NaN where undefined."""

    code: np.ndarray  # int8: ACCEPTED, FILTERED, MISSING, NOT_FINITE, LEFT_OUT
    weight: np.ndarray
    ema: np.ndarray
    loss: np.ndarray
    row_reason: np.ndarray  # (rounds, agents) int8: ROW_*
    chosen: np.ndarray  # (rounds, agents) int: the slot Krum selected (-1: not a Krum row)
    radius: np.ndarray  # (rounds, agents): the row's number its reasons quote: the clipping radius
    # (loss-filtered-clipped, clipped-gossip), balance's radius, ubar's count of closest neighbours
    distance: np.ndarray | None = None  # (rounds, agents, slots): balance's distances to own model


@dataclass(frozen=True)
class BatchedResult:
    """Everything a run produced, as arrays indexed [round - 1, agent] (agents in config order).

    ``metrics_rows`` / ``decision_rows`` give the rows of metrics.csv / the decision log in the
    shape of ``RoundRecord.metrics_row`` / ``decision_rows``; ``records`` gives RoundRecords like
    the per-agent engine's recorders.
    """

    agents: tuple[str, ...]
    roles: tuple[str, ...]
    rules: tuple[str, ...]
    slots: tuple[tuple[str, ...], ...]  # per agent: itself, then its neighbours in order
    loss: np.ndarray  # (rounds, agents)
    test_loss: np.ndarray
    accepted: np.ndarray  # (rounds, agents) int
    filtered: np.ndarray
    missing: np.ndarray
    final_models: np.ndarray  # (agents, 2)
    models: np.ndarray | None  # (rounds, agents, 2) when run with keep_models
    decisions: Decisions | None  # when run with record_decisions
    round_seconds: np.ndarray  # (rounds,) wall time of each batched round (all agents)
    seconds: float  # total wall time including setup
    rule_params: tuple[RuleParams, ...] = ()  # per agent, for reasons that quote a parameter

    @property
    def rounds(self) -> int:
        return int(self.loss.shape[0])

    def metrics_rows(self) -> Iterator[dict[str, Any]]:
        """One row per (round, agent), round-major, with the columns of metrics.csv."""
        loss, test_loss = self.loss.tolist(), self.test_loss.tolist()
        acc, fil, mis = self.accepted.tolist(), self.filtered.tolist(), self.missing.tolist()
        for r in range(self.rounds):
            for k, agent in enumerate(self.agents):
                yield {
                    "round": r + 1,
                    "agent": agent,
                    "role": self.roles[k],
                    "rule": self.rules[k],
                    "loss": _num(loss[r][k]),
                    "test_loss": _num(test_loss[r][k]),
                    "test_accuracy": None,
                    "attack_success": None,
                    "accepted": acc[r][k],
                    "filtered": fil[r][k],
                    "missing": mis[r][k],
                }

    def decision_rows(self) -> Iterator[dict[str, Any]]:
        """Rows like ``RoundRecord.decision_rows`` (the agent itself first); needs record_decisions."""
        if self.decisions is None:
            raise RuntimeError("decisions were not recorded: run_batched(..., record_decisions=True)")
        for r in range(self.rounds):
            for k, agent in enumerate(self.agents):
                for d in self._decisions(r, k):
                    yield {
                        "round": r + 1,
                        "agent": agent,
                        "rule": self.rules[k],
                        "agent_id": d.agent_id,
                        "decision": d.decision,
                        "weight": _num(d.weight),
                        "ema": _num(d.ema),
                        "loss": _num(d.loss),
                        "reason": d.reason,
                        "neighbor": d.agent_id,
                    }

    def records(self) -> dict[str, list[RoundRecord]]:
        """Per agent, its RoundRecords (decisions empty unless recorded), like run_agents gives."""
        out: dict[str, list[RoundRecord]] = {}
        for k, agent in enumerate(self.agents):
            rows = []
            for r in range(self.rounds):
                rows.append(
                    RoundRecord(
                        agent=agent,
                        round=r + 1,
                        role=self.roles[k],
                        rule=self.rules[k],
                        metrics=Metrics(float(self.loss[r, k]), float(self.test_loss[r, k])),
                        accepted=int(self.accepted[r, k]),
                        filtered=int(self.filtered[r, k]),
                        missing=int(self.missing[r, k]),
                        decisions=tuple(self._decisions(r, k)),
                        seconds=float(self.round_seconds[r]),
                    )
                )
            out[agent] = rows
        return out

    def _decisions(self, r: int, k: int) -> list[NeighborDecision]:
        d = self.decisions
        if d is None:
            return []
        row = int(d.row_reason[r, k])
        codes = d.code[r, k]
        if row == ROW_TOO_FEW:
            present = int(sum(1 for c in codes[: len(self.slots[k])] if c not in MISSING_CODES))
            row_reason = robust.too_few_reason(self.rules[k], self.rule_params[k].f, present) or ""
        else:
            row_reason = ROW_REASONS[row]
        out = []
        for s, neighbor in enumerate(self.slots[k]):
            code = int(codes[s])
            ema = float(d.ema[r, k, s])
            if code == MISSING:
                reason = self._missing_reason(k, s)
            elif code == FILTERED:
                reason = reasons.worse_than_self(ema, float(d.ema[r, k, 0]))
            elif code == NOT_FINITE:
                reason = reasons.SCORE_NOT_FINITE
            elif code == KRUM_OTHER:
                reason = reasons.krum_selected(self.slots[k][int(d.chosen[r, k])])
            elif code == CLIPPED:
                reason = reasons.pull_clipped(self.rule_params[k].clip_tau)
            elif code == UNBOUNDED:
                reason = reasons.PULL_NOT_FINITE
            elif code == CAPPED:
                reason = reasons.weight_capped(self.rule_params[k].weight_cap)
            elif code in (RADIUS_CLIPPED, CLIPPED_AWAY):
                reason = reasons.pull_clipped(float(d.radius[r, k]))
            elif code == UBAR_FAR:
                reason = reasons.ubar_far(int(d.radius[r, k]))
            elif code == UBAR_LOSS:
                reason = reasons.ubar_loss(float(d.loss[r, k, s]), float(d.loss[r, k, 0]))
            elif code == OUTSIDE_RADIUS:
                assert d.distance is not None  # recorded when a balance row exists
                reason = reasons.outside_radius(float(d.distance[r, k, s]), float(d.radius[r, k]))
            elif code == IOS_OUT:
                reason = reasons.IOS_DROPPED
            elif code == REFUSED:
                reason = f"unavailable: {neighbor}: round {r + 1}: refused (omission)"
            else:
                reason = row_reason
            out.append(
                NeighborDecision(
                    neighbor,
                    DECISION_NAMES[code],
                    float(d.weight[r, k, s]),
                    ema,
                    float(d.loss[r, k, s]),
                    reason,
                )
            )
        return out

    def _missing_reason(self, k: int, s: int) -> str:
        # The same words the round loop writes for the two ways a model can be missing here.
        neighbor = self.slots[k][s]
        if neighbor not in self.agents:
            return f"unavailable: no agent {neighbor!r} in this process"
        return "non-finite: w: contains NaN or Inf"


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None
