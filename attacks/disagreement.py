"""Attacks aimed at robust aggregation since 2021: dissensus (against gossip and clipping), and
min-max / min-sum (the strongest model-poisoning attacks that stay inside the honest spread).

What the attack node knows (mtl_node.attack_api): its own honest model h of round i, the models
its neighbours sent in round i-1, and the requester's own model of round i (fetched on demand).
The maths is in ``mtl_node.kernels.attacks`` (one row here); every floating tensor of the model is
one vector for the distances, as a rule sees it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from attacks._common import PARAMS_CONFIG, flat, from_flat, honest_pool, victim_model
from mtl_node.attack_api import ATTACKS, Attack
from mtl_node.kernels.attacks import dissensus, min_max, rop
from mtl_node.wire import StateDict


class DissensusParams(BaseModel):
    model_config = PARAMS_CONFIG

    eps: float = Field(
        1.0,
        gt=0.0,
        description="strength: 1 cancels the victim's gossip step (with byzantine attackers "
        "serving it), above 1 reverses it",
    )
    byzantine: int = Field(
        1, ge=1, le=100_000, description="B: the Byzantine neighbours the victim is assumed to have"
    )


@ATTACKS.register("dissensus")
class Dissensus(Attack):
    """x = psi_k - eps * sum_{honest j} (psi_j - psi_k) / B, per victim k (He et al. 2022), with
    uniform weights (the attacker knows no mixing matrix).

    psi_k is the victim's model (fetched on demand, else its round i-1 model); the honest psi_j are
    the models of the attacker's neighbours other than the victim fetched in round i-1 (the
    attacker's view of the victim's honest neighbours). Serves h when psi_k is unknown; with no
    honest model known it serves psi_k (echo). Two-faced: each victim gets its own.
    """

    name = "dissensus"
    Params = DissensusParams
    needs_requester_model = True

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, DissensusParams)
        victim = victim_model(self.view, round_, requester)
        if victim is None:
            return honest
        known = self.view.neighbors(round_ - 1)
        others = [known[a] for a in sorted(known) if a != requester]
        v = flat(victim)
        X = np.stack([flat(m) for m in others])[None] if others else np.zeros((1, 0, v.size))
        present = np.ones(X.shape[:2], dtype=bool)
        x = dissensus(v[None], X, present, np.array([p.eps]), np.array([float(p.byzantine)]))
        return from_flat(victim, x[0])


class MinMaxParams(BaseModel):
    model_config = PARAMS_CONFIG

    direction: Literal["std", "unit", "sign"] = Field(
        "std", description="p: the honest std, the unit vector of the honest mean, or its sign"
    )
    gamma_init: float = Field(10.0, gt=0.0, description="first gamma the search tries")
    iters: int = Field(40, ge=1, le=1000, description="steps of the gamma search (each halves the step)")


class _MinMaxBase(Attack):
    objective: str

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, MinMaxParams)
        pool = honest_pool(self.view, round_, honest)
        H = np.stack([flat(m) for m in pool])[None]
        x, _ = min_max(
            H,
            np.ones(H.shape[:2], dtype=bool),
            p.direction,
            self.objective,
            np.array([p.gamma_init]),
            np.array([p.iters]),
        )
        return from_flat(honest, x[0])


@ATTACKS.register("min-max")
class MinMax(_MinMaxBase):
    """x = mu - gamma * p (Shejwalkar & Houmansadr 2021), mu and std over H_i = [h] + the neighbour
    models fetched in round i-1; gamma the largest found with max_i ||x - h_i|| <= max_{i,j}
    ||h_i - h_j||: no farther from any honest model than the honest models are from each other."""

    name = "min-max"
    Params = MinMaxParams
    objective = "max"


@ATTACKS.register("min-sum")
class MinSum(_MinMaxBase):
    """x = mu - gamma * p as min-max, gamma the largest found with sum_i ||x - h_i||^2 <=
    max_i sum_j ||h_i - h_j||^2: no farther in summed squared distance than any honest model."""

    name = "min-sum"
    Params = MinMaxParams
    objective = "sum"


class RopParams(BaseModel):
    model_config = PARAMS_CONFIG

    z: float = Field(1.0, ge=0.0, description="length of the perturbation, in norms of the honest std")
    angle: float = Field(90.0, ge=0.0, le=180.0, description="degrees between the perturbation and mu - c")
    relocation: float = Field(
        0.9, ge=0.0, le=1.0, description="lam: the perturbation starts at lam * mu + (1 - lam) * c"
    )


@ATTACKS.register("rop")
class Rop(Attack):
    """x = lam * mu + (1 - lam) * c + z * ||sigma|| * (sin(a) p + cos(a) u), per victim
    (Ozfatura et al. 2023, aimed at centred clipping): c the victim's own model (the centre a
    self-clipping, clipped-gossip or balance victim clips around; fetched on demand, else its round
    i-1 model), mu and sigma the mean and std over H_i = [h] + the neighbour models fetched in round
    i-1, u the unit vector of mu - c, p the all-ones direction made orthogonal to u. At a = 90 the
    perturbation is orthogonal to where the victim is heading, so clipping it does not undo it.
    Serves h when c is unknown. Two-faced: each victim gets its own."""

    name = "rop"
    Params = RopParams
    needs_requester_model = True

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, RopParams)
        victim = victim_model(self.view, round_, requester)
        if victim is None:
            return honest
        pool = honest_pool(self.view, round_, honest)
        H = np.stack([flat(m) for m in pool])
        mean, std = H.mean(axis=0), H.std(axis=0)
        x = rop(
            flat(victim)[None],
            mean[None],
            std[None],
            np.array([p.relocation]),
            np.array([np.deg2rad(p.angle)]),
            np.array([p.z]),
        )
        return from_flat(honest, x[0])
