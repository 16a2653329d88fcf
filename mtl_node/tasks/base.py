"""The task interface every agent runs, and the task registry.

A task instance belongs to one agent: it owns that agent's data (a deterministic stream keyed by
the run seed and the agent id) and knows how to adapt a model on it and score any model on it.
Scoring a *neighbour's* model uses this agent's data: that is the heart of the loss-based rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ValidationError

from mtl_node.core import names
from mtl_node.core.errors import ConfigError
from mtl_node.core.registry import Registry
from mtl_node.wire import StateDict


@dataclass(frozen=True)
class Metrics:
    """Per-round metrics of the agent's combined model. None where the task has no such metric."""

    loss: float
    test_loss: float | None = None
    test_accuracy: float | None = None
    # Share of triggered test samples (true class not the backdoor target) classified as the
    # target: the backdoor attack's success (classification torch tasks; mtl_node.tasks.trigger).
    attack_success: float | None = None


@dataclass(frozen=True)
class TaskContext:
    agent_id: str
    seed: int
    device: torch.device


class Task(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        self.ctx = ctx
        self.params = params

    @abstractmethod
    def init_model(self) -> StateDict:
        """The agent's model before round 1."""

    @abstractmethod
    def adapt(self, model: StateDict, round_: int) -> StateDict:
        """psi = local update of ``model`` on the agent's data of ``round_`` (must not mutate it)."""

    def detached(self) -> AbstractContextManager[None]:
        """A context in which ``adapt`` leaves no trace on the agent's own training state (optimizer
        moments and the like), for attacks that train extra copies of the model (low-loss). Tasks
        whose ``adapt`` keeps no state need not override it."""
        return nullcontext()

    @abstractmethod
    def losses(self, models: Sequence[StateDict], round_: int) -> list[float]:
        """Loss of each model on the agent's own data of ``round_``, as used for scoring."""

    @abstractmethod
    def evaluate(self, model: StateDict, round_: int) -> Metrics:
        """Metrics of the agent's combined model after ``round_``."""

    # -- crash-only state hooks (mtl_node/state.py) ----------------------------------------------
    # Data streams need nothing here: they are keyed by (seed, agent, round), so the round counter
    # is their position. A task with state that outlives a round (optimizer moments) returns it.

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able part, tensors) a resumed agent needs to continue exactly."""
        return {}, {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state()`` returned."""
        return None  # stateless by default


class TaskRegistry(Registry[type[Task]]):
    """The built-in tasks by name, plus custom tasks by import path (``package.module:factory``).

    Resolving ``module:factory`` here, rather than in each caller, means every place that checks a
    task name (agent config, CLI, daemon) accepts a custom task and reports a broken one the same way.

    The loader is plugged in by ``mtl_node.tasks.plugin`` when it is imported (``mtl_node.tasks``
    imports it), so this module does not import the torch-task machinery that builds on it.
    """

    custom_loader: Callable[[str, str], type[Task]] | None = None

    def get(self, name: str, field: str | None = None) -> type[Task]:
        if ":" in name:
            if self.custom_loader is None:
                raise ConfigError(field or "task", f"custom task {name!r} needs mtl_node.tasks imported")
            return self.custom_loader(name, field or "task")
        return super().get(name, field)


TASKS = TaskRegistry("task", names.TASKS)


def parse_params(task_cls: type[Task], params: Mapping[str, Any]) -> BaseModel:
    """Validate task parameters, turning pydantic's report into one clear ConfigError."""
    try:
        return task_cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        allowed = ", ".join(sorted(task_cls.Params.model_fields))
        raise ConfigError(
            f"task_params.{where}" if where else "task_params",
            f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})",
            f"parameters of task {task_cls.name}: {allowed}",
        ) from None


def make_task(name: str, agent_id: str, seed: int, params: Mapping[str, Any], device: str = "cpu") -> Task:
    cls = TASKS.get(name, field="task")
    return cls(TaskContext(agent_id, seed, torch.device(device)), parse_params(cls, params))
