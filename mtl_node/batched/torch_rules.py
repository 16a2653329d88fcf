"""Aggregation for the torch batched engine: every agent's rule in one pass over (rows x slots).

The per-agent engine asks each agent's rule object (``mtl_node.aggregation``) to aggregate its
neighbourhood; each of those calls the kernels in ``mtl_node.kernels`` with one row. Here the rows of
the rules that the kernels cover row-wise are aggregated all at once, as the target-localization
engine (``mtl_node/batched/engine.py``) does in numpy: the running-score rules (loss,
loss-filtered, distance, loss-filtered-capped) through :func:`mtl_node.kernels.ema.ema_step` and
:func:`mtl_node.kernels.hardened.cap_weights` over (rows x slots) with a presence mask; average and
none (and every Byzantine row, whose rule is none) by their definitions (equal weights over the
present members; the own model). Every other rule (the robust and decentralized rules,
loss-filtered-clipped) keeps one rule object per row, called as the agent calls it.

Decisions are kept per round as codes (``mtl_node.kernels.decisions``) with the weights, running
scores and losses of every slot, and become the ``NeighborDecision`` rows of a ``RoundRecord`` only
when someone reads them (:class:`RowDecisions`): building 900 decision objects a round cost more
than the rest of the aggregation, and a sweep never reads them. Their values and reasons are the
ones the agent's rule object writes (tests/unit/test_torch_batched.py compares every field).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from mtl_node.aggregation import RULES, Candidate, NeighborDecision, Rule, RuleParams, make_rule
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels.decisions import (
    ACCEPTED,
    CAPPED,
    DECISION_NAMES,
    FILTERED,
    LEFT_OUT,
    MISSING,
    NOT_FINITE,
)
from mtl_node.kernels.ema import ema_step
from mtl_node.kernels.hardened import cap_weights

NAN = math.nan
# Running-score rules aggregated by the kernels over all rows: name -> whether they filter.
EMA_RULES = {"loss": False, "loss-filtered": True, "distance": False, "loss-filtered-capped": True}
VECTOR_RULES = frozenset({"none", "average", *EMA_RULES})


@dataclass(frozen=True)
class _Round:
    """One round's decisions of every row, as arrays; rows of rule objects keep their own list."""

    slot_ids: Sequence[tuple[str, ...]]
    code: np.ndarray  # (rows, slots) int8
    weight: np.ndarray  # (rows, slots) float64
    ema: np.ndarray
    loss: np.ndarray
    row_reason: Sequence[str]  # the own slot's (and left-out slots') reason
    cap: Sequence[float]  # loss-filtered-capped's weight_cap per row (for its reason)
    missing: Mapping[tuple[int, int], str]  # why (row, slot) received nothing valid

    def decisions(self, k: int) -> tuple[NeighborDecision, ...]:
        ids = self.slot_ids[k]
        w = len(ids)
        code = self.code[k, :w].tolist()
        weight, ema, loss = self.weight[k, :w].tolist(), self.ema[k, :w].tolist(), self.loss[k, :w].tolist()
        out = []
        for s, agent in enumerate(ids):
            c = code[s]
            if c == MISSING:
                why = self.missing[k, s]
            elif c == FILTERED:
                why = reasons.worse_than_self(ema[s], ema[0])
            elif c == NOT_FINITE:
                why = reasons.SCORE_NOT_FINITE
            elif c == CAPPED:
                why = reasons.weight_capped(self.cap[k])
            elif c == LEFT_OUT or s == 0:
                why = self.row_reason[k]
            else:
                why = ""
            out.append(NeighborDecision(agent, DECISION_NAMES[c], weight[s], ema[s], loss[s], why))
        return tuple(out)


class RowDecisions(Sequence[NeighborDecision]):
    """One agent's decisions of one round, built from the round's arrays when first read."""

    __slots__ = ("_items", "_k", "_round", "_size")

    def __init__(self, round_: _Round, k: int) -> None:
        self._round: _Round | None = round_
        self._k = k
        self._size = len(round_.slot_ids[k])
        self._items: tuple[NeighborDecision, ...] | None = None

    def _get(self) -> tuple[NeighborDecision, ...]:
        if self._items is None:
            assert self._round is not None
            self._items, self._round = self._round.decisions(self._k), None
        return self._items

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, i: int) -> NeighborDecision: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[NeighborDecision]: ...
    def __getitem__(self, i: int | slice) -> NeighborDecision | Sequence[NeighborDecision]:
        return self._get()[i]

    def __iter__(self) -> Iterator[NeighborDecision]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return self._get() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


@dataclass(frozen=True)
class Aggregated:
    """What the rules decided this round, for every row."""

    weights: np.ndarray  # (rows, slots) float64; the own slot 1 for rows that keep their model
    keep_own: np.ndarray  # (rows,) bool: the row's new model is its own adapted model
    combined: dict[int, np.ndarray]  # rows whose rule returned a combined (flattened) model
    decisions: list[Sequence[NeighborDecision]]
    accepted: list[int]
    filtered: list[int]
    missing: list[int]


class RowRules:
    """The rules of every row: arrays of running state for the vectorized ones, objects for the rest."""

    def __init__(
        self,
        rules: Sequence[str],
        params: Sequence[RuleParams],
        byzantine: Sequence[bool],
        slot_ids: Sequence[tuple[str, ...]],
    ) -> None:
        n = len(rules)
        self.slot_ids = list(slot_ids)
        self.width = width = max(len(s) for s in slot_ids)
        self.exists = np.array([[s < len(ids) for s in range(width)] for ids in slot_ids])
        # A Byzantine row runs rule none (it sends its attack, it does not combine).
        self.names = ["none" if z else r for r, z in zip(rules, byzantine, strict=True)]
        self.params = list(params)
        self.cooperating = np.array([r != "none" for r in self.names])
        self.objects: dict[int, Rule] = {
            k: make_rule(r, params[k]) for k, r in enumerate(self.names) if r not in VECTOR_RULES
        }
        kinds = [RULES.get(r) for r in self.names]
        self.needs_loss = np.array(
            [c and kind.needs_loss for c, kind in zip(self.cooperating, kinds, strict=True)]
        )
        self.needs_distance = np.array(
            [c and kind.needs_distance for c, kind in zip(self.cooperating, kinds, strict=True)]
        )
        self.needs_models = [k for k, kind in enumerate(kinds) if self.cooperating[k] and kind.needs_models]
        self.average = np.array([r == "average" for r in self.names])
        self.ema_rows = np.array([k for k, r in enumerate(self.names) if r in EMA_RULES], dtype=np.intp)
        p = [params[k] for k in self.ema_rows]
        col = (len(p), 1)
        self.nu = np.array([q.nu for q in p], dtype=np.float64).reshape(col)
        self.ema_init = np.array([NAN if q.ema_init is None else q.ema_init for q in p]).reshape(col)
        self.floor = np.array([q.floor for q in p], dtype=np.float64).reshape(col)
        self.filtering = np.array([EMA_RULES[self.names[k]] for k in self.ema_rows], dtype=bool).reshape(col)
        self.by_distance = np.array([self.names[k] == "distance" for k in self.ema_rows], dtype=bool)
        self.capped = np.array([self.names[k] == "loss-filtered-capped" for k in self.ema_rows], dtype=bool)
        self.cap = [q.weight_cap for q in params]
        self.ema = np.zeros((len(p), width))
        self.seen = np.zeros((len(p), width), dtype=bool)
        self.self_reason = [reasons.NON_COOPERATIVE if not c else "" for c in self.cooperating]
        self.n = n

    def aggregate(
        self,
        losses: np.ndarray,
        distances: np.ndarray,
        present: np.ndarray,
        missing: Mapping[tuple[int, int], str],
        vectors: Callable[[int], np.ndarray],
    ) -> Aggregated:
        """One round. ``losses`` / ``distances``: (rows, slots) float64, NaN where not scored;
        ``present``: (rows, slots) bool, the slot received a valid model (slot 0 always);
        ``vectors(k)``: row k's received models flattened (rows whose rule needs the models)."""
        n, width = self.n, self.width
        present = present & self.exists
        exists = self.exists
        code = np.where(present, ACCEPTED, MISSING).astype(np.int8)
        weights = np.zeros((n, width))
        ema_out = np.full((n, width), NAN)
        keep_own = ~self.cooperating.copy()
        row_reason = list(self.self_reason)
        # loss reported in the decisions: the rule's own score input, where it was computed
        loss_out = np.where(present & self.needs_loss[:, None], losses, NAN)

        rows = self.ema_rows
        if len(rows):
            score = np.where(self.by_distance[:, None], distances[rows], losses[rows])
            own_ok = np.isfinite(score[:, 0])
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                step = ema_step(
                    score,
                    present[rows],
                    self.ema,
                    self.seen,
                    nu=self.nu,
                    ema_init=self.ema_init,
                    floor=self.floor,
                    filtering=self.filtering,
                    cooperating=own_ok,
                )
            self.ema, self.seen = step.ema, step.seen
            w = step.weights
            c = code[rows]
            c[step.worse] = FILTERED
            c[present[rows] & ~step.updated & own_ok[:, None]] = NOT_FINITE
            capped = np.flatnonzero(self.capped & own_ok)
            if len(capped):
                w[capped], hit = cap_weights(w[capped], np.array([self.cap[k] for k in rows[capped]]))
                c[capped] = np.where(hit, CAPPED, c[capped])
            ema_out[rows] = np.where(own_ok[:, None] & step.seen, step.ema, NAN)
            weights[rows] = w
            code[rows] = c
            for j in np.flatnonzero(~own_ok).tolist():
                k = int(rows[j])
                keep_own[k] = True
                row_reason[k] = reasons.OWN_NOT_FINITE

        avg = np.flatnonzero(self.average)
        if len(avg):
            weights[avg] = present[avg] / present[avg].sum(axis=1, keepdims=True)

        # Rows that keep their own model: every present member left out (every listed one for rows
        # that do not cooperate: they fetch nothing, so nobody is missing).
        code[keep_own] = np.where((present | ~self.cooperating[:, None])[keep_own], LEFT_OUT, MISSING)
        code[keep_own, 0] = ACCEPTED
        weights[keep_own] = 0.0
        weights[keep_own, 0] = 1.0
        ema_out[keep_own] = NAN

        decisions: list[Sequence[NeighborDecision]] = []
        snapshot = _Round(self.slot_ids, code, weights, ema_out, loss_out, row_reason, self.cap, missing)
        decisions = [RowDecisions(snapshot, k) for k in range(n)]
        listed = exists.copy()
        listed[:, 0] = False
        accepted = ((code == ACCEPTED) | (code == CAPPED)) & listed
        gone = (code == MISSING) & listed
        counts = [
            accepted.sum(axis=1).tolist(),
            (listed & ~accepted & ~gone).sum(axis=1).tolist(),
            gone.sum(axis=1).tolist(),
        ]
        combined: dict[int, np.ndarray] = {}
        for k, rule in self.objects.items():
            agg = rule.aggregate(self._candidates(k, losses, distances, present, missing, vectors))
            decisions[k] = tuple(agg.decisions)
            counts[0][k], counts[1][k], counts[2][k] = (
                agg.count("accepted"),
                agg.count("filtered"),
                agg.count("missing"),
            )
            if agg.combined is not None:
                combined[k] = agg.combined
                continue
            ids = self.slot_ids[k]
            weights[k] = 0.0
            weights[k, : len(ids)] = [agg.weights.get(a, 0.0) for a in ids]
        return Aggregated(weights, keep_own, combined, decisions, *counts)

    def _candidates(
        self,
        k: int,
        losses: np.ndarray,
        distances: np.ndarray,
        present: np.ndarray,
        missing: Mapping[tuple[int, int], str],
        vectors: Callable[[int], np.ndarray],
    ) -> list[Candidate]:
        ids = self.slot_ids[k]
        loss: list[Any] = losses[k].tolist() if self.needs_loss[k] else [None] * len(ids)
        dist: list[Any] = distances[k].tolist() if self.needs_distance[k] else [None] * len(ids)
        models: Any = vectors(k) if k in self.needs_models else [None] * len(ids)
        return [
            Candidate(a, loss[s], dist[s], model=models[s])
            if present[k, s]
            else Candidate(a, missing_reason=missing[k, s])
            for s, a in enumerate(ids)
        ]
