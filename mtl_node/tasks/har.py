"""Case study 2 of the paper: human activity recognition, one agent per subject.

Each agent holds the smartphone-sensor samples of one subject (561 features, 6 activities) and
learns a linear softmax classifier (``nn.Linear(561, 6)``) with cross-entropy; subjects move,
carry and hold the phone differently, so each is its own, related task. The defaults follow the
reference code (HumanActivityRecog): SGD with learning rate 0.01 on batches of 10 samples.

Data: the real UCI HAR data set when ``data_dir`` points at it (mtl_node.data.uci_har: the
directory or zip as downloaded), else the built-in HAR-shaped generator (mtl_node.data.har_synthetic)
so the example runs offline. Either way the subject's samples are split into the agent's training
data and its own held-out test split (``test_fraction``), by a permutation keyed by (seed, subject):
the official UCI split cannot be used per agent, since it puts each subject wholly in train or test.

Neighbour scoring uses the agent's current training batch (see mtl_node.tasks.torch_task).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from torch import nn

from mtl_node import seeding
from mtl_node.core.errors import ConfigError
from mtl_node.data import har_synthetic
from mtl_node.data.uci_har import FEATURES, load_uci_har
from mtl_node.tasks.base import TASKS, TaskContext
from mtl_node.tasks.torch_task import Split, TorchTask, TorchTaskParams, as_split

CLASSES = 6


class HarParams(TorchTaskParams):
    lr: float = Field(0.01, gt=0.0, description="learning rate of the local optimizer")
    optimizer: Literal["adam", "sgd"] = Field("sgd", description="local optimizer (sgd as the reference)")
    batch_size: int = Field(10, ge=1, le=1 << 16, description="samples per local step")
    subject: int | None = Field(
        None, ge=1, description="the subject (1..30) whose data this agent holds; the planner sets it"
    )
    data_dir: str | None = Field(
        None, description="'UCI HAR Dataset' directory or zip; default: the built-in HAR-shaped generator"
    )
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="share of the subject's samples held out")
    samples: int | None = Field(
        None, ge=10, le=100_000, description="generator only: samples of the subject (default 281-409)"
    )


@TASKS.register("har")
class HumanActivityRecognition(TorchTask):
    name = "har"
    Params = HarParams

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        assert isinstance(params, HarParams)
        self.hp = params
        super().__init__(ctx, params)

    def build_module(self) -> nn.Module:
        return nn.Linear(FEATURES, CLASSES)

    def load_data(self) -> tuple[Split, Split]:
        p = self.hp
        if p.subject is None:
            raise ConfigError(
                "task_params.subject",
                "is required by task har",
                "give the subject (1..30) this agent holds; mtl-orchestrate sets one per agent",
            )
        if p.data_dir is not None:
            data = load_uci_har(p.data_dir)
            mine = data.subject == p.subject
            if not np.any(mine):
                raise ConfigError(
                    "task_params.subject",
                    f"subject {p.subject} has no samples in {p.data_dir}",
                    f"subjects there: {', '.join(map(str, data.subjects()))}",
                )
            x, y = data.x[mine], data.y[mine]
        else:
            if p.subject > har_synthetic.SUBJECTS:
                raise ConfigError(
                    "task_params.subject",
                    f"{p.subject} is not one of the generator's subjects",
                    f"use 1..{har_synthetic.SUBJECTS}, or data_dir for real data",
                )
            x, y = har_synthetic.generate_subject(self.ctx.seed, p.subject, p.samples)
        # Keyed by subject, not agent: two agents holding one subject hold the same split.
        order = seeding.generator(self.ctx.seed, f"har-split-{p.subject}", seeding.TEST).permutation(len(y))
        n_test = min(max(1, math.ceil(p.test_fraction * len(y))), len(y) - 1)
        test, train = order[:n_test], order[n_test:]
        return as_split(x[train], y[train], self.ctx.device), as_split(x[test], y[test], self.ctx.device)
