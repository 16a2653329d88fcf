"""Random-noise attacks: a Gaussian model, the honest model plus tiny noise, and NaN/Inf payloads.

Every draw comes from ``attack_generator(seed, attacker, NAME, *draw_counters(redraw, i,
requester))`` (mtl_node.attack_api), tensor by tensor in sorted name order, floating tensors only.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, draw, per_tensor
from attacks.constant import REDRAW_HELP
from mtl_node.attack_api import ATTACKS, Attack, Redraw
from mtl_node.kernels.attacks import perturbed
from mtl_node.wire import StateDict


class GaussianParams(BaseModel):
    model_config = PARAMS_CONFIG

    mean: float = Field(0.0, description="mean of every coordinate")
    std: float = Field(200.0, ge=0.0, description="standard deviation of every coordinate")
    redraw: Redraw = Field("round", description=REDRAW_HELP)


@ATTACKS.register("gaussian")
class Gaussian(Attack):
    """x_j ~ N(mean, std^2) independently of the honest model (Blanchard et al. 2017 use std 200).

    One ``normal(mean, std, shape)`` draw per floating tensor in sorted name order.
    """

    name = "gaussian"
    Params = GaussianParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, GaussianParams)
        rng = self.generator(round_, requester, p.redraw)
        return per_tensor(honest, lambda _, t: draw(rng, t, "normal", p.mean, p.std))


class SmallPerturbationParams(BaseModel):
    model_config = PARAMS_CONFIG

    std: float = Field(0.01, gt=0.0, description="standard deviation of the noise added to each coordinate")
    redraw: Redraw = Field("round", description=REDRAW_HELP)


@ATTACKS.register("small-perturbation")
class SmallPerturbation(Attack):
    """x_j = h_j + e_j, e_j ~ N(0, std^2): hard to tell from an honest model by its loss.

    One ``normal(0, std, shape)`` draw per floating tensor in sorted name order.
    """

    name = "small-perturbation"
    Params = SmallPerturbationParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, SmallPerturbationParams)
        rng = self.generator(round_, requester, p.redraw)
        return per_tensor(honest, lambda _, t: perturbed(t, draw(rng, t, "normal", 0.0, p.std)))


class NanParams(BaseModel):
    model_config = PARAMS_CONFIG

    value: Literal["nan", "inf", "-inf"] = Field("nan", description="the non-finite value sent")
    fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="share of each tensor's coordinates replaced (at least one)"
    )
    redraw: Redraw = Field("round", description="which coordinates: " + REDRAW_HELP)


@ATTACKS.register("nan")
class Nan(Attack):
    """x = h except k = max(1, ceil(fraction * numel)) coordinates per floating tensor set to value.

    Which ones: the first k of ``permutation(numel)`` over the flattened tensor (all of them when
    fraction is 1, with no draw). A receiving agent must reject the model (non-finite) and leave
    the attacker out of the round.
    """

    name = "nan"
    Params = NanParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, NanParams)
        value = float(p.value)
        rng = self.generator(round_, requester, p.redraw)

        def poison(_: str, t: torch.Tensor) -> torch.Tensor:
            n = t.numel()
            if n == 0:
                return t
            k = max(1, math.ceil(p.fraction * n))
            if k >= n:
                return torch.full_like(t, value)
            index = torch.as_tensor(np.asarray(rng.permutation(n)[:k]), device=t.device)
            flat = t.detach().clone().reshape(-1)
            flat[index] = value
            return flat.reshape(t.shape)

        return per_tensor(honest, poison)
