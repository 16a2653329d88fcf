"""An example custom task: bring your own model and data, keep the agent, rules and orchestrator.

Use it with ``--task examples.custom_task:make_task`` (mtl-node) or ``task: examples.custom_task:make_task``
(a topology YAML; see examples/custom-task.yaml), from the repository root so ``examples`` is
importable. The interface is documented in mtl_node/tasks/plugin.py: a function
``make_task(ctx, options) -> TaskDefinition``.

The task: classify points of two interleaved half-moons, seen by each agent through its own
rotation (``options.angle``, in degrees), with a small MLP. Agents that share an angle share a task;
the loss-filtered rule should find them without being told.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mtl_node import seeding
from mtl_node.tasks import TaskContext, TaskDefinition


def moons(rng: np.random.Generator, n: int, angle_deg: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """n points of two half-moons (label 0 upper, 1 lower), rotated by ``angle_deg``."""
    y = rng.integers(0, 2, size=n)
    t = rng.uniform(0.0, np.pi, size=n)
    x = np.where(y[:, None] == 0, np.c_[np.cos(t), np.sin(t)], np.c_[1 - np.cos(t), 0.5 - np.sin(t)])
    x = x + noise * rng.standard_normal((n, 2))
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (x @ rotation.T).astype(np.float32), y.astype(np.int64)


def make_task(ctx: TaskContext, options: dict[str, Any]) -> TaskDefinition:
    """The factory mtl-node calls once per agent. ``options`` is ``task_params.options``."""
    unknown = set(options) - {"angle", "samples", "noise", "hidden"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: use angle, samples, noise, hidden")
    angle = float(options.get("angle", 0.0))
    samples = int(options.get("samples", 200))
    noise = float(options.get("noise", 0.2))
    hidden = int(options.get("hidden", 32))
    # Draw the agent's data from (seed, agent id): the same in every process and every run.
    train = moons(seeding.generator(ctx.seed, ctx.agent_id, seeding.DATA), samples, angle, noise)
    test = moons(seeding.generator(ctx.seed, ctx.agent_id, seeding.TEST), 500, angle, noise)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    return TaskDefinition(
        model=model,
        train=train,
        test=test,
        loss=torch.nn.functional.cross_entropy,  # the default; shown for where a custom loss goes
        classification=True,
    )
