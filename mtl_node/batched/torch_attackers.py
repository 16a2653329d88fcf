"""The attack nodes of a torch batched run: each attacker's own attack object and what it sees.

The engine crafts every Byzantine model by calling the attacker's own ``Attack`` (attacks/, whose
maths is in mtl_node.kernels) the way mtl_node.attack_node does in a daemon: with its honest model,
the models it fetched the round before, the requester's model fetched on demand and, for the
omniscient variants, a private copy of the victim's task. Keeping that here leaves the engine
(mtl_node.batched.torch_engine) with the round's tensor bookkeeping only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from mtl_node import wire
from mtl_node.attack_api import Attack, AttackView, Withhold, attack_of
from mtl_node.batched import torch_pool
from mtl_node.config import NodeConfig
from mtl_node.core.errors import WireError
from mtl_node.tasks import Task, make_task
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape)


def row(stacked: Mapping[str, torch.Tensor], k: int) -> StateDict:
    """Row ``k`` of stacked parameters: agent k's model."""
    return {name: t[k] for name, t in stacked.items()}


def reason_of(exc: Exception) -> str:
    """The missing-neighbour reason a daemon logs for a model that failed validation."""
    return f"{getattr(exc, 'reason', 'error')}: {exc}"


class _View(AttackView):
    """What attack node k sees: its own task and the neighbour models it fetched per round."""

    def __init__(self, attackers: Attackers, k: int, task: Task) -> None:
        self.attackers, self.k, self._task = attackers, k, task

    @property
    def task(self) -> Task:
        return self._task

    def neighbors(self, round_: int) -> Mapping[str, StateDict]:
        return self.attackers.fetched[self.k].get(round_, {})

    def model_of(self, agent_id: str, round_: int) -> StateDict | None:
        return self.attackers.requester_model(self.k, agent_id, round_)

    def victim_task(self, agent_id: str) -> Task | None:
        return self.attackers.victim_task(agent_id)

    def own(self, round_: int) -> StateDict | None:
        return None  # no supported attack replays its own history


class Attackers:
    """Every Byzantine agent's attack, bound to its view of the run."""

    def __init__(
        self,
        configs: Sequence[NodeConfig],
        index: Mapping[str, int],
        manifest: wire.Manifest,
        spec: torch_pool.Spec,
        tasks: Sequence[Task],
    ) -> None:
        self.configs, self.index, self.manifest, self.spec = list(configs), index, manifest, spec
        self.ids = [c.id for c in configs]
        # Per agent, the valid neighbour models it fetched, by round (attacks that read their pool).
        self.fetched: list[dict[int, dict[str, StateDict]]] = [{} for _ in configs]
        self.psi: Stacked = {}  # the round's adapted models, while crafting (requester_model)
        self._victim_tasks: dict[str, Task] = {}
        self.attacks: dict[int, Attack] = {}
        for k, c in enumerate(configs):
            if c.attack is not None:
                attack = attack_of(c)
                attack.bind(_View(self, k, tasks[k]))
                self.attacks[k] = attack

    def requester_model(self, a: int, requester: str, i: int) -> StateDict | None:
        """What attack node ``a`` gets when it fetches ``requester``'s round-``i`` model on demand
        (mtl_node.attack_node ``_fetch_requester``): nothing without a route (not a neighbour), the
        requester's adapted model, or from an attacker what it serves ``a`` (a pool attacker: two
        requester-model attackers listing each other are refused); None when that is not valid."""
        if requester not in self.configs[a].neighbors or not self.psi:
            return None
        r = self.index[requester]
        honest = row(self.psi, r)
        if r in self.attacks:
            got = self.craft(r, i, self.ids[a], honest)
            return None if isinstance(got, str) else got
        try:
            wire.validate_state(honest, self.manifest)
        except WireError:
            return None
        return honest

    def victim_task(self, agent_id: str) -> Task | None:
        """A private copy of ``agent_id``'s task (omniscient attacks), as the attack node builds it."""
        if agent_id not in self._victim_tasks:
            c = self.configs[self.index[agent_id]]
            self._victim_tasks[agent_id] = make_task(c.task, c.id, c.seed, c.task_params, c.device)
        return self._victim_tasks[agent_id]

    def craft(self, a: int, i: int, requester: str, honest: StateDict) -> StateDict | str:
        """What attack node ``a`` serves ``requester`` in round ``i``, or why nothing valid arrives."""
        attack = self.attacks[a]
        try:
            model = attack.craft(i, requester, honest)
            if not torch_pool.surely_valid(model, self.spec):
                wire.validate_state(model, self.manifest)
        except Withhold:
            return f"unavailable: {self.ids[a]}: round {i}: refused (omission)"
        except WireError as exc:
            return reason_of(exc)
        except Exception:  # the attack node serves its honest model when its attack fails
            log.exception("%s: attack %s failed; serving the honest model", self.ids[a], attack.name)
            return honest
        return model
