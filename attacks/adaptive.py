"""The adaptive attack: white-box worst case against the victim's own acceptance test.

For each victim k the attacker serves psi_k + lambda * d, as far along a direction d as the rule k
runs lets through (the attacker knows the run's rule and its parameters: ``ctx.rule``):

- loss tests (loss-filtered and its hardened variants, ubar's second stage, loss): the largest
  lambda in [0, max_step] with L_k(psi_k + lambda d) <= slack * L_k(psi_k), by bisection
  (loss-budget's machinery: ``attacks.capture.largest_within`` over ``budget_step``). L_k is the
  loss on the attacker's own data (its same-task proxy of k's data), or with ``omniscient: true``
  on k's very own scoring data, which only the in-process engine can read (a daemon refuses the
  parameter; results label the attack "adaptive (omniscient)");
- clipping and acceptance radii (self-clipping: clip_tau; balance: gamma exp(-kappa i/T)
  ||psi_k||; clipped-gossip: the CS+ radius estimated from the models the attacker knows): lambda
  puts the model exactly at the radius (just inside, by ``margin``);
- any other rule (average, median, krum, ...): lambda = max_step.

The maths (directions, the radius step) is in ``mtl_node.kernels.attacks``; ``docs/robustness.md``
says what it shows.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, flat, from_flat, goal_like, honest_pool, victim_model
from attacks.capture import GOAL_HELP, Goal, largest_within, proxy_loss
from mtl_node.aggregation import RuleParams
from mtl_node.attack_api import ATTACKS, Attack
from mtl_node.kernels.attacks import (
    ADAPTIVE_LOSS_RULES,
    ADAPTIVE_RADIUS_RULES,
    adaptive_direction,
    adaptive_test,
    along,
    pool_moments,
    radius_step,
)
from mtl_node.kernels.decentralized import adaptive_radius, balance_radius
from mtl_node.kernels.robust import norms
from mtl_node.tasks.base import Task
from mtl_node.wire import StateDict

# The rules whose acceptance is a loss comparison on the victim's data, and those with a radius
# (``mtl_node.kernels.attacks.adaptive_test``: the batched engine decides the same way).
LOSS_RULES = ADAPTIVE_LOSS_RULES
RADIUS_RULES = ADAPTIVE_RADIUS_RULES


class AdaptiveParams(BaseModel):
    model_config = PARAMS_CONFIG

    direction: Literal["negative", "goal", "away"] = Field(
        "negative",
        description="d: -psi_k (negative), goal - psi_k (goal), or psi_k - the honest mean (away)",
    )
    goal: Goal = Field(15.5, description=f"direction goal only: {GOAL_HELP}")
    test: Literal["auto", "loss", "none"] = Field(
        "auto",
        description="the acceptance test to stay within: auto (the run's rule), loss (always the "
        "loss test), none (always max_step)",
    )
    max_step: float = Field(
        2.0, gt=0.0, le=1e6, description="largest lambda tried (and served without a test)"
    )
    slack: float = Field(
        1.0, gt=0.0, le=10.0, description="loss test: L(x) <= slack * L(psi_k) (<1: just under)"
    )
    iters: int = Field(20, ge=1, le=60, description="loss test: bisection steps on lambda")
    window: int = Field(1, ge=1, le=100, description="loss test: rounds of data in the loss")
    margin: float = Field(
        1e-6, ge=0.0, lt=1.0, description="radius tests: serve at (1 - margin) times the radius"
    )
    omniscient: bool = Field(
        False,
        description="loss test on the victim's own data (in-process engine only; labelled "
        "'adaptive (omniscient)' in results)",
    )


@ATTACKS.register("adaptive")
class Adaptive(Attack):
    """x = psi_k + lambda * d per victim k, d = -psi_k | g - psi_k | psi_k - mu (``direction``; mu
    the mean of H_i = [h] + the neighbour models fetched in round i-1) and lambda the largest the
    victim's rule accepts: max lambda in [0, max_step] with L(x) <= slack * L(psi_k) under loss
    rules (bisection; L on the attacker's data, or the victim's with ``omniscient``), lambda =
    (1 - margin) * radius / ||d|| under self-clipping, balance and clipped-gossip, max_step
    otherwise. psi_k is the victim's model (fetched on demand, else its round i-1 model); serves h
    when it is unknown. Two-faced: each victim gets its own."""

    name = "adaptive"
    Params = AdaptiveParams
    needs_requester_model = True

    @classmethod
    def check_network(cls, params: BaseModel) -> tuple[str, str] | None:
        if isinstance(params, AdaptiveParams) and params.omniscient:
            return (
                "omniscient",
                "reads the victim's own data, which only the in-process engine can do; a daemon "
                "serving over the network cannot",
            )
        return None

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, AdaptiveParams)
        victim = victim_model(self.view, round_, requester)
        if victim is None:
            return honest
        v = flat(victim)
        goal = flat(goal_like(victim, p.goal)) if p.direction == "goal" else None
        mean = None
        if p.direction == "away":
            # mu over H = [h] + last round's fetch: pool_moments, as ipm/alie and the batched engine
            pool = [flat(m) for m in honest_pool(self.view, round_, honest)]
            others = np.stack(pool[1:])[None] if len(pool) > 1 else np.zeros((1, 0, len(v)))
            mean = pool_moments(pool[0][None], others, np.ones(others.shape[:2], dtype=bool))[0][0]
        d = adaptive_direction(
            v[None],
            p.direction,
            goal=None if goal is None else goal[None],
            mean=None if mean is None else mean[None],
        )[0]
        step = self._step(round_, requester, victim, v, d, honest)
        return from_flat(victim, along(v, d, step)) if step > 0 else victim

    def _test(self) -> str:
        p = self.params
        assert isinstance(p, AdaptiveParams)
        return adaptive_test(p.test, self.ctx.rule)

    def _step(
        self, round_: int, requester: str, victim: StateDict, v: np.ndarray, d: np.ndarray, honest: StateDict
    ) -> float:
        p = self.params
        assert isinstance(p, AdaptiveParams)
        test = self._test()
        if test == "none":
            return p.max_step
        if test == "radius":
            radius = self._radius(round_, requester, v, honest)
            return float(radius_step(d[None], np.array([radius]), np.array([p.margin]))[0])
        task = self._loss_task(requester)
        if task is None:
            return 0.0
        budget = p.slack * proxy_loss(task, victim, round_, p.window)
        if not math.isfinite(budget):
            return 0.0
        s = largest_within(
            lambda m: proxy_loss(task, m, round_, p.window),
            lambda s: from_flat(victim, along(v, d, s * p.max_step)),
            budget,
            p.iters,
        )
        return s * p.max_step

    def _loss_task(self, requester: str) -> Task | None:
        p = self.params
        assert isinstance(p, AdaptiveParams)
        if not p.omniscient:
            return self.view.task
        task = self.view.victim_task(requester)
        if task is None:
            raise RuntimeError(
                f"adaptive: omniscient, but {requester}'s data is not readable here (in-process engine only)"
            )
        return task

    def _radius(self, round_: int, requester: str, v: np.ndarray, honest: StateDict) -> float:
        rp = RuleParams.model_validate(dict(self.ctx.rule_params))
        rule = self.ctx.rule
        if rule == "self-clipping":
            return rp.clip_tau
        if rule == "balance":
            # ||psi_k|| as the victim's own balance computes it (kernels.robust.norms)
            return float(
                balance_radius(
                    norms(v[None]),
                    np.array([rp.balance_gamma]),
                    np.array([rp.balance_kappa]),
                    np.array([float(round_)]),
                    np.array([float(rp.balance_rounds)]),
                )[0]
            )
        # clipped-gossip: the CS+ radius over the victim's model, the attacker's honest one and the
        # neighbour models of round i-1 other than the victim's (the attacker's view of k's world).
        known = self.view.neighbors(round_ - 1)
        X = np.stack([v, flat(honest), *(flat(known[a]) for a in sorted(known) if a != requester)])[None]
        present = np.ones(X.shape[:2], dtype=bool)
        return float(adaptive_radius(X, present, np.array([rp.f]))[0])
