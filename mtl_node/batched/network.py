"""The network of a vectorized run in slot form, and what it can run.

Row k is agent k; slot 0 of a row is the agent itself, slots 1.. its neighbours in aggregation order,
padded to the largest neighbourhood. Per-row rules and parameters, and the task's data streams
(``mtl_node.tasks.target_localization``, the same seeds as the agents) are set up once here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtl_node import seeding
from mtl_node.aggregation import RuleParams, decentralized, hardened, robust
from mtl_node.batched.attack_kinds import attack_unsupported, reads_pool
from mtl_node.batched.senders import Attackers
from mtl_node.config import NodeConfig
from mtl_node.tasks import TaskContext
from mtl_node.tasks.base import parse_params
from mtl_node.tasks.target_localization import (
    BLOCK,
    Resolved,
    TargetLocalization,
    TargetLocalizationParams,
    sample_block,
)

TASK = "target-localization"
RULES = (
    "none",
    "average",
    "loss",
    "loss-filtered",
    "distance",
    *hardened.HARDENED_RULES,
    *robust.ROBUST_RULES,
    *decentralized.DECENTRALIZED_RULES,
)

# Row kinds: how an agent aggregates (Byzantine agents learn alone, like Agent does).
_NONE, _AVERAGE, _EMA, _ROBUST = 0, 1, 2, 3


def run_shape_reason(configs: Sequence[NodeConfig]) -> str | None:
    """What neither vectorized engine (this one, nor the torch one) can run: no agents, agent ids
    used twice, or agents running different numbers of rounds (rows advance in lockstep)."""
    if not configs:
        return "no agents"
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        return "agent ids are not unique"
    rounds = {c.rounds for c in configs}
    if len(rounds) != 1:
        return f"agents run different numbers of rounds ({sorted(rounds)})"
    return None


def unsupported_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Why the batched engine cannot run these configs, or None when it can."""
    shape = run_shape_reason(configs)
    if shape is not None:
        return shape
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


def _kind(c: NodeConfig) -> int:
    if c.attack or c.rule == "none":
        return _NONE
    if c.rule == "average":
        return _AVERAGE
    if c.rule in robust.ROBUST_RULES or c.rule in decentralized.DECENTRALIZED_RULES:
        return _ROBUST  # a statistic of the present members' models
    return _EMA


class Batch:
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
        # The decentralized defenses (mtl_node/batched/decentralized.py), likewise.
        self.decentral_index = {
            rule: np.flatnonzero(self.robust_rows & np.array([c.rule == rule for c in configs]))
            for rule in decentralized.DECENTRALIZED_RULES
        }
        self.decentral_index = {rule: rows for rule, rows in self.decentral_index.items() if len(rows)}
        ubar_rows = self.robust_rows & np.array([c.rule == "ubar" for c in configs])
        by_distance = np.array([c.rule == "distance" for c in configs])
        self.by_distance = by_distance[:, None]
        filtering = ("loss-filtered", *hardened.HARDENED_RULES)
        self.filtering = np.array([c.rule in filtering for c in configs])[:, None]
        self.reports_loss = np.array(
            [c.rule in ("loss", "ubar", *filtering) and not c.attack for c in configs]
        )
        self.capped_rows = np.flatnonzero(
            [c.rule == "loss-filtered-capped" and not c.attack for c in configs]
        )
        self.clipped_rows = np.flatnonzero(
            [c.rule == "loss-filtered-clipped" and not c.attack for c in configs]
        )
        self.median_rows = np.flatnonzero(
            [c.rule == "loss-filtered-median" and not c.attack for c in configs]
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
        self.alpha = np.array([p.alpha for p in params])
        self.ubar_rho = np.array([p.ubar_rho for p in params])
        self.gamma = np.array([p.balance_gamma for p in params])
        self.kappa = np.array([p.balance_kappa for p in params])
        self.horizon = np.array([float(p.balance_rounds) for p in params])
        self.need_loss = bool((self.ema_rows & ~by_distance).any() or ubar_rows.any())
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
        self.keeps_fetched = np.array([reads_pool(c) for c in configs], dtype=bool)
        readers = self.uses_fetched | self.keeps_fetched
        attacked = self.exists & self.neighbours & self.byzantine[self.nbr] & readers[:, None]
        self.attacked_rows, self.attacked_slots = np.nonzero(attacked)
        self.attackers = Attackers(self, self.attacked_rows, self.attacked_slots)

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
