"""Which attacks the vectorized engine reproduces, and for which networks.

An attack's kind says what its model is built from each round (``senders.Attackers`` builds it):
random draws, the pool of last round's fetched models, the requester's model, or both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtl_node.attack_api import make_attack
from mtl_node.config import NodeConfig
from mtl_node.kernels import attacks as ka

# Attacks the batched engine reproduces, by what they need each round.
DRAWN = {  # name -> (distribution, first parameter, second parameter, name salt in the generator)
    "constant": ("uniform", "low", "high", False),
    "gaussian": ("normal", "mean", "std", True),
    "small-perturbation": ("normal", None, "std", True),
    "scaled": ("uniform", "low", "high", True),
}
POOL_ATTACKS = ("ipm", "alie", "mimic", "min-max", "min-sum")  # built from last round's fetch
# built from the requester's model (adaptive: and, with direction away or against clipped-gossip,
# from last round's fetch too: ``reads_pool``)
REQUESTER_ATTACKS = ("echo", "distance-capture", "loss-budget", "adaptive")
VICTIM_POOL_ATTACKS = ("dissensus", "rop")  # built from both
ATTACKS = (
    *DRAWN,
    "nan",
    "omission",
    "sign-flip",
    *POOL_ATTACKS,
    *REQUESTER_ATTACKS,
    *VICTIM_POOL_ATTACKS,
    "low-loss",
    "stale",
    "on-off",
)
HONEST = "honest"  # what an on-off attacker serves outside its attack rounds


@dataclass(frozen=True)
class Sender:
    """One Byzantine agent's attack: ``kind`` and ``params`` of what it serves in attack rounds,
    ``on_off`` = (honest_rounds, attack_rounds) when it only attacks in some rounds."""

    kind: str
    params: Any
    on_off: tuple[int, int] | None

    def attacking(self, round_: int) -> bool:
        return self.on_off is None or ka.on_off_attacking(round_, *self.on_off)


def sender_of(cfg: NodeConfig) -> Sender:
    key = (cfg.seed, cfg.id, cfg.attack, repr(sorted(cfg.attack_params.items())))
    got = _SENDERS.get(key)
    if got is None:
        got = _SENDERS[key] = _make_sender(cfg)
    return got


# Stacked runs repeat the same attackers: their parsed parameters are shared (they are immutable).
_SENDERS: dict[tuple[Any, ...], Sender] = {}


def _make_sender(cfg: NodeConfig) -> Sender:
    assert cfg.attack is not None
    attack = make_attack(cfg.attack, cfg.id, cfg.seed, cfg.attack_params)
    if cfg.attack == "on-off":
        p = attack.params
        inner = attack.inner  # type: ignore[attr-defined]
        return Sender(inner.name, inner.params, (int(p.honest_rounds), int(p.attack_rounds)))  # type: ignore[attr-defined]
    return Sender(cfg.attack, attack.params, None)


def reads_pool(cfg: NodeConfig) -> bool:
    """The attacker's model is built from what it fetched last round (so the engine keeps it): pool
    and victim-pool attacks, and adaptive when its direction is ``away`` (the honest mean) or its
    test is clipped-gossip's radius (estimated from the models it knows)."""
    if cfg.attack is None:
        return False
    sender = sender_of(cfg)
    if sender.kind in (*POOL_ATTACKS, *VICTIM_POOL_ATTACKS):
        return True
    if sender.kind == "adaptive":
        p = sender.params
        radius = ka.adaptive_test(p.test, cfg.rule) == "radius" and cfg.rule == "clipped-gossip"
        return bool(p.direction == "away" or radius)
    return False


def attack_unsupported(configs: Sequence[NodeConfig]) -> str | None:
    """Why the batched engine cannot reproduce these configs' attacks, or None."""
    byzantine = {c.id: c for c in configs if c.attack is not None}
    kinds: dict[str, str] = {}
    for c in byzantine.values():
        if c.attack not in ATTACKS:
            return f"{c.id}: attack {c.attack!r} (only {', '.join(ATTACKS)})"
        try:
            sender = sender_of(c)
        except Exception as exc:  # an invalid attack is the per-agent engine's to report
            return f"{c.id}: attack {c.attack!r}: {exc}"
        if sender.kind not in ATTACKS or sender.kind == "on-off":
            return f"{c.id}: on-off around {sender.kind!r} (only {', '.join(ATTACKS[:-1])})"
        if sender.kind == "omission" and sender.params.mode != "refuse":
            return f"{c.id}: omission mode {sender.params.mode!r} (only refuse)"
        goal = getattr(sender.params, "goal", 0.0)
        if not isinstance(goal, int | float) and len(goal) != 2:
            return f"{c.id}: goal of {len(goal)} values (the model has 2)"
        kinds[c.id] = sender.kind
    # An attacker that crafts from the requester's model (echo, distance-capture, loss-budget,
    # dissensus, rop) fetches that model from the requester when it lists it. A dissensus or rop
    # requester needs the sender's model in turn to craft what it serves back: the two fetch from
    # each other within the round, and what each ends up with depends on which asked first (an
    # attack node answers a requester it is itself fetching from without that requester's model:
    # mtl_node/attack_node.py, ``_fetch_requester``), i.e. on scheduling, not on the configs. Only
    # attackers that use what they fetch (pool and victim-pool attacks) would see it. A pool
    # requester (ipm, alie, mimic, min-max, min-sum) serves every requester the same model without
    # fetching theirs: nothing depends on the order, and the batched engine reproduces it
    # (senders.Attackers._victims).
    # An adaptive attacker that reads its fetch (reads_pool) is in the same position.
    for c in byzantine.values():
        if kinds[c.id] not in VICTIM_POOL_ATTACKS and not (kinds[c.id] == "adaptive" and reads_pool(c)):
            continue
        for n in c.neighbors:
            if kinds.get(n) in (*REQUESTER_ATTACKS, *VICTIM_POOL_ATTACKS) and c.id in byzantine[n].neighbors:
                return (
                    f"{c.id} ({kinds[c.id]}) fetches from {n} ({kinds[n]}) and {n} from {c.id}: what "
                    "each serves the other depends on which asks first"
                )
    return None


def draw_args(kind: str, p: Any) -> tuple[float, float]:
    _, first, second, _ = DRAWN[kind]
    return (0.0 if first is None else float(getattr(p, first)), float(getattr(p, second)))
