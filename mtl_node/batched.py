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
from mtl_node.aggregation import NeighborDecision, RuleParams, hardened, robust
from mtl_node.attack_api import draw_generator, make_attack
from mtl_node.config import NodeConfig
from mtl_node.kernels import attacks as ka
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels import robust as kernel_robust
from mtl_node.kernels.decisions import (
    ACCEPTED,
    ACCEPTED_CODES,
    CAPPED,
    CLIPPED,
    DECISION_NAMES,
    FILTERED,
    KRUM_OTHER,
    LEFT_OUT,
    MISSING,
    MISSING_CODES,
    NOT_FINITE,
    RADIUS_CLIPPED,
    REFUSED,
    UNBOUNDED,
)
from mtl_node.kernels.ema import ema_step
from mtl_node.kernels.hardened import cap_weights, clip_pulls, own_step_ema
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
RULES = (
    "none",
    "average",
    "loss",
    "loss-filtered",
    "distance",
    *hardened.HARDENED_RULES,
    *robust.ROBUST_RULES,
)

_ACCEPTED_CODES = ACCEPTED_CODES
_MISSING_CODES = MISSING_CODES
# Why a whole row kept only its own model (per round and agent).
ROW_COOPERATED, ROW_NON_COOPERATIVE, ROW_OWN_NOT_FINITE, ROW_TOO_FEW, ROW_COMBINED_NOT_FINITE = range(5)
_ROW_REASONS = (
    "",
    reasons.NON_COOPERATIVE,
    reasons.OWN_NOT_FINITE,
    "",  # built from the row: robust.too_few_reason
    reasons.COMBINED_NOT_FINITE,
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
    return attack_unsupported(configs)


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
    radius: np.ndarray  # (rounds, agents): loss-filtered-clipped's clipping radius


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
            elif code == RADIUS_CLIPPED:
                reason = reasons.pull_clipped(float(d.radius[r, k]))
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


# Attacks the batched engine reproduces, by what they need each round.
_DRAWN = {  # name -> (distribution, first parameter, second parameter, name salt in the generator)
    "constant": ("uniform", "low", "high", False),
    "gaussian": ("normal", "mean", "std", True),
    "small-perturbation": ("normal", None, "std", True),
    "scaled": ("uniform", "low", "high", True),
}
POOL_ATTACKS = ("ipm", "alie", "mimic")  # built from the models the attacker fetched last round
REQUESTER_ATTACKS = ("echo", "distance-capture", "loss-budget")  # built from the requester's model
ATTACKS = (
    *_DRAWN,
    "nan",
    "omission",
    "sign-flip",
    *POOL_ATTACKS,
    *REQUESTER_ATTACKS,
    "low-loss",
    "stale",
    "on-off",
)
HONEST = "honest"  # what an on-off attacker serves outside its attack rounds


@dataclass(frozen=True)
class _Sender:
    """One Byzantine agent's attack: ``kind`` and ``params`` of what it serves in attack rounds,
    ``on_off`` = (honest_rounds, attack_rounds) when it only attacks in some rounds."""

    kind: str
    params: Any
    on_off: tuple[int, int] | None

    def attacking(self, round_: int) -> bool:
        return self.on_off is None or ka.on_off_attacking(round_, *self.on_off)


def _sender(cfg: NodeConfig) -> _Sender:
    key = (cfg.seed, cfg.id, cfg.attack, repr(sorted(cfg.attack_params.items())))
    got = _SENDERS.get(key)
    if got is None:
        got = _SENDERS[key] = _make_sender(cfg)
    return got


# Stacked runs repeat the same attackers: their parsed parameters are shared (they are immutable).
_SENDERS: dict[tuple[Any, ...], _Sender] = {}


def _make_sender(cfg: NodeConfig) -> _Sender:
    assert cfg.attack is not None
    attack = make_attack(cfg.attack, cfg.id, cfg.seed, cfg.attack_params)
    if cfg.attack == "on-off":
        p = attack.params
        inner = attack.inner  # type: ignore[attr-defined]
        return _Sender(inner.name, inner.params, (int(p.honest_rounds), int(p.attack_rounds)))  # type: ignore[attr-defined]
    return _Sender(cfg.attack, attack.params, None)


def attack_unsupported(configs: Sequence[NodeConfig]) -> str | None:
    """Why the batched engine cannot reproduce these configs' attacks, or None."""
    byzantine = {c.id: c for c in configs if c.attack is not None}
    kinds: dict[str, str] = {}
    for c in byzantine.values():
        if c.attack not in ATTACKS:
            return f"{c.id}: attack {c.attack!r} (only {', '.join(ATTACKS)})"
        try:
            sender = _sender(c)
        except Exception as exc:  # an invalid attack is the per-agent engine's to report
            return f"{c.id}: attack {c.attack!r}: {exc}"
        if sender.kind not in ATTACKS or sender.kind == "on-off":
            return f"{c.id}: on-off around {sender.kind!r} (only {', '.join(ATTACKS[:-1])})"
        if sender.kind == "omission" and sender.params.mode != "refuse":
            return f"{c.id}: omission mode {sender.params.mode!r} (only refuse)"
        goal = getattr(sender.params, "goal", 0.0)
        if not isinstance(goal, int | float) and len(goal) != 2:
            return f"{c.id}: goal of {len(goal)} values (the model has 2)"
        kinds[c.id] = sender.kind
    # What an attacker crafting from the requester's model serves another attacker depends on
    # which of the two asks first; only attackers that use what they fetch would see it.
    for c in byzantine.values():
        if kinds[c.id] in POOL_ATTACKS:
            for n in c.neighbors:
                if kinds.get(n) in REQUESTER_ATTACKS:
                    return f"{c.id} ({kinds[c.id]}) fetches from {n} ({kinds[n]})"
    return None


class _Attackers:
    """Every Byzantine sender's model for every (receiver, slot) pair that uses it, per round.

    Pairs are the slots of receivers that use what they fetch (cooperating normal agents) and of
    Byzantine receivers whose attack is built from what they fetched (ipm, alie, mimic). Each
    attack follows its docstring in ``attacks/``; random draws come from the same generators
    (``seeding.generator`` keyed by seed, attacker id, purpose, name salt and counters), made once
    per distinct key and round, so stacked runs with the same agent ids share them.
    """

    def __init__(self, b: _Batch, receivers: np.ndarray, slots: np.ndarray) -> None:
        configs = b.configs
        self.rows, self.slots = receivers, slots
        senders = b.nbr[receivers, slots]
        self.senders = senders
        self.pairs = len(senders)
        spec: dict[int, _Sender] = {a: _sender(configs[a]) for a in sorted(set(senders.tolist()))}
        self.spec = spec
        kind = np.array([spec[a].kind for a in senders.tolist()], dtype=object)
        self.by_kind = {k: np.flatnonzero(kind == k) for k in sorted(set(kind.tolist()))}
        on_off = sorted(a for a, sp in spec.items() if sp.on_off is not None)
        self.on_off_senders = np.array(on_off, dtype=np.intp)
        self.on_off_pairs = np.flatnonzero(np.isin(senders, self.on_off_senders))

        # Random draws: one generator per distinct (seed, attacker id, salt, counters) and round.
        self.draw_keys: dict[str, tuple[np.ndarray, list[tuple[Any, ...]], str]] = {}
        for k in _DRAWN:
            idx = self.by_kind.get(k)
            if idx is None or not len(idx):
                continue
            keys: dict[tuple[Any, ...], int] = {}
            where = np.empty(len(idx), dtype=np.intp)
            for j, (a, r) in enumerate(zip(senders[idx].tolist(), receivers[idx].tolist(), strict=True)):
                cfg, p = configs[a], spec[a].params
                requester = configs[r].id if p.redraw == "request" else None
                key = (cfg.seed, cfg.id, p.redraw, requester, *_draw_args(k, p))
                where[j] = keys.setdefault(key, len(keys))
            self.draw_keys[k] = (where, list(keys), k)
        self._never: dict[tuple[Any, ...], np.ndarray] = {}
        self._by_row: dict[str, np.ndarray] = {}

        # Requester-model attacks: the attacker can fetch the requester's model iff it lists it.
        listed = {(a, n) for a in spec for n in configs[a].neighbors}
        self.route = np.array(
            [(a, configs[r].id) in listed for a, r in zip(senders.tolist(), receivers.tolist(), strict=True)]
        )
        # Pool attacks: which rows' pools, and for mimic each row's neighbour slots by id.
        self.pool_rows = np.array(
            sorted(a for a, sp in spec.items() if sp.kind in ("ipm", "alie")), dtype=np.intp
        )
        self.mimic_rows = np.array(sorted(a for a, sp in spec.items() if sp.kind == "mimic"), dtype=np.intp)
        self.mimic_order = np.zeros((len(self.mimic_rows), b.width), dtype=np.intp)
        self.mimic_valid = np.zeros((len(self.mimic_rows), b.width), dtype=bool)
        for j, a in enumerate(self.mimic_rows.tolist()):
            ids = b.slot_ids[a]
            target = spec[a].params.target
            order = [s for s in sorted(range(1, len(ids)), key=lambda s: ids[s]) if target in (None, ids[s])]
            self.mimic_order[j, : len(order)] = order
            self.mimic_valid[j, : len(order)] = True
        # Stale: the senders' own honest models of every round so far.
        self.stale_rows = np.array(sorted(a for a, sp in spec.items() if sp.kind == "stale"), dtype=np.intp)
        self.history: list[np.ndarray] = []
        self.window = max(
            [int(sp.params.window) for sp in spec.values() if sp.kind == "loss-budget"], default=1
        )
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        self.b = b

    def _draws(self, kind: str, round_: int) -> np.ndarray:
        """(pairs of ``kind``, 2): each pair's draw this round."""
        where, keys, _ = self.draw_keys[kind]
        dist, _, _, salted = _DRAWN[kind]
        values = np.empty((len(keys), 2))
        for j, key in enumerate(keys):
            seed, agent, redraw, requester, first, second = key
            if redraw == "never" and key in self._never:
                values[j] = self._never[key]
                continue
            rng = draw_generator(seed, agent, kind, redraw, round_, requester or "", salted=salted)
            values[j] = rng.uniform(first, second, 2) if dist == "uniform" else rng.normal(first, second, 2)
            if redraw == "never":
                self._never[key] = values[j]
        return values[where]

    def crafted(
        self, round_: int, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """((pairs, 2) models served, (pairs,) withheld): what each pair's sender serves this round.

        ``psi`` is every agent's honest model of this round; ``prev`` what every row received and
        which slots were present in the previous round (None in round 1)."""
        b = self.b
        if len(self.stale_rows):
            self.history.append(psi[self.stale_rows].copy())
        self.samples.append(b.sample(round_))
        self.samples = self.samples[-self.window :]
        out = np.empty((self.pairs, 2))
        withheld = np.zeros(self.pairs, dtype=bool)
        senders, receivers = self.senders, self.rows
        h = psi[senders]
        for kind, idx in self.by_kind.items():
            a, own = senders[idx], h[idx]
            if kind in _DRAWN:
                draws = self._draws(kind, round_)
                if kind == "constant" or kind == "gaussian":
                    out[idx] = draws
                elif kind == "small-perturbation":
                    out[idx] = ka.perturbed(own, draws)
                else:
                    out[idx] = ka.scaled(own, draws)
            elif kind == "nan":
                out[idx] = math.nan
            elif kind == "omission":
                out[idx] = 0.0
                withheld[idx] = True
            elif kind == "sign-flip":
                out[idx] = ka.sign_flip(own, self._param(a, "scale")[:, None])
            elif kind in ("ipm", "alie"):
                mean, std = self._pool(psi, prev)
                pos = np.searchsorted(self.pool_rows, a)
                if kind == "ipm":
                    out[idx] = ka.ipm(mean[pos], self._param(a, "epsilon")[:, None])
                else:
                    sign, z = self._param(a, "sign")[:, None], self._param(a, "z")[:, None]
                    out[idx] = ka.alie(mean[pos], std[pos], sign, z)
            elif kind == "mimic":
                copied = self._mimic(psi, prev)
                out[idx] = copied[np.searchsorted(self.mimic_rows, a)]
            elif kind == "low-loss":
                out[idx] = self._low_loss(a, own)
            elif kind == "stale":
                lag = self._param(a, "lag").astype(np.intp)
                back = ka.stale_round(round_, lag)
                pos = np.searchsorted(self.stale_rows, a)
                hist = np.stack(self.history)  # (rounds so far, stale senders, 2)
                out[idx] = hist[back - 1, pos]
            else:  # requester-model attacks
                base = np.where(self.route[idx][:, None], psi[receivers[idx]], own)
                if kind == "echo":
                    out[idx] = base
                elif kind == "distance-capture":
                    out[idx] = ka.towards(base, self._goal(a), self._param(a, "r")[:, None])
                else:
                    out[idx] = self._loss_budget(a, base, round_)
        if len(self.on_off_pairs):
            quiet = np.array(
                [not self.spec[a].attacking(round_) for a in senders[self.on_off_pairs].tolist()], dtype=bool
            )
            idx = self.on_off_pairs[quiet]
            out[idx] = h[idx]
            withheld[idx] = False
        return out, withheld

    def _goal(self, senders: np.ndarray) -> np.ndarray:
        """(senders, 2): each sender's goal model (one value for both coordinates, or both)."""
        if "goal" not in self._by_row:
            table = np.zeros((self.b.n, 2))
            for a, sp in self.spec.items():
                if hasattr(sp.params, "goal"):
                    table[a] = np.broadcast_to(np.asarray(sp.params.goal, dtype=np.float64), (2,))
            self._by_row["goal"] = table
        return self._by_row["goal"][senders]

    def _param(self, senders: np.ndarray, name: str, neg: bool = False) -> np.ndarray:
        """A numeric attack parameter of each sender (looked up once per run, then gathered)."""
        if name not in self._by_row:
            table = np.full(self.b.n, math.nan)
            for a, sp in self.spec.items():
                if hasattr(sp.params, name):
                    table[a] = float(getattr(sp.params, name))
            self._by_row[name] = table
        values = self._by_row[name][senders]
        return -values if neg else values

    def _pool(
        self, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population std of H = [h] + [models fetched last round], per pool row."""
        rows = self.pool_rows
        own = psi[rows]
        if prev is None:
            return own, np.zeros_like(own)
        received, present = prev
        return ka.pool_moments(own, received[rows], present[rows] & self.b.neighbours[rows])

    def _mimic(self, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Per mimic row: the model fetched last round from its target (the smallest id present)."""
        rows = self.mimic_rows
        out = psi[rows].copy()
        if prev is None:
            return out
        received, present = prev
        ok = self.mimic_valid & np.take_along_axis(present[rows], self.mimic_order, axis=1)
        has = ok.any(axis=1)
        first = np.take_along_axis(self.mimic_order, ok.argmax(axis=1)[:, None], axis=1)[:, 0]
        out[has] = received[rows[has], first[has]]
        return out

    def _low_loss(self, senders: np.ndarray, own: np.ndarray) -> np.ndarray:
        """``steps`` more LMS steps of the attacker's task on its own sample of the round."""
        b = self.b
        u, d = self.samples[-1]
        q = b.x[senders] + d[senders][:, None] * u[senders]
        mu = b.mu[senders]
        steps = self._param(senders, "steps").astype(np.intp)
        w = own.copy()
        for step in range(int(steps.max(initial=0))):
            w = np.where((step < steps)[:, None], w + mu * (q - w), w)
        return w

    def _loss_budget(self, senders: np.ndarray, base: np.ndarray, round_: int) -> np.ndarray:
        """Bisection on the step towards the goal within the proxy-loss budget (attacks/capture.py)."""
        b = self.b
        goal = self._goal(senders)
        slack = self._param(senders, "slack")
        iters = self._param(senders, "iters").astype(np.intp)
        window = self._param(senders, "window").astype(np.intp)
        x = b.x[senders]

        def proxy(w: np.ndarray) -> np.ndarray:
            total = np.zeros(len(w))
            count = np.zeros(len(w))
            for back in range(len(self.samples) - 1, -1, -1):  # oldest first, as the attack sums
                r = round_ - back
                use = (r >= max(1, 0)) & (back < window) & (r >= 1)
                u, d = self.samples[len(self.samples) - 1 - back]
                res = d[senders] - ((w - x) * u[senders]).sum(axis=1)
                total = np.where(use, total + res**2, total)
                count = count + use
            return total / count

        def towards(step: np.ndarray) -> np.ndarray:
            return ka.towards(base, goal, step[:, None])

        budget = slack * proxy(base)
        ok_budget = np.isfinite(budget)

        def feasible(step: np.ndarray) -> np.ndarray:
            loss = proxy(towards(step))
            return np.isfinite(loss) & (loss <= budget)

        step = ka.budget_step(feasible, iters)
        out = np.where((step > 0)[:, None], towards(step), base)
        return np.where(ok_budget[:, None], out, base)


def _draw_args(kind: str, p: Any) -> tuple[float, float]:
    _, first, second, _ = _DRAWN[kind]
    return (0.0 if first is None else float(getattr(p, first)), float(getattr(p, second)))


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

    def __init__(self, runs: Sequence[Sequence[NodeConfig]]) -> None:
        # Several independent runs are stacked as one network without links between them: each
        # run's agents keep their ids (and so their data and attack streams), neighbours are
        # looked up within the run.
        configs = self.configs = [c for run in runs for c in run]
        n = self.n = len(configs)
        self.ids = [c.id for c in configs]
        self.run_rows: list[range] = []
        start = 0
        for run in runs:
            self.run_rows.append(range(start, start + len(run)))
            start += len(run)

        # The network: slot 0 is the agent itself, then its neighbours in aggregation order.
        self.slot_ids = [(c.id, *c.neighbors) for c in configs]
        width = self.width = max(len(s) for s in self.slot_ids)
        self.nbr = np.zeros((n, width), dtype=np.intp)  # agent index of each slot (0: no agent)
        self.listed = np.zeros((n, width), dtype=bool)  # the slot is a listed neighbour (or self)
        self.exists = np.zeros((n, width), dtype=bool)  # ... and it is an agent of this run
        for rows in self.run_rows:
            index = {self.ids[k]: k for k in rows}
            for k in rows:
                for s, agent in enumerate(self.slot_ids[k]):
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
        filtering = ("loss-filtered", *hardened.HARDENED_RULES)
        self.filtering = np.array([c.rule in filtering for c in configs])[:, None]
        self.reports_loss = np.array([c.rule in ("loss", *filtering) and not c.attack for c in configs])
        self.capped_rows = np.flatnonzero(
            [c.rule == "loss-filtered-capped" and not c.attack for c in configs]
        )
        self.clipped_rows = np.flatnonzero(
            [c.rule == "loss-filtered-clipped" and not c.attack for c in configs]
        )
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
        self.weight_cap = np.array([p.weight_cap for p in params])
        self.clip_scale = np.array([p.clip_scale for p in params])
        self.need_loss = bool((self.ema_rows & ~by_distance).any())
        self.need_distance = bool((self.ema_rows & by_distance).any())

        # The task: the same resolved parameters and streams as TargetLocalization. Agents with the
        # same seed, id and parameters (the same agent in stacked runs) share one stream.
        streams: dict[tuple[Any, ...], int] = {}
        stream_of = np.empty(n, dtype=np.intp)
        self.stream_rows: list[int] = []
        unique: list[Resolved] = []
        for k, c in enumerate(configs):
            key = (c.seed, c.id, repr(sorted(c.task_params.items())))
            if key not in streams:
                streams[key] = len(streams)
                self.stream_rows.append(k)
                p = parse_params(TargetLocalization, c.task_params)
                assert isinstance(p, TargetLocalizationParams)
                unique.append(Resolved(TaskContext(c.id, c.seed, torch.device("cpu")), p))
            stream_of[k] = streams[key]
        self.stream_of = stream_of
        self.resolved = [unique[j] for j in stream_of.tolist()]
        self.x = np.stack([r.position for r in unique])[stream_of]
        self.mu = np.array([r.mu for r in unique])[stream_of][:, None]
        self.init = np.stack([r.init for r in unique]).astype(np.float64)[stream_of]
        test_size = max(r.test_samples for r in unique)
        test_u = np.zeros((len(unique), test_size, 2))
        test_d = np.zeros((len(unique), test_size))
        test_mask = np.zeros((len(unique), test_size))
        for j, (k, r) in enumerate(zip(self.stream_rows, unique, strict=True)):
            c = configs[k]
            tu, td = sample_block(c.seed, c.id, 0, r, size=r.test_samples, purpose=seeding.TEST)
            test_u[j, : r.test_samples], test_d[j, : r.test_samples] = tu, td
            test_mask[j, : r.test_samples] = 1.0
        self.test_u, self.test_d, self.test_mask = test_u[stream_of], test_d[stream_of], test_mask[stream_of]
        self.test_count = self.test_mask.sum(axis=1)
        self.equal_tests = bool((self.test_mask == 1.0).all())
        self._block = (-1, np.empty((0,)), np.empty((0,)))

        # Byzantine senders, as the receivers that use what they fetch see them (cooperating
        # normal agents, and attackers whose attack is built from what they fetched).
        self.keeps_fetched = np.array(
            [c.attack is not None and _sender(c).kind in POOL_ATTACKS for c in configs], dtype=bool
        )
        readers = self.uses_fetched | self.keeps_fetched
        attacked = self.exists & self.neighbours & self.byzantine[self.nbr] & readers[:, None]
        self.attacked_rows, self.attacked_slots = np.nonzero(attacked)
        self.attackers = _Attackers(self, self.attacked_rows, self.attacked_slots)

    def sample(self, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """Every agent's (u, d) of ``round_``: shapes (n, 2) and (n,)."""
        b = round_ // BLOCK
        if self._block[0] != b:
            blocks = [
                sample_block(self.configs[k].seed, self.ids[k], b, self.resolved[k]) for k in self.stream_rows
            ]
            u_all = np.stack([u for u, _ in blocks])[self.stream_of]
            d_all = np.stack([d for _, d in blocks])[self.stream_of]
            self._block = (b, u_all, d_all)
        _, u, d = self._block
        return u[:, round_ % BLOCK], d[:, round_ % BLOCK]


@dataclass
class _State:
    theta: np.ndarray  # (n, 2) combined models
    ema: np.ndarray  # (n, slots) running scores
    seen: np.ndarray  # (n, slots) the EMA has had an observation
    step: np.ndarray  # (n,) loss-filtered-clipped: EMA of the squared own step (NaN: none yet)
    prev: tuple[np.ndarray, np.ndarray] | None = None  # last round's received models and presence


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
    radius: np.ndarray


def _step(b: _Batch, st: _State, i: int) -> _Round:
    """One round for every agent at once; updates ``st`` in place."""
    u, d = b.sample(i)

    # adapt: psi = w + mu (q - w), q = x + d u
    q = b.x + d[:, None] * u
    psi = st.theta + b.mu * (q - st.theta)

    # exchange: what each agent receives in each slot; a non-finite model is left out as missing
    received = psi[b.nbr]
    withheld = None
    if len(b.attacked_rows):
        values, withheld = b.attackers.crafted(i, psi, st.prev)
        received[b.attacked_rows, b.attacked_slots] = values
    present = b.exists & np.isfinite(received).all(axis=2)
    if withheld is not None and withheld.any():
        present[b.attacked_rows[withheld], b.attacked_slots[withheld]] = False
    present[:, 0] = True
    received = np.where(present[:, :, None], received, 0.0)
    if b.keeps_fetched.any():
        st.prev = (received, present)

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
    ema = ema_step(
        score,
        present,
        st.ema,
        st.seen,
        nu=b.nu,
        ema_init=b.ema_init,
        floor=b.floor,
        filtering=b.filtering,
        cooperating=cooperating,
    )
    st.ema, st.seen = ema.ema, ema.seen
    update, worse, keep, weights = ema.updated, ema.worse, ema.kept, ema.weights
    # hardened loss-filtered rules (mtl_node.kernels.hardened), on rows that cooperate
    capped_code = None
    if len(b.capped_rows):
        rows = b.capped_rows[cooperating[b.capped_rows]]
        weights[rows], hit = cap_weights(weights[rows], b.weight_cap[rows])
        capped_code = (rows, hit)
    radius = np.full(b.n, math.nan)
    clipped_combined: tuple[np.ndarray, np.ndarray] | None = None
    clipped_code = None
    if len(b.clipped_rows):
        # the own-step EMA of every clipped row, then clipping on the rows that cooperate
        rows = b.clipped_rows
        step = ((st.theta[rows] - psi[rows]) ** 2).sum(axis=1)
        st.step[rows] = own_step_ema(st.step[rows], step, b.nu[rows, 0])
        rows = rows[cooperating[rows] & ~np.isnan(st.step[rows])]
        kept = keep[rows] & (weights[rows] > 0.0)
        kept[:, 0] = False
        rows, kept = rows[kept.any(axis=1)], kept[kept.any(axis=1)]
        tau = b.clip_scale[rows] * np.sqrt(st.step[rows])
        out = clip_pulls(received[rows], kept, weights[rows], tau)
        good = out.finite
        rows = rows[good]
        weights[rows] = out.weights[good]
        radius[rows] = tau[good]
        clipped_combined = (rows, out.combined[good])
        clipped_code = (rows, out.clipped[good], out.dropped[good])

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
            pick = kernel_robust.krum_select(X, mask, b.f[rows])
            weights[rows] = 0.0
            weights[rows, pick] = 1.0
            chosen[rows] = pick
            continue
        if rule == "median":
            z = kernel_robust.coordinate_median(X, mask)
        elif rule == "trimmed-mean":
            z = kernel_robust.trimmed_mean(X, mask, b.f[rows])
        elif rule == "geometric-median":
            z = kernel_robust.geometric_median(X, mask, b.iters[rows], b.eps[rows])
        else:
            z, scale = kernel_robust.self_clip(X, mask, b.tau[rows])
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
    if clipped_combined is not None:
        st.theta[clipped_combined[0]] = clipped_combined[1]
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
    if withheld is not None and withheld.any():
        refused = np.zeros(b.nbr.shape, dtype=bool)
        refused[b.attacked_rows[withheld], b.attacked_slots[withheld]] = True
        code[refused & b.uses_fetched[:, None]] = REFUSED
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
    if capped_code is not None:
        rows, hit = capped_code
        code[rows] = np.where(hit, CAPPED, code[rows])
    if clipped_code is not None:
        rows, clip, dropped = clipped_code
        code[rows] = np.where(clip, RADIUS_CLIPPED, np.where(dropped, UNBOUNDED, code[rows]))
    code[~b.listed] = -1
    return _Round(
        loss, test_loss, code, weights, losses, present, cooperating, self_only, row_reason, chosen, radius
    )


def run_batched(
    configs: Sequence[NodeConfig], *, record_decisions: bool = False, keep_models: bool = False
) -> BatchedResult:
    """Run every agent to its last round, all at once; see the module docstring for semantics.

    ``record_decisions`` keeps per-neighbour decisions (rounds x agents x slots arrays, turned into
    rows only on demand); ``keep_models`` keeps every round's combined models.
    """
    return run_many([configs], record_decisions=record_decisions, keep_models=keep_models)[0]


def run_many(
    runs: Sequence[Sequence[NodeConfig]], *, record_decisions: bool = False, keep_models: bool = False
) -> list[BatchedResult]:
    """Several independent runs (each as :func:`run_batched` would run it) in one vectorized pass.

    Each run is its own network: agent ids need only be unique within a run, and the same id
    (with the same seed and task parameters) in several runs sees the same data, so runs that
    differ only in rule or attack are paired comparisons. All runs must have the same rounds.
    Sweeps use this to pay numpy's per-call overhead once for many small networks.
    """
    if not runs:
        return []
    for j, configs in enumerate(runs):
        reason = unsupported_reason(configs)
        if reason is not None:
            where = f"run {j}: " if len(runs) > 1 else ""
            raise ValueError(f"the batched engine cannot run this: {where}{reason}")
    if len({configs[0].rounds for configs in runs}) != 1:
        raise ValueError("the batched engine cannot run this: runs have different numbers of rounds")
    started = time.perf_counter()
    b = _Batch(runs)
    n, width, rounds = b.n, b.width, runs[0][0].rounds
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
            radius=np.empty((rounds, n)),
        )
        if record_decisions
        else None
    )
    st = _State(b.init.copy(), np.zeros((n, width)), np.zeros((n, width), dtype=bool), np.full(n, math.nan))

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
                dec.radius[r] = out.radius
            round_seconds[r] = time.perf_counter() - t0

    seconds = time.perf_counter() - started
    roles = tuple("byzantine" if z else "normal" for z in b.byzantine.tolist())
    results = []
    for rows in b.run_rows:
        sl = slice(rows.start, rows.stop)
        results.append(
            BatchedResult(
                agents=tuple(b.ids[sl]),
                roles=roles[sl],
                rules=tuple(c.rule for c in b.configs[sl]),
                slots=tuple(tuple(x) for x in b.slot_ids[sl]),
                loss=loss[:, sl],
                test_loss=test_loss[:, sl],
                accepted=counts[0][:, sl],
                filtered=counts[1][:, sl],
                missing=counts[2][:, sl],
                final_models=st.theta[sl],
                models=None if models is None else models[:, sl],
                decisions=None
                if dec is None
                else Decisions(
                    code=dec.code[:, sl],
                    weight=dec.weight[:, sl],
                    ema=dec.ema[:, sl],
                    loss=dec.loss[:, sl],
                    row_reason=dec.row_reason[:, sl],
                    chosen=dec.chosen[:, sl],
                    radius=dec.radius[:, sl],
                ),
                round_seconds=round_seconds,
                seconds=seconds,
                rule_params=tuple(b.params[sl]),
            )
        )
    return results
