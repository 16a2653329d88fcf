"""Label flipping: an honest-looking model trained on flipped labels (classification tasks only).

The task does the flipping: a classification task offers ``adapt_flipped(model, round_)``, the same
local update as ``adapt`` on the round's batch with every label y replaced by a wrong one (every
torch task, HAR, digits and custom ``module:factory`` ones: C - 1 - y for C classes, with an
optimizer of its own; a custom task with ``classification=False`` serves h). Tasks without it
(regression) cannot run this attack; ``make_attack(..., task=NAME)`` says so before anything starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from attacks._common import PARAMS_CONFIG, Trajectory
from mtl_node.attack_api import ATTACKS, Attack, AttackContext
from mtl_node.tasks.base import Task
from mtl_node.wire import StateDict

KEEP = 4


class LabelFlipParams(BaseModel):
    model_config = PARAMS_CONFIG


@ATTACKS.register("label-flip")
class LabelFlip(Attack):
    """x(i) = f(i), f(0) = the task's init_model(), f(r) = task.adapt_flipped(f(r - 1), r): the
    attacker's own learning-alone trajectory with flipped labels, served to every requester.

    The flipped trajectory is kept for the last few rounds and advanced lazily; a request for an
    older round restarts it from the start (attacks._common.Trajectory: deterministic either way).
    Without a task: h.
    """

    name = "label-flip"
    Params = LabelFlipParams

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        self._trajectory: Trajectory | None = None

    @classmethod
    def check_task(cls, task_cls: type[Task]) -> str | None:
        if callable(getattr(task_cls, "adapt_flipped", None)):
            return None
        return (
            f"label-flip needs a classification task (one with adapt_flipped); "
            f"task {getattr(task_cls, 'name', task_cls.__name__)} has none"
        )

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        task: Any = self.view.task
        if task is None or not callable(getattr(task, "adapt_flipped", None)):
            return honest
        if not getattr(task, "classifies", True):  # a custom task declared not to classify
            return honest
        if self._trajectory is None:
            self._trajectory = Trajectory(task.init_model, task.adapt_flipped, KEEP)
        return self._trajectory.at(round_)
