"""Attacks in time: honest then hostile (on-off), silent (omission), or out of date (stale)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from attacks._common import PARAMS_CONFIG
from mtl_node.attack_api import ATTACKS, Attack, AttackContext, AttackView, Withhold, make_attack
from mtl_node.core.errors import ConfigError
from mtl_node.kernels.attacks import on_off_attacking, stale_round
from mtl_node.wire import StateDict


class OnOffParams(BaseModel):
    model_config = PARAMS_CONFIG

    honest_rounds: int = Field(10, ge=0, description="rounds served honestly before (each) attack phase")
    attack_rounds: int = Field(0, ge=0, description="rounds of each attack phase; 0: attack for ever after")
    then: str = Field("constant", description="the attack used in attack phases (mtl-node attacks)")
    then_params: dict[str, Any] = Field({}, description="parameters of that attack")

    @field_validator("then")
    @classmethod
    def _then(cls, v: str) -> str:
        if v == "on-off":
            raise ValueError("on-off cannot wrap itself")
        return v


@ATTACKS.register("on-off")
class OnOff(Attack):
    """Round i is an attack round iff
    attack_rounds = 0: i > honest_rounds;
    else: (i - 1) mod (honest_rounds + attack_rounds) >= honest_rounds.
    Attack rounds serve ``then``'s model (same seed and attacker id), other rounds h.

    Against loss-filtered the honest phase earns a low accumulated loss (phi_kl); with nu the
    forgetting factor, one attack round of loss L raises it by nu * L, so only attacks whose loss
    stays near the victim's slip through the filter after the switch.
    """

    name = "on-off"
    Params = OnOffParams

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        assert isinstance(params, OnOffParams)
        try:
            # the run's rule too: a white-box inner attack (adaptive) reads it
            self.inner = make_attack(
                params.then,
                ctx.agent_id,
                ctx.seed,
                params.then_params,
                rule=ctx.rule,
                rule_params=ctx.rule_params,
            )
        except ConfigError as exc:
            field = exc.field.replace("attack_params", "attack_params.then_params", 1)
            if exc.field == "attack":
                field = "attack_params.then"
            raise ConfigError(field, exc.problem, exc.fix) from None
        self.needs_requester_model = self.inner.needs_requester_model

    def bind(self, view: AttackView) -> None:
        super().bind(view)
        self.inner.bind(view)

    def attacking(self, round_: int) -> bool:
        p = self.params
        assert isinstance(p, OnOffParams)
        return on_off_attacking(round_, p.honest_rounds, p.attack_rounds)

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        if self.attacking(round_):
            return self.inner.craft(round_, requester, honest)
        return honest


class OmissionParams(BaseModel):
    model_config = PARAMS_CONFIG

    mode: Literal["refuse", "hang"] = Field(
        "refuse", description="refuse: answer UNAVAILABLE at once; hang: answer nothing until the deadline"
    )


@ATTACKS.register("omission")
class Omission(Attack):
    """x = nothing: raises Withhold. The node answers UNAVAILABLE (refuse) or holds the request until
    the requester's deadline and then fails it (hang); either way the requester counts the attacker
    missing that round. A hanging neighbour costs every requester its full fetch deadline each round.
    """

    name = "omission"
    Params = OmissionParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, OmissionParams)
        raise Withhold(hang=p.mode == "hang")


class StaleParams(BaseModel):
    model_config = PARAMS_CONFIG

    lag: int = Field(10, ge=1, le=10_000_000, description="rounds behind: serves round max(1, i - lag)")


@ATTACKS.register("stale")
class Stale(Attack):
    """x = h(max(1, i - lag)), the attacker's own honest model of that round; when the node no
    longer keeps that round, the oldest round it keeps after it (small models are kept for the
    whole run; large ones only the last few rounds). Without any: h."""

    name = "stale"
    Params = StaleParams

    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        p = self.params
        assert isinstance(p, StaleParams)
        old = self.view.own(int(stale_round(round_, p.lag)))
        return old if old is not None else honest
