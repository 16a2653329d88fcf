"""The interface Byzantine behaviours implement, what they may see, and their registry.

The behaviours themselves live in the ``attacks`` package, which depends on mtl_node and never the
reverse: it registers them here through the ``resilient_mtl.attacks`` entry point, loaded on first
use. An attack node is an ordinary agent (same service, health, manifest) whose served model is
``craft``-ed per request, so it may differ per requester and per round (two-faced).

What an attack sees, through its bound :class:`AttackView` (the attack node fills it in):

- ``honest``: the node's own honest model of the round served (it learns alone, rule ``none``);
- ``view.neighbors(r)``: the valid models the node fetched from its neighbours in round ``r``. An
  attack serving round ``i`` uses round ``i - 1``: that set is complete before round ``i`` is even
  published, so the crafted model never depends on how fast neighbours answer, and an attack node
  never waits on a neighbour while serving (two attack nodes waiting on each other would deadlock);
- ``view.model_of(requester, i)``: the requester's own round-``i`` model, fetched on demand just
  before ``craft`` for attacks with ``needs_requester_model`` (echo, distance-capture, loss-budget).
  A normal requester publishes round ``i`` before it fetches, so this never waits; it is None when
  the requester is not a neighbour (no route to it) or is itself fetching from us for that round;
- ``view.own(r)``: the node's own honest model of an earlier round (stale replays);
- ``view.task``: the node's own task instance, a loss oracle on the node's own data. Used as the
  "same-task proxy" of the victim's data, exact only when the attacker shares the victim's task;
- ``view.victim_task(agent)``: a private copy of another agent's task (its very data), only in the
  in-process engine, for omniscient attacks; None over the network, where a daemon refuses them
  (``make_attack(..., network=True)`` and :meth:`Attack.check_network`);
- ``ctx.rule`` / ``ctx.rule_params``: the rule the run's normal agents use (white-box attacks).

``craft`` must be cheap and must not raise for lack of information: with nothing to craft from it
falls back to something documented (usually the honest model). To send nothing it raises
:class:`Withhold`; the node turns that into a missing neighbour at the requester (UNAVAILABLE at
once, or a hang until the requester's deadline).

Randomness: every draw comes from :func:`attack_generator`, keyed by the run seed, the attacker id,
the attack name and the round (and the requester when the draw is per request), never from shared
state, so the same model is served whatever order requests arrive in, over gRPC or in one process.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ValidationError

from mtl_node import seeding
from mtl_node.core import names
from mtl_node.core.errors import ConfigError
from mtl_node.core.registry import Registry
from mtl_node.wire import StateDict

if TYPE_CHECKING:
    from mtl_node.config import NodeConfig
    from mtl_node.tasks.base import Task

log = logging.getLogger(__name__)

ATTACKS: Registry[type[Attack]] = Registry("attack", names.ATTACKS)
_loaded = False

Redraw = Literal["never", "round", "request"]


@dataclass(frozen=True)
class AttackContext:
    agent_id: str
    seed: int
    # The rule (and its parameters) of the run: what the victims aggregate with (white-box attacks).
    rule: str = "none"
    rule_params: Mapping[str, Any] = field(default_factory=dict)


class Withhold(Exception):
    """Raised by ``craft`` to serve nothing: ``hang`` holds the request until the requester's
    deadline (a slow, silent neighbour), otherwise the request is refused at once (UNAVAILABLE)."""

    def __init__(self, hang: bool = False) -> None:
        super().__init__("hang" if hang else "refuse")
        self.hang = hang


class AttackView:
    """What an attack node shows its attack. This base shows nothing: an attack outside a node
    (unit tests, tools) must still craft something, falling back as its docstring says."""

    @property
    def task(self) -> Task | None:
        return None

    def neighbors(self, round_: int) -> Mapping[str, StateDict]:
        """Valid models fetched from neighbours in ``round_`` (complete for rounds before the one served)."""
        return {}

    def model_of(self, agent_id: str, round_: int) -> StateDict | None:
        """``agent_id``'s own model of ``round_`` if the node fetched it on demand, else None."""
        return None

    def own(self, round_: int) -> StateDict | None:
        """The node's honest model of ``round_``, or of the oldest round still kept after it."""
        return None

    def victim_task(self, agent_id: str) -> Task | None:
        """A private copy of ``agent_id``'s task (the same data, not shared state), for omniscient
        attacks: only where the victim lives in the same process (the in-process engine)."""
        return None


@dataclass
class StaticView(AttackView):
    """A view over given dictionaries: for tests, and for crafting outside a running node."""

    neighbor_models: dict[int, dict[str, StateDict]] = field(default_factory=dict)
    requester_models: dict[tuple[str, int], StateDict] = field(default_factory=dict)
    own_models: dict[int, StateDict] = field(default_factory=dict)
    task_instance: Task | None = None
    victim_tasks: dict[str, Task] = field(default_factory=dict)

    @property
    def task(self) -> Task | None:
        return self.task_instance

    def neighbors(self, round_: int) -> Mapping[str, StateDict]:
        return self.neighbor_models.get(round_, {})

    def model_of(self, agent_id: str, round_: int) -> StateDict | None:
        return self.requester_models.get((agent_id, round_))

    def own(self, round_: int) -> StateDict | None:
        later = sorted(r for r in self.own_models if r >= round_)
        return self.own_models[later[0]] if later else None

    def victim_task(self, agent_id: str) -> Task | None:
        return self.victim_tasks.get(agent_id)


def name_salt(name: str) -> int:
    """One 32-bit word of the attack's name, so two attacks of one node never share a stream."""
    return seeding.id_key(name)[0]


def draw_counters(redraw: Redraw, round_: int, requester: str) -> tuple[int, ...]:
    """never: one draw for the run; round: one per round; request: one per (round, requester)."""
    if redraw == "never":
        return ()
    if redraw == "round":
        return (round_,)
    return (round_, *seeding.id_key(requester))


def attack_generator(seed: int, agent_id: str, name: str, *counters: int) -> np.random.Generator:
    """``seeding.generator(seed, agent_id, ATTACK, name_salt(name), *counters)``.

    Draws from it are made tensor by tensor in sorted tensor-name order, each of the tensor's shape
    (numpy float64, then cast to the tensor's dtype), so a vectorized engine can reproduce them.
    """
    return seeding.generator(seed, agent_id, seeding.ATTACK, name_salt(name), *counters)


def draw_generator(
    seed: int, agent_id: str, name: str, redraw: Redraw, round_: int, requester: str, salted: bool = True
) -> np.random.Generator:
    """The generator of one random attack's draws for (round, requester): the one place that keys
    them, for the attack classes and the vectorized engine alike. ``salted=False`` leaves the name
    salt out (``constant`` only: its stream predates the salt, and the published case-study results
    were drawn from it)."""
    counters = draw_counters(redraw, round_, requester)
    if salted:
        return attack_generator(seed, agent_id, name, *counters)
    return seeding.generator(seed, agent_id, seeding.ATTACK, *counters)


class Attack(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    # Fetch the requester's own model of the round before ``craft`` (view.model_of).
    needs_requester_model: bool = False

    def __init__(self, ctx: AttackContext, params: BaseModel) -> None:
        self.ctx = ctx
        self.params = params
        self.view: AttackView = AttackView()

    def bind(self, view: AttackView) -> None:
        """Called by the attack node once, before serving."""
        self.view = view

    @classmethod
    def check_task(cls, task_cls: type[Task]) -> str | None:
        """Why this attack cannot run with ``task_cls`` (None: it can)."""
        return None

    @classmethod
    def check_network(cls, params: BaseModel) -> tuple[str, str] | None:
        """(parameter, why) this attack with ``params`` cannot serve over the network (a daemon),
        e.g. it reads its victims' data (``view.victim_task``); None: it can."""
        return None

    def generator(self, round_: int, requester: str, redraw: Redraw) -> np.random.Generator:
        return draw_generator(self.ctx.seed, self.ctx.agent_id, self.name, redraw, round_, requester)

    @abstractmethod
    def craft(self, round_: int, requester: str, honest: StateDict) -> StateDict:
        """The model served to ``requester`` for ``round_``; ``honest`` is what we would send."""

    # -- crash-only state hooks (mtl_node/state.py) ----------------------------------------------
    # Random draws need nothing here (keyed by seed, attacker, round, requester); caches that are
    # recomputed deterministically (label-flip's trajectory) need nothing either.

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(JSON-able part, tensors) a resumed attack node needs to serve exactly the same."""
        return {}, {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Restore what ``state()`` returned."""
        return None  # stateless by default


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


def parse_params(name: str, params: Mapping[str, Any], prefix: str = "attack_params") -> BaseModel:
    """Validate an attack's parameters, turning pydantic's report into one clear ConfigError."""
    load_plugins()
    cls = ATTACKS.get(name, field="attack")
    try:
        return cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{prefix}.{where}" if where else prefix,
            f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})",
            f"parameters of attack {name}: {', '.join(sorted(cls.Params.model_fields)) or 'none'}",
        ) from None


def make_attack(
    name: str,
    agent_id: str,
    seed: int,
    params: Mapping[str, Any],
    task: str | None = None,
    *,
    rule: str = "none",
    rule_params: Mapping[str, Any] | None = None,
    network: bool = False,
) -> Attack:
    """Build attack ``name``; with ``task`` (a task name) also check the attack can run on it;
    ``rule``/``rule_params``: the run's rule (white-box attacks read it); ``network``: it will serve
    as a daemon, so attacks that need the in-process engine (Attack.check_network) refuse."""
    load_plugins()
    cls = ATTACKS.get(name, field="attack")
    parsed = parse_params(name, params)
    if network:
        refused = cls.check_network(parsed)
        if refused is not None:
            where, why = refused
            raise ConfigError(
                f"attack_params.{where}",
                why,
                f"drop {where}, or run the topology in one process (mtl-orchestrate up --backend sim)",
            )
    if task is not None:
        from mtl_node.tasks import TASKS

        if task in TASKS:
            problem = cls.check_task(TASKS.get(task))
            if problem:
                raise ConfigError("attack", problem, f"use another attack, or a task that {name} supports")
    return cls(AttackContext(agent_id, seed, rule, dict(rule_params or {})), parsed)


def attack_of(config: NodeConfig, *, network: bool = False) -> Attack:
    """The attack of a Byzantine agent's config, given everything of its run an attack may read (its
    task, its rule and the rule's parameters): the one way the daemon, the per-agent engine and the
    torch batched engine build it, so an attacker serves the same maths in all three."""
    assert config.attack is not None
    return make_attack(
        config.attack,
        config.id,
        config.seed,
        config.attack_params,
        task=config.task,
        rule=config.rule,
        rule_params=config.rule_params.model_dump(),
        network=network,
    )
