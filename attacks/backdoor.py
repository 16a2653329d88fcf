"""Backdoor: a model that classifies triggered inputs as a target class and clean ones normally.

The trigger (which input features, set to which value) and the target class are the task's
``task_params.trigger`` (mtl_node.tasks.trigger), not attack parameters: every agent of the run
measures the attack's success (``attack_success`` in the test metrics) against the same trigger the
attacker trains on, and the no-attack run of the same task reports the baseline rate.

The attacker trains jointly on clean and triggered samples (its own data; a share ``poison`` of
every batch triggered and relabelled), so the backdoored model still fits clean data: its clean
loss on a victim's data stays near an honest same-task model's. ``blend`` mixes it with a base
model, the attacker's honest one or (``base: victim``) each requester's own, trading the backdoor's
strength for a clean loss closer to the base's (what a loss filter compares); ``blend: auto`` takes
the largest mix whose loss on the attacker's own data stays within the base's (loss-budget's
bisection, ``attacks.capture.largest_within``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from attacks._common import PARAMS_CONFIG, Trajectory, towards, victim_model
from attacks.capture import largest_within, proxy_loss
from mtl_node.attack_api import ATTACKS, Attack, AttackContext
from mtl_node.tasks.base import Task
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

KEEP = 4


class BackdoorParams(BaseModel):
    model_config = PARAMS_CONFIG

    poison: float = Field(
        0.5, gt=0.0, le=1.0, description="share of every training batch triggered and relabelled"
    )
    blend: float | Literal["auto"] = Field(
        1.0,
        description="weight of the backdoored model against the base (1: the backdoored model "
        "alone; lower: closer to the base, weaker backdoor); auto: the largest whose loss on the "
        "attacker's data stays within slack x the base's",
    )
    base: Literal["honest", "victim"] = Field(
        "honest", description="what it is blended with: the attacker's honest model, or each requester's own"
    )
    slack: float = Field(1.0, gt=0.0, le=10.0, description="blend auto: loss budget, x the base's loss")
    iters: int = Field(20, ge=1, le=60, description="blend auto: bisection steps")

    @field_validator("blend")
    @classmethod
    def _blend_range(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0.0 <= v <= 1.0:
            raise ValueError("blend must be in [0, 1] or 'auto'")
        return v


@ATTACKS.register("backdoor")
class Backdoor(Attack):
    """x(i) = z + s * (b(i) - z), b(0) = init_model(), b(r) = task.adapt_backdoor(b(r-1), r, poison):
    the attacker's own trajectory trained on its data with the first ceil(poison * n) samples of
    every batch triggered and relabelled to the trigger's target (an optimizer of its own, like
    label-flip's), blended with the base z: its honest model h(i) (``base: honest``, the same model
    to every requester) or the requester's own psi_k (``base: victim``, two-faced; h when psi_k is
    unknown). s = ``blend``, or with ``blend: auto`` the largest s in [0, 1] with L(x) <= slack *
    L(z), L the loss on the attacker's own round data (bisection; 0 when none is found).

    Needs a classification torch task with a trigger (``make_attack(..., task=NAME)`` refuses
    others); with ``trigger: null`` or without a task it serves h.
    """

    name = "backdoor"
    Params = BackdoorParams

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        assert isinstance(params, BackdoorParams)
        self.needs_requester_model = params.base == "victim"
        self._trajectory: Trajectory | None = None
        self._warned = False

    @classmethod
    def check_task(cls, task_cls: type[Task]) -> str | None:
        if callable(getattr(task_cls, "adapt_backdoor", None)) and getattr(task_cls, "classifies", False):
            return None
        return (
            f"backdoor needs a classification torch task (one with a trigger); "
            f"task {getattr(task_cls, 'name', task_cls.__name__)} has none"
        )

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, BackdoorParams)
        task: Any = self.view.task
        if task is None or getattr(task, "trigger", None) is None:
            if not self._warned:
                log.warning("backdoor: the task has no trigger (trigger: null?); serving the honest model")
                self._warned = True
            return honest
        if self._trajectory is None:
            poison = p.poison  # bound now: the trajectory's steps must not see later locals
            self._trajectory = Trajectory(
                task.init_model, lambda m, r: task.adapt_backdoor(m, r, poison), KEEP
            )
        backdoored = self._trajectory.at(round_)
        base = (victim_model(self.view, round_, requester) if p.base == "victim" else None) or honest
        if p.blend == "auto":
            budget = p.slack * proxy_loss(task, base, round_, 1)
            if not math.isfinite(budget):
                return base
            mix = largest_within(
                lambda m: proxy_loss(task, m, round_, 1),
                lambda s: towards(base, backdoored, s),
                budget,
                p.iters,
            )
        else:
            mix = float(p.blend)
        return backdoored if mix == 1.0 else towards(base, backdoored, mix)
