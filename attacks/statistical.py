"""Attacks built from honest models: sign flip, inner-product manipulation, ALIE, mimic.

The honest models an attack node knows when it serves round i (see mtl_node.attack_api): its own
honest model h = psi_self(i), and the models psi_l(i-1) its neighbours sent in round i-1 (the last
complete fetch; a neighbour that was missing or invalid then is not in it). ``honest_pool`` is
H_i = [h] + [psi_l(i-1) by neighbour id]. None of these attacks is random.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, honest_pool, like, moments, per_tensor
from mtl_node.attack_api import ATTACKS, Attack
from mtl_node.kernels.attacks import alie, ipm, sign_flip
from mtl_node.wire import StateDict


class SignFlipParams(BaseModel):
    model_config = PARAMS_CONFIG

    scale: float = Field(1.0, gt=0.0, description="the served model is -scale times the honest one")


@ATTACKS.register("sign-flip")
class SignFlip(Attack):
    """x = -scale * h, h the attacker's honest model of round i."""

    name = "sign-flip"
    Params = SignFlipParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, SignFlipParams)
        return per_tensor(honest, lambda _, t: sign_flip(t, p.scale))


class IpmParams(BaseModel):
    model_config = PARAMS_CONFIG

    epsilon: float = Field(0.1, gt=0.0, description="the served model is -epsilon times the honest mean")


@ATTACKS.register("ipm")
class Ipm(Attack):
    """x = -epsilon * mean(H_i) (Xie et al. 2020, "Fall of empires", applied to models).

    H_i = [h] + [psi_l(i-1) for neighbours l fetched in round i-1], mean per coordinate; with no
    neighbour model known (round 1) the mean is h alone.
    """

    name = "ipm"
    Params = IpmParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, IpmParams)
        pool = honest_pool(self.view, round_, honest)
        return per_tensor(honest, lambda n, t: like(ipm(moments(pool, n)[0], p.epsilon), t))


class AlieParams(BaseModel):
    model_config = PARAMS_CONFIG

    z: float = Field(1.0, ge=0.0, description="how many standard deviations from the mean")
    sign: Literal[-1, 1] = Field(-1, description="-1: mean - z * std; 1: mean + z * std")


@ATTACKS.register("alie")
class Alie(Attack):
    """x_j = mean_j(H_i) + sign * z * std_j(H_i) (Baruch et al. 2019), population std (ddof 0).

    H_i as for ipm. With only h known (round 1, no neighbours) std is 0 and x = h.
    """

    name = "alie"
    Params = AlieParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, AlieParams)
        pool = honest_pool(self.view, round_, honest)

        def shift(name: str, t: torch.Tensor) -> torch.Tensor:
            mean, std = moments(pool, name)
            return like(alie(mean, std, p.sign, p.z), t)

        return per_tensor(honest, shift)


class MimicParams(BaseModel):
    model_config = PARAMS_CONFIG

    target: str | None = Field(
        None, description="the neighbour copied; default: the smallest id among neighbours known"
    )


@ATTACKS.register("mimic")
class Mimic(Attack):
    """x = psi_t(i-1), t = target (default: min id of the neighbours fetched in round i-1).

    Karimireddy et al. 2022: in heterogeneous networks, consistently copying one honest agent biases
    every aggregate towards that agent's data. Falls back to h when t's model is not known.
    """

    name = "mimic"
    Params = MimicParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, MimicParams)
        known = self.view.neighbors(round_ - 1)
        target = p.target if p.target is not None else min(known, default=None)
        if target is None or target not in known:
            return honest
        return known[target]
