"""Attacks on similarity-based weights: they look like the victim to win its weight, then steer.

w_k below is the victim's (the requester's) model: its round-i model psi_k(i), fetched by the attack
node on demand (a normal agent publishes round i before it fetches, so this is immediate); when that
is not possible (the requester is not a neighbour of the attack node, or is an attack node fetching
from us at the same time) it is psi_k(i-1) from the node's last complete fetch, and failing that the
attacker's own honest model h. All of these are two-faced: each requester gets its own model.

The goal model g has every coordinate equal to ``goal`` (default 15.5, the centre of the paper's
[15, 16] regression attack).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, goal_like, towards, victim_model
from mtl_node.attack_api import ATTACKS, Attack, AttackContext
from mtl_node.kernels.attacks import budget_step
from mtl_node.tasks.base import Task
from mtl_node.wire import StateDict

KEEP_ROUNDS = 4  # crafted models kept for requests of recent rounds

GOAL_HELP = (
    "the model victims are driven towards: one value for every coordinate (15.5: the centre of the "
    "paper's [15,16] regression attack), or a list, one value per coordinate in sorted tensor-name order"
)
Goal = float | list[float]


class EchoParams(BaseModel):
    model_config = PARAMS_CONFIG


@ATTACKS.register("echo")
class Echo(Attack):
    """x = w_k: the victim's own model of the round.

    Against loss-filtered its loss equals the victim's own, so it is accepted with the victim's own
    weight: the victim keeps less of its honest neighbours' information while thinking it
    cooperates. Falls back to h when w_k is unknown (see the module docstring).
    """

    name = "echo"
    Params = EchoParams
    needs_requester_model = True

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        return victim_model(self.view, round_, requester) or honest


class DistanceCaptureParams(BaseModel):
    model_config = PARAMS_CONFIG

    r: float = Field(0.1, gt=0.0, le=1.0, description="step from the victim's model towards the goal")
    goal: Goal = Field(15.5, description=GOAL_HELP)


@ATTACKS.register("distance-capture")
class DistanceCapture(Attack):
    """x = w_k + r (g - w_k), per requester k (two-faced); Li et al. 2020 against distance weights.

    ||theta_k - x|| is small (r ||g - w_k||), so a distance-based rule (eq. 4) gives it a large
    weight, and each round pulls the victim a step r towards g. Without w_k: h + r (g - h).
    """

    name = "distance-capture"
    Params = DistanceCaptureParams
    needs_requester_model = True

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, DistanceCaptureParams)
        base = victim_model(self.view, round_, requester) or honest
        return towards(base, goal_like(base, p.goal), p.r)


def proxy_loss(task: Task, model: StateDict, round_: int, window: int) -> float:
    """Mean loss of ``model`` on ``task``'s data of rounds max(1, i-window+1) .. i (the attacker's
    own task: the same-task proxy of a victim's data; an omniscient attack passes the victim's)."""
    rounds = range(max(1, round_ - window + 1), round_ + 1)
    values = [task.losses([model], r)[0] for r in rounds]
    return sum(values) / len(values)


def largest_within(
    loss: Callable[[StateDict], float], candidate: Callable[[float], StateDict], budget: float, iters: int
) -> float:
    """The largest s in [0, 1] with loss(candidate(s)) <= budget (finite), by
    ``mtl_node.kernels.attacks.budget_step``: 1 if feasible, else the bisection's feasible end after
    ``iters`` halvings (0: none found). Assumes the feasible steps form an interval [0, s*]."""

    def feasible(steps: np.ndarray) -> np.ndarray:
        value = loss(candidate(float(steps[0])))
        return np.array([math.isfinite(value) and value <= budget])

    return float(budget_step(feasible, np.array([iters]))[0])


class LossBudgetParams(BaseModel):
    model_config = PARAMS_CONFIG

    goal: Goal = Field(15.5, description=GOAL_HELP)
    slack: float = Field(
        1.0, gt=0.0, le=10.0, description="budget = slack * loss of the victim's model (<1: just under)"
    )
    iters: int = Field(20, ge=1, le=60, description="bisection steps on the step size")
    window: int = Field(1, ge=1, le=100, description="rounds of the attacker's own data in the proxy loss")


@ATTACKS.register("loss-budget")
class LossBudget(Attack):
    """x = w_k + s* (g - w_k), s* = max s in [0, 1] with L(w_k + s (g - w_k)) <= slack * L(w_k).

    L is the loss on the attacker's own data of rounds i-window+1 .. i (its task: the same-task
    proxy of the victim's data, exact only when the attacker shares the victim's task and data).
    The victim's own loss is unknown to the attacker, so the budget is the loss of the victim's
    model on the proxy data. s* is found by bisection (``iters`` steps, keeping the feasible end)
    assuming the feasible steps form an interval [0, s*] (true for convex losses): s = 1 if it is
    feasible, else lo = 0, hi = 1, mid kept as lo when feasible. When even s = 0 breaks the budget
    (slack < 1), or without a task, x = w_k.
    """

    name = "loss-budget"
    Params = LossBudgetParams
    needs_requester_model = True

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, LossBudgetParams)
        base = victim_model(self.view, round_, requester) or honest
        task = self.view.task
        if task is None:
            return base
        goal = goal_like(base, p.goal)
        budget = p.slack * proxy_loss(task, base, round_, p.window)
        if not math.isfinite(budget):
            return base
        step = largest_within(
            lambda m: proxy_loss(task, m, round_, p.window),
            lambda s: towards(base, goal, s),
            budget,
            p.iters,
        )
        return towards(base, goal, step) if step > 0 else base


class LowLossParams(BaseModel):
    model_config = PARAMS_CONFIG

    steps: int = Field(10, ge=1, le=1000, description="extra local steps on the attacker's data of the round")


@ATTACKS.register("low-loss")
class LowLoss(Attack):
    """x = adapt^steps(h, i): ``steps`` more local steps of the attacker's task on its round-i data.

    The loss on the attacker's own round-i data becomes tiny (target localization: the LMS fixed
    point q = x + d u, loss d^2 (1 - |u|^2)^2), so under the ``loss`` rule (eq. 9, 1/loss weights)
    an agent scoring on the same data would give it almost all the weight. Against loss-filtered
    it gains weight only at victims whose data it fits better than their own model does (same task
    and similar data); elsewhere its loss exceeds the victim's and it is filtered. Under
    ``average`` it injects an over-fitted, noisier model. Without a task: h.
    """

    name = "low-loss"
    Params = LowLossParams

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        self._crafted: dict[int, StateDict] = {}

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, LowLossParams)
        task = self.view.task
        if task is None:
            return honest
        # The same model for every requester of the round, made once: its extra steps run on a
        # copy of the optimizer state (task.detached), so neither the number nor the order of the
        # requests changes the attacker's own honest trajectory.
        if round_ not in self._crafted:
            model = honest
            with task.detached():
                for _ in range(p.steps):
                    model = task.adapt(model, round_)
            self._crafted = {r: m for r, m in self._crafted.items() if r > round_ - KEEP_ROUNDS}
            self._crafted[round_] = model
        return self._crafted[round_]
