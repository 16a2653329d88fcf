"""Case study 3 of the paper: digit classification by a CNN, two groups of agents with different data.

Every agent trains the paper's CNN (three 3x3 convolutions with 32/64/64 channels, each with ReLU
and 2x2 max-pooling, then 576 -> 128 -> 10) with cross-entropy and Adam, on 28x28 grey images in
[0, 1]:

- ``dataset: mnist`` (group 1): MNIST from its IDX files when ``mnist_dir`` is given; otherwise the
  offline stand-in, scikit-learn's bundled 8x8 handwritten digits made MNIST-shaped
  (mtl_node.data.sklearn_digits). The official train/test halves (for the stand-in: a split drawn
  from the run seed, 30% held out) are pools: each agent draws its ``train_samples`` from the
  training pool and its own test split of ``test_samples`` from the held-out pool, so no agent is
  ever tested on an image any agent trained on.
- ``dataset: synthetic`` (group 2): printed digits rendered from fonts on random textured
  backgrounds (mtl_node.data.synthetic_digits), generated per agent from (seed, agent id).

The agents are not told which neighbours share their data source: that is for the rule to find out.
Neighbour scoring uses the agent's current training batch (see mtl_node.tasks.torch_task).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from mtl_node import seeding
from mtl_node.core.errors import ConfigError
from mtl_node.data.idx import load_mnist
from mtl_node.data.sklearn_digits import bundled_digits
from mtl_node.data.synthetic_digits import render_digits
from mtl_node.tasks.base import TASKS, TaskContext
from mtl_node.tasks.torch_task import Split, TorchTask, TorchTaskParams, as_split

log = logging.getLogger(__name__)

SIZE = 28
CLASSES = 10
BUNDLED_TEST_SHARE = 0.3


class PaperCNN(nn.Module):
    """The CNN of the paper's digit case study, as in the reference code (DigitClassification).

    Three blocks of 3x3 convolution (padding 1) + ReLU + 2x2 max-pooling with 32, 64, 64 channels
    (28 -> 14 -> 7 -> 3), then 64*3*3 = 576 -> 128 (ReLU) -> 10.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(576, 128)
        self.fc2 = nn.Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(-3)  # (n, 28, 28) -> (n, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = torch.flatten(x, -3)
        return self.fc2(F.relu(self.fc1(x)))


class DigitsParams(TorchTaskParams):
    dataset: Literal["mnist", "synthetic"] = Field(
        "mnist", description="mnist (group 1; offline: scikit-learn's digits) or synthetic (group 2)"
    )
    mnist_dir: str | None = Field(
        None, description="directory of MNIST's IDX files; default: offline stand-in"
    )
    train_samples: int = Field(600, ge=1, le=60_000, description="training images of this agent")
    test_samples: int = Field(300, ge=1, le=10_000, description="held-out test images of this agent")


@TASKS.register("digits")
class DigitClassification(TorchTask):
    name = "digits"
    Params = DigitsParams

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        assert isinstance(params, DigitsParams)
        self.dp = params
        super().__init__(ctx, params)

    def build_module(self) -> nn.Module:
        return PaperCNN()

    def load_data(self) -> tuple[Split, Split]:
        p = self.dp
        if p.dataset == "synthetic":
            x, y, tx, ty = synthetic(self.ctx.seed, self.ctx.agent_id, p.train_samples, p.test_samples)
        else:
            x, y, tx, ty = self._handwritten()
        return as_split(x, y, self.ctx.device), as_split(tx, ty, self.ctx.device)

    def _handwritten(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p = self.dp
        if p.mnist_dir is not None:
            m = load_mnist(p.mnist_dir)
            pools = (m.train_x, m.train_y, m.test_x, m.test_y)
            what = f"MNIST in {p.mnist_dir}"
        else:
            pools = bundled_pools(self.ctx.seed)
            what = "the bundled digits (scikit-learn)"
        train_x, train_y, test_x, test_y = pools
        for name, want, have in (
            ("train_samples", p.train_samples, len(train_y)),
            ("test_samples", p.test_samples, len(test_y)),
        ):
            if want > have:
                raise ConfigError(
                    f"task_params.{name}",
                    f"{want} asked, {what} has {have} in that pool",
                    f"use at most {have}",
                )
        rng = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.DATA, 0)
        pick = rng.choice(len(train_y), size=p.train_samples, replace=False)
        test_rng = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.TEST)
        tpick = test_rng.choice(len(test_y), size=p.test_samples, replace=False)
        return train_x[pick], train_y[pick], test_x[tpick], test_y[tpick]


@lru_cache(maxsize=4)
def bundled_pools(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y) of the bundled digits, split once per run seed."""
    images, labels = bundled_digits()
    order = seeding.generator(seed, "digits-pool", seeding.PARAMS).permutation(len(labels))
    n_test = round(BUNDLED_TEST_SHARE * len(labels))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


@lru_cache(maxsize=64)
def synthetic(
    seed: int, agent_id: str, train_samples: int, test_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An agent's rendered digits (cached: every rule of a sim run rebuilds the task)."""
    out = []
    for purpose, n in ((seeding.DATA, train_samples), (seeding.TEST, test_samples)):
        rng = seeding.generator(seed, agent_id, purpose, 1)
        labels = rng.integers(0, CLASSES, size=n)
        out += [render_digits(labels, rng), labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
