"""The paper's attacks: random constants per coordinate, and parameters scaled down.

Section 7 of the paper: Byzantine agents "send random values (for each dimension) from the
interval [15, 16] for target localization, and [0, 0.1] for the other two case studies" (constant);
the issue's second reading of the classification attack scales the honest parameters by U[0, 0.1]
per coordinate (scaled).

Draws are keyed by (seed, attacker id, round[, requester]) so the model served does not depend on
the order requests arrive in: a run over gRPC and in one process see the same attack.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attacks._common import PARAMS_CONFIG, draw, per_tensor
from mtl_node.attack_api import ATTACKS, Attack, Redraw, draw_generator
from mtl_node.kernels.attacks import scaled
from mtl_node.wire import StateDict

REDRAW_HELP = (
    "never: one draw for the whole run; round: a fresh draw every round; "
    "request: a fresh draw per requester and round (two-faced)"
)


class ConstantParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(15.0, description="lower end of the interval")
    high: float = Field(16.0, description="upper end of the interval")
    redraw: Literal["never", "round", "request"] = Field(
        "round",
        description="never: one draw for the whole run (reference code); round: a fresh draw "
        "every round (paper text); request: a fresh draw per requester and round (two-faced)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ConstantParams:
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self


@ATTACKS.register("constant")
class Constant(Attack):
    """x_j ~ U[low, high] for every coordinate j of every tensor (integer tensors: cast).

    Generator: ``seeding.generator(seed, attacker, ATTACK, *c)`` with c = () for redraw=never,
    (i,) for round, (i, *id_key(requester)) for request; one ``uniform(low, high, shape)`` per tensor
    in sorted name order. (No name salt: ``draw_generator(..., salted=False)``; see there why.)
    """

    name = "constant"
    Params = ConstantParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, ConstantParams)
        rng = draw_generator(
            self.ctx.seed, self.ctx.agent_id, self.name, p.redraw, round_, requester, salted=False
        )
        out: StateDict = {}
        for name in sorted(honest):
            t = honest[name]
            values = rng.uniform(p.low, p.high, size=tuple(t.shape))
            out[name] = torch.as_tensor(values, dtype=t.dtype).to(t.device)
        return out


class ScaledParams(BaseModel):
    model_config = PARAMS_CONFIG

    low: float = Field(0.0, description="lower end of the per-coordinate scale factor")
    high: float = Field(0.1, description="upper end of the per-coordinate scale factor")
    redraw: Redraw = Field("round", description=REDRAW_HELP)

    @model_validator(mode="after")
    def _ordered(self) -> ScaledParams:
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self


@ATTACKS.register("scaled")
class Scaled(Attack):
    """x_j = h_j * s_j, s_j ~ U[low, high], h the attacker's honest model of round i.

    Generator: ``attack_generator(seed, attacker, "scaled", *draw_counters(redraw, i, requester))``,
    one ``uniform(low, high, shape)`` per floating tensor in sorted name order.
    """

    name = "scaled"
    Params = ScaledParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, ScaledParams)
        rng = self.generator(round_, requester, p.redraw)
        return per_tensor(honest, lambda _, t: scaled(t, draw(rng, t, "uniform", p.low, p.high)))
