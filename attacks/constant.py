"""The paper's attack: every coordinate of the model replaced by a value drawn from [low, high].

Draws are keyed by (seed, attacker id, round[, requester]) so the model served does not depend on
the order requests arrive in: a run over gRPC and in one process see the same attack.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtl_node import seeding
from mtl_node.attack_api import ATTACKS, Attack
from mtl_node.wire import StateDict


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


@ATTACKS.register("constant", "per-coordinate values drawn from [low, high] (paper: [15,16])")
class Constant(Attack):
    name = "constant"
    Params = ConstantParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, ConstantParams)
        counters: tuple[int, ...] = ()
        if p.redraw in ("round", "request"):
            counters = (round_,)
        if p.redraw == "request":
            counters += tuple(seeding.id_key(requester))
        rng = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.ATTACK, *counters)
        out: StateDict = {}
        for name in sorted(honest):
            t = honest[name]
            values = rng.uniform(p.low, p.high, size=tuple(t.shape))
            out[name] = torch.as_tensor(values, dtype=t.dtype).to(t.device)
        return out
