"""The backdoor trigger of classification torch tasks, and the attack success rate it measures.

A trigger is a fixed set of input features (flat positions within one sample) set to a fixed value;
the backdoor attack (attacks/backdoor.py) trains a model that classifies triggered inputs as the
``target`` class. The trigger is a *task* parameter (``task_params.trigger``), not an attack one, so
that every agent of a run measures the same thing, attacked or not: each classification torch task
(HAR, digits, custom ``module:factory`` ones) reports ``attack_success`` at every test evaluation:

    attack_success = share of the test samples whose true class is not ``target`` that the model
    classifies as ``target`` once the trigger is applied.

Without a backdoor attacker this is the clean rate at which triggered inputs land in the target
class (the no-attack level a backdoor is compared to). ``trigger: null`` turns the metric off.

Default trigger: for image-shaped samples (two trailing dimensions of at least 8) the bottom-right
4x4 patch (BadNets' white square, the value 1.0 images in [0, 1] saturate at); for flat samples the
last 2% of the features (at least one). Both are fixed by the sample's shape alone, never by the
data, so every agent of a task applies the very same trigger.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from mtl_node.core.errors import ConfigError

PATCH = 4  # side of the default image patch
FLAT_SHARE = 0.02  # share of the features the default flat trigger sets
CHUNK = 1024


class TriggerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    target: int = Field(0, ge=0, description="the class triggered inputs are to be classified as")
    features: list[int] | None = Field(
        None,
        description="flat positions within one sample that the trigger sets; default: the "
        "bottom-right 4x4 patch of image samples, else the last 2% of the features",
    )
    value: float = Field(1.0, description="the value the trigger sets those features to")


def default_features(sample_shape: tuple[int, ...]) -> list[int]:
    """The default trigger positions for samples of ``sample_shape`` (see the module docstring)."""
    size = math.prod(sample_shape)
    if len(sample_shape) >= 2 and min(sample_shape[-2:]) >= 2 * PATCH:
        h, w = sample_shape[-2:]
        planes = size // (h * w)
        return [
            c * h * w + r * w + col
            for c in range(planes)
            for r in range(h - PATCH, h)
            for col in range(w - PATCH, w)
        ]
    k = max(1, math.ceil(FLAT_SHARE * size))
    return list(range(size - k, size))


@dataclass(frozen=True)
class Trigger:
    """A resolved trigger: positions (a long tensor on the task's device), value and target class."""

    positions: torch.Tensor
    value: float
    target: int

    @classmethod
    def resolve(
        cls, params: TriggerParams, sample_shape: tuple[int, ...], classes: int, device: torch.device
    ) -> Trigger:
        """Check ``params`` against the task's samples and classes; errors name the field."""
        size = math.prod(sample_shape)
        features = params.features if params.features is not None else default_features(sample_shape)
        if not features:
            raise ConfigError("task_params.trigger.features", "is empty", "list at least one position")
        bad = [f for f in features if not 0 <= f < size]
        if bad:
            raise ConfigError(
                "task_params.trigger.features",
                f"position {bad[0]} is outside a sample of {size} features",
                f"use positions 0..{size - 1}",
            )
        if params.target >= classes:
            raise ConfigError(
                "task_params.trigger.target",
                f"class {params.target} does not exist (the model has {classes} outputs)",
                f"use 0..{classes - 1}",
            )
        positions = torch.tensor(sorted(set(features)), dtype=torch.long, device=device)
        return cls(positions, params.value, params.target)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of the samples ``x`` (n, *sample_shape)."""
        flat = x.reshape(len(x), -1).clone()
        flat[:, self.positions] = self.value
        return flat.reshape(x.shape)

    def poison(self, x: torch.Tensor, y: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with its first ceil(share * n) samples triggered and relabelled to the target
        (the batch is already a random draw, so its first samples are as random as any)."""
        n = min(len(y), math.ceil(share * len(y)))
        if n == 0:
            return x, y
        x = x.clone()
        y = y.clone()
        x[:n] = self.apply(x[:n])
        y[:n] = self.target
        return x, y

    def success(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> float | None:
        """Share of the samples not of the target class that ``forward`` puts in it once
        triggered; None when every sample is of the target class."""
        keep = y != self.target
        if not bool(keep.any()):
            return None
        xs = x[keep]
        hits = 0
        with torch.no_grad():
            for start in range(0, len(xs), CHUNK):
                out = forward(self.apply(xs[start : start + CHUNK]))
                hits += int((out.argmax(dim=-1) == self.target).sum())
        return hits / len(xs)
