"""A vectorized in-process engine for target localization: the fast path for sweeps.

The per-agent engine (``mtl_node.engine.run_agents``) runs every agent's round loop as its own
asyncio task and hands torch tensors around; that is what makes it a faithful oracle of the daemons,
and also why a 100-agent, 500-round sweep spends nearly all its time in interpreter overhead. Here
all N agents' models are one ``(N, 2)`` float64 array and a round is a few numpy operations over
``(N, D)`` *slot* arrays: slot 0 of row k is agent k itself, slots 1.. its neighbours in aggregation
order, padded to the largest neighbourhood D. In slot form

- ``models[k, s]`` is the model agent k received from its s-th neighbour this round (a Byzantine
  sender's crafted model replaces its honest one, per receiver where the attack says so),
- ``scores[k, s]`` is the loss of that model on agent k's own sample (or its squared distance to
  theta_k(i-1) for the distance rule): the paper's loss matrix L[k, l] restricted to edges,
- the EMA matrix, filter and inverse-EMA weights are row-wise masks and sums, and the combination
  theta_k = sum_l a_lk psi_l is one batched matrix product.

It implements exactly the semantics of ``mtl_node.agent.Agent`` with ``mtl_node.aggregation.rules``
(RuleParams nu / ema_init / floor, ties accepted, self always kept, NaN/inf scores excluded without
touching the EMA, a non-finite own score keeps the own model, missing neighbours left out), of the
robust baselines of ``mtl_node.aggregation.robust`` (whose kernels it calls on every row of a rule
at once: the rows are the neighbourhoods, the slots the members, absent ones masked) and of
the ``constant`` attack, and draws its data from ``mtl_node.tasks.target_localization`` with the same
seeds. It is cross-checked against the per-agent engine by ``tests/unit/test_batched.py``: per-round
metrics, decisions and final models agree to 1e-9. Anything it does not cover (other tasks, other
attacks, cuda) is refused by :func:`supports`; callers fall back to the per-agent engine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtl_node import seeding
from mtl_node.aggregation import NeighborDecision, RuleParams, robust
from mtl_node.aggregation.base import Decision
from mtl_node.attack_api import make_attack
from mtl_node.config import NodeConfig
from mtl_node.recorder import RoundRecord
from mtl_node.tasks import Metrics, TaskContext
from mtl_node.tasks.base import parse_params
from mtl_node.tasks.target_localization import (
    BLOCK,
    Resolved,
    TargetLocalization,
    TargetLocalizationParams,
    sample_block,
)

log = logging.getLogger(__name__)

TASK = "target-localization"
RULES = ("none", "average", "loss", "loss-filtered", "distance", *robust.ROBUST_RULES)
ATTACKS = ("constant",)

# What a slot's decision was, finer than the three public decisions so that reasons can be
# reconstructed exactly: FILTERED = worse than self, NOT_FINITE = score NaN/inf (filtered),
# LEFT_OUT = the row kept only its own model (non-cooperative, own score not finite, too few
# members for a robust rule, combined model not finite), KRUM_OTHER = not the member Krum selected,
# CLIPPED = accepted with its pull clipped (self-clipping), UNBOUNDED = pull not finite (filtered).
ACCEPTED, FILTERED, MISSING, NOT_FINITE, LEFT_OUT, KRUM_OTHER, CLIPPED, UNBOUNDED = range(8)
DECISION_NAMES: tuple[Decision, ...] = (
    "accepted",
    "filtered",
    "missing",
    "filtered",
    "filtered",
    "filtered",
    "accepted",
    "filtered",
)
_ACCEPTED_CODES = (ACCEPTED, CLIPPED)
_MISSING_CODES = (MISSING,)
# Why a whole row kept only its own model (per round and agent).
ROW_COOPERATED, ROW_NON_COOPERATIVE, ROW_OWN_NOT_FINITE, ROW_TOO_FEW, ROW_COMBINED_NOT_FINITE = range(5)
_ROW_REASONS = (
    "",
    "non-cooperative",
    "own score not finite; keeping own model",
    "",  # built from the row: robust.too_few_reason
    robust.NOT_FINITE_REASON,
)

# Row kinds: how an agent aggregates (Byzantine agents learn alone, like Agent does).
_NONE, _AVERAGE, _EMA, _ROBUST = 0, 1, 2, 3


def unsupported_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Why the batched engine cannot run these configs, or None when it can."""
    if not configs:
        return "no agents"
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        return "agent ids are not unique"
    rounds = {c.rounds for c in configs}
    if len(rounds) != 1:
        return f"agents run different numbers of rounds ({sorted(rounds)})"
    for c in configs:
        if c.task != TASK:
            return f"{c.id}: task {c.task!r} (only {TASK})"
        if c.device != "cpu":
            return f"{c.id}: device {c.device!r} (only cpu)"
        if c.rule not in RULES:
            return f"{c.id}: rule {c.rule!r} (only {', '.join(RULES)})"
        if c.attack is not None and c.attack not in ATTACKS:
            return f"{c.id}: attack {c.attack!r} (only {', '.join(ATTACKS)})"
    return None


def supports(configs: Sequence[NodeConfig]) -> bool:
    """True when :func:`run_batched` gives the same results as the per-agent engine for these."""
    return unsupported_reason(configs) is None


@dataclass(frozen=True)
class Decisions:
    """Per-neighbour decisions, arrays of shape (rounds, agents, slots); NaN where undefined."""

    code: np.ndarray  # int8: ACCEPTED, FILTERED, MISSING, NOT_FINITE, LEFT_OUT
    weight: np.ndarray
    ema: np.ndarray
    loss: np.ndarray
    row_reason: np.ndarray  # (rounds, agents) int8: ROW_*
    chosen: np.ndarray  # (rounds, agents) int: the slot Krum selected (-1: not a Krum row)


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
            present = int(sum(1 for c in codes[: len(self.slots[k])] if c not in _MISSING_CODES))
            row_reason = robust.too_few_reason(self.rules[k], self.rule_params[k].f, present) or ""
        else:
            row_reason = _ROW_REASONS[row]
        out = []
        for s, neighbor in enumerate(self.slots[k]):
            code = int(codes[s])
            ema = float(d.ema[r, k, s])
            if code == MISSING:
                reason = self._missing_reason(k, s)
            elif code == FILTERED:
                reason = f"ema {ema:.4g} > own {float(d.ema[r, k, 0]):.4g}"
            elif code == NOT_FINITE:
                reason = "score not finite"
            elif code == KRUM_OTHER:
                reason = f"krum selected {self.slots[k][int(d.chosen[r, k])]}"
            elif code == CLIPPED:
                reason = robust.clip_reason(self.rule_params[k].clip_tau)
            elif code == UNBOUNDED:
                reason = robust.UNBOUNDED
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


class _Attackers:
    """The ``constant`` attack for every Byzantine sender, drawn exactly as Constant.craft does.

    Only (receiver, slot) pairs whose receiver actually uses what it fetched are drawn: Byzantine
    and non-cooperative receivers discard their fetches. A sender drawing once serves one fixed
    model, one drawing per round one model per round to all, one drawing per request one per
    receiver and round.
    """

    def __init__(self, configs: Sequence[NodeConfig], receivers: np.ndarray, senders: np.ndarray) -> None:
        self.configs = configs
        self.params: dict[int, tuple[float, float, str]] = {}
        for a in sorted(set(senders.tolist())):
            cfg = configs[a]
            assert cfg.attack is not None
            p = make_attack(cfg.attack, cfg.id, cfg.seed, cfg.attack_params).params
            self.params[a] = (float(p.low), float(p.high), str(p.redraw))  # type: ignore[attr-defined]
        redraw = np.array([self.params[a][2] for a in senders.tolist()], dtype=object)
        self.pairs = len(senders)
        never = np.flatnonzero(redraw == "never")
        self.fixed = never, np.array([self._draw(a) for a in senders[never].tolist()]).reshape(-1, 2)
        per_round = np.flatnonzero(redraw == "round")
        self.round_senders = sorted(set(senders[per_round].tolist()))
        position = {a: j for j, a in enumerate(self.round_senders)}
        self.per_round = (
            per_round,
            np.array([position[a] for a in senders[per_round].tolist()], dtype=np.intp),
        )
        per_request = np.flatnonzero(redraw == "request")
        self.per_request = (
            per_request,
            [
                (a, tuple(seeding.id_key(configs[k].id)))
                for a, k in zip(senders[per_request].tolist(), receivers[per_request].tolist(), strict=True)
            ],
        )

    def _draw(self, a: int, *counters: int) -> np.ndarray:
        low, high, _ = self.params[a]
        cfg = self.configs[a]
        rng = seeding.generator(cfg.seed, cfg.id, seeding.ATTACK, *counters)
        return rng.uniform(low, high, size=(2,))

    def crafted(self, round_: int) -> np.ndarray:
        """(pairs, 2): the model each attacked pair's sender serves its receiver this round."""
        out = np.empty((self.pairs, 2))
        where, values = self.fixed
        out[where] = values
        where, position = self.per_round
        if len(where):
            draws = np.array([self._draw(a, round_) for a in self.round_senders])
            out[where] = draws[position]
        where, pairs = self.per_request
        for j, (a, key) in zip(where.tolist(), pairs, strict=True):
            out[j] = self._draw(a, round_, *key)
        return out


def _kind(c: NodeConfig) -> int:
    if c.attack or c.rule == "none":
        return _NONE
    if c.rule == "average":
        return _AVERAGE
    if c.rule in robust.ROBUST_RULES:
        return _ROBUST
    return _EMA


class _Batch:
    """What does not change during a run: the network in slot form, per-row rules, task data."""

    def __init__(self, configs: Sequence[NodeConfig]) -> None:
        self.configs = configs
        n = self.n = len(configs)
        self.ids = [c.id for c in configs]
        index = {agent: k for k, agent in enumerate(self.ids)}

        # The network: slot 0 is the agent itself, then its neighbours in aggregation order.
        self.slot_ids = [(c.id, *c.neighbors) for c in configs]
        width = self.width = max(len(s) for s in self.slot_ids)
        self.nbr = np.zeros((n, width), dtype=np.intp)  # agent index of each slot (0: no agent)
        self.listed = np.zeros((n, width), dtype=bool)  # the slot is a listed neighbour (or self)
        self.exists = np.zeros((n, width), dtype=bool)  # ... and it is an agent of this run
        for k, members in enumerate(self.slot_ids):
            for s, agent in enumerate(members):
                self.listed[k, s] = True
                if agent in index:
                    self.exists[k, s] = True
                    self.nbr[k, s] = index[agent]
        self.neighbours = self.listed.copy()
        self.neighbours[:, 0] = False

        # Roles and rules, per row. Byzantine agents learn alone, as Agent makes them.
        self.byzantine = np.array([c.attack is not None for c in configs])
        kind = np.array([_kind(c) for c in configs])
        self.ema_rows = kind == _EMA
        self.average_rows = kind == _AVERAGE
        self.self_only_rows = kind == _NONE
        self.robust_rows = kind == _ROBUST
        self.uses_fetched = self.ema_rows | self.average_rows | self.robust_rows
        # Robust rules: the rows of each, and their parameters per row.
        self.robust_index = {
            rule: np.flatnonzero(self.robust_rows & np.array([c.rule == rule for c in configs]))
            for rule in robust.ROBUST_RULES
        }
        self.robust_index = {rule: rows for rule, rows in self.robust_index.items() if len(rows)}
        by_distance = np.array([c.rule == "distance" for c in configs])
        self.by_distance = by_distance[:, None]
        self.filtering = np.array([c.rule == "loss-filtered" for c in configs])[:, None]
        self.reports_loss = np.array([c.rule in ("loss", "loss-filtered") and not c.attack for c in configs])
        params = [c.rule_params or RuleParams() for c in configs]
        self.nu = np.array([p.nu for p in params])[:, None]
        self.ema_init = np.array([math.nan if p.ema_init is None else p.ema_init for p in params])[:, None]
        self.init_is_first = np.array([p.ema_init is None for p in params])[:, None]
        self.floor = np.array([p.floor for p in params])[:, None]
        self.params = params
        self.f = np.array([p.f for p in params], dtype=np.int64)
        self.need = np.array(
            [robust.required_members(c.rule, p.f) or 0 for c, p in zip(configs, params, strict=True)]
        )
        self.tau = np.array([p.clip_tau for p in params])
        self.iters = np.array([p.weiszfeld_iters for p in params])
        self.eps = np.array([p.weiszfeld_eps for p in params])
        self.need_loss = bool((self.ema_rows & ~by_distance).any())
        self.need_distance = bool((self.ema_rows & by_distance).any())

        # The task: the same resolved parameters and streams as TargetLocalization.
        self.resolved = []
        for c in configs:
            p = parse_params(TargetLocalization, c.task_params)
            assert isinstance(p, TargetLocalizationParams)
            self.resolved.append(Resolved(TaskContext(c.id, c.seed, torch.device("cpu")), p))
        self.x = np.stack([r.position for r in self.resolved])
        self.mu = np.array([r.mu for r in self.resolved])[:, None]
        self.init = np.stack([r.init for r in self.resolved]).astype(np.float64)
        test_size = max(r.test_samples for r in self.resolved)
        self.test_u = np.zeros((n, test_size, 2))
        self.test_d = np.zeros((n, test_size))
        self.test_mask = np.zeros((n, test_size))
        for k, (c, r) in enumerate(zip(configs, self.resolved, strict=True)):
            tu, td = sample_block(c.seed, c.id, 0, r, size=r.test_samples, purpose=seeding.TEST)
            self.test_u[k, : r.test_samples], self.test_d[k, : r.test_samples] = tu, td
            self.test_mask[k, : r.test_samples] = 1.0
        self.test_count = self.test_mask.sum(axis=1)
        self.equal_tests = bool((self.test_mask == 1.0).all())
        self._block = (-1, np.empty((0,)), np.empty((0,)))

        # Byzantine senders, as the receivers that use what they fetch see them.
        attacked = self.exists & self.neighbours & self.byzantine[self.nbr] & self.uses_fetched[:, None]
        self.attacked_rows, self.attacked_slots = np.nonzero(attacked)
        senders = self.nbr[self.attacked_rows, self.attacked_slots]
        self.attackers = _Attackers(configs, self.attacked_rows, senders)

    def sample(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """Every agent's (u, d) of ``round_``: shapes (n, 2) and (n,)."""
        b = round_ // BLOCK
        if self._block[0] != b:
            blocks = [
                sample_block(c.seed, c.id, b, r) for c, r in zip(self.configs, self.resolved, strict=True)
            ]
            self._block = (b, np.stack([u for u, _ in blocks]), np.stack([d for _, d in blocks]))
        _, u, d = self._block
        return u[:, round_ % BLOCK], d[:, round_ % BLOCK]


@dataclass
class _State:
    theta: np.ndarray  # (n, 2) combined models
    ema: np.ndarray  # (n, slots) running scores
    seen: np.ndarray  # (n, slots) the EMA has had an observation


@dataclass
class _Round:
    """What one round produced, before it is stored."""

    loss: np.ndarray
    test_loss: np.ndarray
    code: np.ndarray
    weights: np.ndarray
    losses: np.ndarray | None
    present: np.ndarray
    cooperating: np.ndarray
    self_only: np.ndarray
    row_reason: np.ndarray
    chosen: np.ndarray


def _step(b: _Batch, st: _State, i: int) -> _Round:
    """One round for every agent at once; updates ``st`` in place."""
    u, d = b.sample(i)

    # adapt: psi = w + mu (q - w), q = x + d u
    q = b.x + d[:, None] * u
    psi = st.theta + b.mu * (q - st.theta)

    # exchange: what each agent receives in each slot; a non-finite model is left out as missing
    received = psi[b.nbr]
    if len(b.attacked_rows):
        received[b.attacked_rows, b.attacked_slots] = b.attackers.crafted(i)
    present = b.exists & np.isfinite(received).all(axis=2)
    present[:, 0] = True
    received = np.where(present[:, :, None], received, 0.0)

    # score each received model on the receiver's own sample / against its previous model
    losses = None
    if b.need_loss:
        losses = (d[:, None] - np.einsum("ksj,kj->ks", received - b.x[:, None, :], u)) ** 2
    distances = ((st.theta[:, None, :] - received) ** 2).sum(axis=2) if b.need_distance else None
    if losses is not None and distances is not None:
        score = np.where(b.by_distance, distances, losses)
    else:
        score = next((m for m in (losses, distances) if m is not None), np.zeros(b.nbr.shape))

    # EMA, filter and inverse-EMA weights, row-wise (rows of the EMA rules only)
    own_ok = np.isfinite(score[:, 0])
    cooperating = b.ema_rows & own_ok
    finite_score = np.isfinite(score)
    update = present & finite_score & cooperating[:, None]
    prev = np.where(st.seen, st.ema, b.ema_init)
    new = np.where(b.init_is_first & ~st.seen, score, (1.0 - b.nu) * prev + b.nu * score)
    st.ema = np.where(update, new, st.ema)
    st.seen |= update
    worse = b.filtering & (st.ema > st.ema[:, :1])  # ties are accepted
    keep = update & ~worse
    # Scaled by the row's smallest kept score, as the rules do, so that no inverse overflows.
    scale = np.maximum(np.where(keep, st.ema, np.inf).min(axis=1, keepdims=True), b.floor)
    inverse = np.where(keep, scale / np.maximum(st.ema, b.floor), 0.0)
    weights = inverse / inverse.sum(axis=1, keepdims=True).clip(min=np.finfo(float).tiny)
    # average: equal weights over the present members; self-only rows keep their own model
    avg = b.average_rows
    weights[avg] = present[avg] / present[avg].sum(axis=1, keepdims=True)
    self_only = b.self_only_rows | (b.ema_rows & ~own_ok)
    row_reason = np.where(
        b.self_only_rows, ROW_NON_COOPERATIVE, np.where(self_only, ROW_OWN_NOT_FINITE, ROW_COOPERATED)
    ).astype(np.int8)

    # robust rules: a statistic of the present members' models (mtl_node.aggregation.robust)
    combined: list[tuple[np.ndarray, np.ndarray]] = []
    chosen = np.full(b.n, -1, dtype=np.intp)
    scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rule, rows in b.robust_index.items():
        mask = present[rows]
        few = mask.sum(axis=1) < b.need[rows]
        row_reason[rows[few]] = ROW_TOO_FEW
        rows, mask = rows[~few], mask[~few]
        if not len(rows):
            continue
        X = received[rows]
        if rule == "krum":
            pick = robust.krum_select(X, mask, b.f[rows])
            weights[rows] = 0.0
            weights[rows, pick] = 1.0
            chosen[rows] = pick
            continue
        if rule == "median":
            z = robust.coordinate_median(X, mask)
        elif rule == "trimmed-mean":
            z = robust.trimmed_mean(X, mask, b.f[rows])
        elif rule == "geometric-median":
            z = robust.geometric_median(X, mask, b.iters[rows], b.eps[rows])
        else:
            z, scale = robust.self_clip(X, mask, b.tau[rows])
        bad = ~np.isfinite(z).all(axis=1)
        row_reason[rows[bad]] = ROW_COMBINED_NOT_FINITE
        rows, mask, z = rows[~bad], mask[~bad], z[~bad]
        n = mask.sum(axis=1, keepdims=True)
        if rule == "self-clipping":
            scale = scale[~bad]
            w = scale / n
            w[:, 0] = 1.0 - w[:, 1:].sum(axis=1)
            weights[rows] = w
            scales[rule] = (rows, scale)
        else:
            weights[rows] = mask / n
        combined.append((rows, z))
    robust_fallback = b.robust_rows & ((row_reason == ROW_TOO_FEW) | (row_reason == ROW_COMBINED_NOT_FINITE))
    self_only |= robust_fallback
    weights[self_only] = 0.0
    weights[self_only, 0] = 1.0

    # combine, then evaluate the combined model on this round's sample and the held-out set
    st.theta = np.einsum("ks,ksj->kj", weights, received)
    for rows, z in combined:
        st.theta[rows] = z
    offset = st.theta - b.x
    loss = (d - np.einsum("kj,kj->k", offset, u)) ** 2
    residual = b.test_d - np.einsum("ktj,kj->kt", b.test_u, offset)
    if b.equal_tests:
        test_loss = np.mean(residual**2, axis=1)
    else:
        test_loss = (residual**2 * b.test_mask).sum(axis=1) / b.test_count

    # decisions, as the rules would write them
    code = np.full(b.nbr.shape, ACCEPTED, dtype=np.int8)
    code[worse & update] = FILTERED
    code[~update & cooperating[:, None] & ~finite_score] = NOT_FINITE
    code[b.uses_fetched[:, None] & ~present] = MISSING
    code[self_only[:, None] & present] = LEFT_OUT
    code[b.self_only_rows[:, None] & b.listed] = LEFT_OUT  # they use no fetch: nobody is missing
    code[:, 0] = ACCEPTED
    krum = chosen >= 0
    if krum.any():
        other = present[krum] & (np.arange(b.width)[None, :] != chosen[krum][:, None])
        code[krum] = np.where(other, KRUM_OTHER, code[krum])
    for rows, scale in scales.values():
        clip = present[rows] & (scale < 1.0)
        clip[:, 0] = False
        code[rows] = np.where(clip, np.where(scale > 0.0, CLIPPED, UNBOUNDED), code[rows])
    code[~b.listed] = -1
    return _Round(loss, test_loss, code, weights, losses, present, cooperating, self_only, row_reason, chosen)


def run_batched(
    configs: Sequence[NodeConfig], *, record_decisions: bool = False, keep_models: bool = False
) -> BatchedResult:
    """Run every agent to its last round, all at once; see the module docstring for semantics.

    ``record_decisions`` keeps per-neighbour decisions (rounds x agents x slots arrays, turned into
    rows only on demand); ``keep_models`` keeps every round's combined models.
    """
    reason = unsupported_reason(configs)
    if reason is not None:
        raise ValueError(f"the batched engine cannot run this: {reason}")
    started = time.perf_counter()
    b = _Batch(configs)
    n, width, rounds = b.n, b.width, configs[0].rounds
    loss = np.empty((rounds, n))
    test_loss = np.empty((rounds, n))
    counts = np.empty((3, rounds, n), dtype=np.int64)
    models = np.empty((rounds, n, 2)) if keep_models else None
    round_seconds = np.empty(rounds)
    dec = (
        Decisions(
            code=np.empty((rounds, n, width), dtype=np.int8),
            weight=np.empty((rounds, n, width)),
            ema=np.empty((rounds, n, width)),
            loss=np.empty((rounds, n, width)),
            row_reason=np.empty((rounds, n), dtype=np.int8),
            chosen=np.empty((rounds, n), dtype=np.intp),
        )
        if record_decisions
        else None
    )
    st = _State(b.init.copy(), np.zeros((n, width)), np.zeros((n, width), dtype=bool))

    # Overflow and NaN are legitimate inputs (a crafted 1e200 model): the rules handle them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i in range(1, rounds + 1):
            t0 = time.perf_counter()
            out = _step(b, st, i)
            r = i - 1
            loss[r], test_loss[r] = out.loss, out.test_loss
            if models is not None:
                models[r] = st.theta
            accepted = np.isin(out.code, _ACCEPTED_CODES) & b.neighbours
            missing = np.isin(out.code, _MISSING_CODES) & b.neighbours
            counts[0, r] = accepted.sum(axis=1)
            counts[1, r] = (b.neighbours & ~accepted & ~missing).sum(axis=1)
            counts[2, r] = missing.sum(axis=1)
            if dec is not None:
                dec.code[r] = out.code
                dec.weight[r] = out.weights
                dec.ema[r] = np.where(out.cooperating[:, None] & st.seen, st.ema, math.nan)
                dec.loss[r] = math.nan
                if out.losses is not None:
                    dec.loss[r] = np.where(b.reports_loss[:, None] & out.present, out.losses, math.nan)
                dec.row_reason[r] = out.row_reason
                dec.chosen[r] = out.chosen
            round_seconds[r] = time.perf_counter() - t0

    return BatchedResult(
        agents=tuple(b.ids),
        roles=tuple("byzantine" if z else "normal" for z in b.byzantine.tolist()),
        rules=tuple(c.rule for c in configs),
        slots=tuple(tuple(s) for s in b.slot_ids),
        loss=loss,
        test_loss=test_loss,
        accepted=counts[0],
        filtered=counts[1],
        missing=counts[2],
        final_models=st.theta,
        models=models,
        decisions=dec,
        round_seconds=round_seconds,
        seconds=time.perf_counter() - started,
        rule_params=tuple(b.params),
    )
