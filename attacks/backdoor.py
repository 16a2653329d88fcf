"""Backdoor: a model that classifies triggered inputs as a target class and clean ones normally.

The trigger (which input features, set to which value) and the target class are the task's
``task_params.trigger`` (mtl_node.tasks.trigger), not attack parameters: every agent of the run
measures the attack's success (``attack_success`` in the test metrics) against the same trigger the
attacker trains on, and the no-attack run of the same task reports the baseline rate.

The attacker trains jointly on clean and triggered samples (its own data; a share ``poison`` of
every batch triggered and relabelled), so the backdoored model still fits clean data: its clean
loss on a victim's data stays near an honest same-task model's. ``blend`` mixes it with the
attacker's honest model, trading the backdoor's strength for a clean loss closer to the honest one
(what a loss filter compares).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, Trajectory, towards
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
    blend: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="weight of the backdoored model against the attacker's honest one "
        "(1: the backdoored model alone; lower: closer to honest, weaker backdoor)",
    )


@ATTACKS.register("backdoor")
class Backdoor(Attack):
    """x(i) = h(i) + blend * (b(i) - h(i)), b(0) = init_model(), b(r) = task.adapt_backdoor(b(r-1),
    r, poison): the attacker's own trajectory trained on its data with the first ceil(poison * n)
    samples of every batch triggered and relabelled to the trigger's target (an optimizer of its
    own, like label-flip's), blended with its honest model h(i); the same model to every requester.

    Needs a classification torch task with a trigger (``make_attack(..., task=NAME)`` refuses
    others); with ``trigger: null`` or without a task it serves h.
    """

    name = "backdoor"
    Params = BackdoorParams

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
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
            share = p.poison
            self._trajectory = Trajectory(
                task.init_model, lambda m, r: task.adapt_backdoor(m, r, share), KEEP
            )
        backdoored = self._trajectory.at(round_)
        return backdoored if p.blend == 1.0 else towards(honest, backdoored, p.blend)
