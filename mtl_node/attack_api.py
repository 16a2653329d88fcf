"""The interface Byzantine behaviours implement, and their registry.

The behaviours themselves live in the ``attacks`` package, which depends on mtl_node and never the
reverse: it registers them here through the ``resilient_mtl.attacks`` entry point, loaded on first
use. An attack node is an ordinary agent whose served model is ``craft``-ed per request.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from mtl_node.errors import ConfigError
from mtl_node.registry import Registry
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

ATTACKS: Registry[type[Attack]] = Registry("attack")
_loaded = False


@dataclass(frozen=True)
class AttackContext:
    agent_id: str
    seed: int


class Attack(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        self.ctx = ctx
        self.params = params

    @abstractmethod
    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        """The model served to ``requester`` for ``round_``; ``honest`` is what we would send."""


def load_plugins() -> None:
    """Import every package that registers attacks (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group="resilient_mtl.attacks"):
        try:
            ep.load()
        except Exception:
            log.exception("attack plugin %s failed to load", ep.value)


def make_attack(name: str, agent_id: str, seed: int, params: Mapping[str, Any]) -> Attack:
    load_plugins()
    cls = ATTACKS.get(name, field="attack")
    try:
        parsed = cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"attack_params.{where}" if where else "attack_params",
            f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})",
            f"parameters of attack {name}: {', '.join(sorted(cls.Params.model_fields))}",
        ) from None
    return cls(AttackContext(agent_id, seed), parsed)
