"""Custom tasks loaded by import path: ``--task package.module:factory`` (or ``task:`` in a YAML).

``factory`` is one of:

1. **A function** ``factory(ctx: TaskContext, options: dict) -> TaskDefinition``: the easy way for a
   torch model. It returns the model builder, the agent's own train and test data, and optionally
   a loss; training (Adam/SGD steps per round), batching, vectorized neighbour scoring and test
   metrics come from mtl_node.tasks.torch_task, with the same knobs as the built-in tasks
   (``lr``, ``batch_size``, ``local_steps``, ``optimizer``, ``init``, ``vectorized_scoring``,
   ``eval_every``). ``ctx`` has the agent's id, the run seed and the device: draw the agent's data
   from them so runs are reproducible. ``options`` is ``task_params.options``, passed through.
2. **A subclass of** ``mtl_node.tasks.Task`` with a pydantic ``Params`` class: full control over
   the model, adaptation, scoring and metrics (see mtl_node/tasks/base.py).

The module is imported with the current directory on ``sys.path`` (as ``python -m`` would), so
``examples.custom_task:make_task`` works from the repository root. Anything wrong (module not
found, no such attribute, a factory with the wrong signature or return value) is a ``ConfigError``
on the field ``task`` that says what was found and what is expected.

See examples/custom_task.py and examples/custom-task.yaml.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from mtl_node.core.errors import ConfigError
from mtl_node.tasks.base import TASKS, Task, TaskContext
from mtl_node.tasks.torch_task import Split, TorchTask, TorchTaskParams, as_split

log = logging.getLogger(__name__)

SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_]\w*)$")
DOC = "see mtl_node/tasks/plugin.py and examples/custom_task.py"
Array = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class TaskDefinition:
    """What a factory function returns.

    ``model``: builds a freshly initialised ``nn.Module`` (called once per agent under a seeded RNG).
    ``train`` / ``test``: (inputs, targets) of this agent; the first dimension indexes samples.
    ``loss``: mean loss of a batch, ``loss(outputs, targets) -> scalar tensor``; default
    cross-entropy. Keep it free of ``.item()`` and Python branching on values so it can be vmapped.
    ``classification``: report test accuracy (argmax of the outputs equals the target).
    """

    model: Callable[[], nn.Module]
    train: tuple[Array, Array]
    test: tuple[Array, Array] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    classification: bool = True


class CustomTaskParams(TorchTaskParams):
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the factory as is")


class FactoryTask(TorchTask):
    """A TorchTask whose model and data come from a user's factory function."""

    Params = CustomTaskParams
    factory: Callable[[TaskContext, dict[str, Any]], Any]

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        assert isinstance(params, CustomTaskParams)
        self.definition = self._define(ctx, params)
        super().__init__(ctx, params)

    def _define(self, ctx: TaskContext, params: CustomTaskParams) -> TaskDefinition:
        try:
            got = type(self).factory(ctx, dict(params.options))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError("task", f"{self.name} failed: {type(exc).__name__}: {exc}", DOC) from exc
        if not isinstance(got, TaskDefinition):
            raise ConfigError(
                "task",
                f"{self.name} returned {type(got).__name__}, expected mtl_node.tasks.TaskDefinition",
                DOC,
            )
        if not callable(got.model):
            raise ConfigError("task", f"{self.name}: TaskDefinition.model must be callable", DOC)
        return got

    def build_module(self) -> nn.Module:
        module = self.definition.model()
        if not isinstance(module, nn.Module):
            raise ConfigError(
                "task",
                f"{self.name}: model() returned {type(module).__name__}, expected a torch nn.Module",
                DOC,
            )
        return module

    def load_data(self) -> tuple[Split, Split]:
        d = self.definition
        train = self._split(d.train, "train")
        test = self._split(d.test, "test") if d.test is not None else Split(train.x[:0], train.y[:0])
        return train, test

    def _split(self, pair: Any, which: str) -> Split:
        ok = isinstance(pair, tuple | list) and len(pair) == 2
        if ok:
            try:
                split = as_split(pair[0], pair[1], self.ctx.device)
            except (TypeError, ValueError, RuntimeError):
                ok = False
            else:
                if split.x.dim() == 0 or split.y.dim() == 0 or len(split.x) != len(split.y):
                    ok = False
        if not ok:
            raise ConfigError(
                "task",
                f"{self.name}: TaskDefinition.{which} must be (inputs, targets), one row per sample",
                DOC,
            )
        return split

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.definition.loss is not None:
            return self.definition.loss(outputs, targets)
        return super().loss_fn(outputs, targets)

    def accuracy(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        return super().accuracy(outputs, targets) if self.definition.classification else None

    @property
    def classifies(self) -> bool:  # type: ignore[override]
        return self.definition.classification


def load_task(spec: str, field: str = "task") -> type[Task]:
    """The Task class behind ``module:factory`` (cached); raises ConfigError naming ``field``."""
    try:
        return _load(spec)
    except ConfigError as exc:
        if exc.field == "task" and field != "task":
            raise ConfigError(field, exc.problem, exc.fix) from None
        raise


TASKS.custom_loader = load_task


@lru_cache(maxsize=64)
def _load(spec: str) -> type[Task]:
    m = SPEC.match(spec)
    if m is None:
        raise ConfigError("task", f"{spec!r} is not module:factory", "e.g. examples.custom_task:make_task")
    module_name, attr = m.group("module"), m.group("attr")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ConfigError(
            "task",
            f"cannot import {module_name!r}: no module named {missing!r}",
            f"run from the directory that holds it or put it on PYTHONPATH (searched from {cwd})",
        ) from None
    except Exception as exc:
        raise ConfigError("task", f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(
            "task",
            f"module {module_name!r} has no attribute {attr!r}",
            f"callables there: {', '.join(public) or 'none'}",
        )
    if inspect.isclass(obj):
        if issubclass(obj, Task) and not inspect.isabstract(obj):
            if not (isinstance(getattr(obj, "Params", None), type) and issubclass(obj.Params, BaseModel)):
                raise ConfigError("task", f"{spec}: a Task subclass needs a pydantic Params class", DOC)
            return _named(obj, spec)
        what = "an abstract Task subclass" if issubclass(obj, Task) else f"class {obj.__name__}"
        raise ConfigError(
            "task", f"{spec} is {what}", f"expected a factory function or a Task subclass; {DOC}"
        )
    if not callable(obj):
        raise ConfigError("task", f"{spec} is not callable (it is {type(obj).__name__})", DOC)
    try:
        inspect.signature(obj).bind(None, {})
    except TypeError:
        raise ConfigError(
            "task", f"{spec} must accept (ctx, options): {attr}{inspect.signature(obj)} does not", DOC
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): find out when it is called
    log.debug("custom task %s loaded from %s", spec, getattr(module, "__file__", module_name))
    return type(f"Custom[{spec}]", (FactoryTask,), {"name": spec, "factory": staticmethod(obj)})


def _named(cls: type[Task], spec: str) -> type[Task]:
    """The class itself when it carries a name, else a subclass named after ``spec``."""
    if isinstance(getattr(cls, "name", None), str):
        return cls
    return type(cls.__name__, (cls,), {"name": spec})
