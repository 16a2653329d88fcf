"""The Byzantine side of an agent: what its attack sees, and how its answer to a request is served.

An attack node runs the normal round loop (mtl_node.agent) with the rule ``none``, so it keeps an
honest-looking model to craft from, and fetches its neighbours' models like any agent. This module
holds what only an attack node needs: the neighbour models of the last few rounds, requester models
fetched while serving (for attacks that craft against the requester), and the crafting itself, whose
``Withhold`` answer becomes a missing neighbour on the requester's side.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from mtl_node import wire
from mtl_node.attack_api import Attack, AttackView, Withhold
from mtl_node.core.errors import FetchError, WireError
from mtl_node.tasks import Task, make_task
from mtl_node.wire import StateDict

if TYPE_CHECKING:
    from mtl_node.agent import Agent

log = logging.getLogger(__name__)

# Rounds of fetched neighbour models (and on-demand requester models) kept for crafting.
KEEP_FETCHED_ROUNDS = 4


class AttackSide:
    """The attack of one agent, bound to a view of that agent (``AgentView``)."""

    def __init__(self, agent: Agent, attack: Attack, compute: Callable[..., Awaitable[Any]]) -> None:
        self.agent = agent
        self.attack = attack
        # ``compute(fn, *args)``: the agent's way to run task code (inline or in a worker thread).
        self._compute = compute
        # Valid neighbour models by round (crash-only state: mtl_node/state.py keeps them).
        self.fetched_rounds: OrderedDict[int, dict[str, StateDict]] = OrderedDict()
        self.requester_models: dict[tuple[str, int], StateDict] = {}
        self._requester_fetching: set[tuple[str, int]] = set()
        self._craft_failed = False
        self._victim_tasks: dict[str, Task | None] = {}
        attack.bind(AgentView(self))

    def victim_task(self, agent_id: str) -> Task | None:
        """A private copy of ``agent_id``'s task, built from its config when it lives in this process
        (the in-process engine): the same data, deterministic in (seed, agent, round), and no state
        shared with the victim's own task object. None over the network."""
        if agent_id not in self._victim_tasks:
            cfg = self.agent.transport.local_config(agent_id)
            self._victim_tasks[agent_id] = (
                None if cfg is None else make_task(cfg.task, cfg.id, cfg.seed, cfg.task_params, cfg.device)
            )
        return self._victim_tasks[agent_id]

    async def craft(self, round_: int, requester: str, honest: StateDict, deadline: float) -> StateDict:
        """The attack's model for this request; Withhold becomes a FetchError (missing neighbour).

        Any other failure of the attack serves the honest model: an attack node must keep serving.
        """
        attack = self.attack
        agent_id = self.agent.id
        loop = asyncio.get_running_loop()
        if attack.needs_requester_model:
            await self._fetch_requester(requester, round_, deadline)
        try:
            crafted: StateDict = await self._compute(attack.craft, round_, requester, honest)
            return crafted
        except Withhold as withhold:
            if withhold.hang:
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                raise FetchError(f"{agent_id}: round {round_}: no answer (omission)", "timeout") from None
            raise FetchError(f"{agent_id}: round {round_}: refused (omission)", "unavailable") from None
        except Exception:
            if not self._craft_failed:
                log.exception("%s: attack %s failed; serving the honest model", agent_id, attack.name)
                self._craft_failed = True
            return honest

    async def _fetch_requester(self, requester: str, round_: int, deadline: float) -> None:
        """Fetch the requester's own round model for the attack (view.model_of), if it is a neighbour.

        A normal requester published the round before asking us, so this returns at once. Two attack
        nodes needing each other's model would fetch from each other for ever: a request from an
        agent we are already fetching that round from is served without its model.
        """
        agent = self.agent
        key = (requester, round_)
        if key in self.requester_models or key in self._requester_fetching:
            return
        if requester not in agent.neighbors:
            return  # no route to it over gRPC; in one process too, so both paths agree
        timeout = min(agent.config.fetch_timeout, deadline - asyncio.get_running_loop().time() - 0.05)
        if timeout <= 0:
            return
        self._requester_fetching.add(key)
        try:
            state = await agent.transport.fetch(requester, round_, agent.id, timeout)
            wire.validate_state(state, agent.manifest)
        except (FetchError, WireError) as exc:
            log.debug("%s: round %d: no model of requester %s: %s", agent.id, round_, requester, exc)
            return
        finally:
            self._requester_fetching.discard(key)
        self.requester_models[key] = state
        oldest = round_ - KEEP_FETCHED_ROUNDS
        for old in [k for k in self.requester_models if k[1] <= oldest]:
            del self.requester_models[old]

    def keep_fetched(self, i: int, fetched: Mapping[str, StateDict | Exception]) -> None:
        self.fetched_rounds[i] = {n: m for n, m in fetched.items() if isinstance(m, dict)}
        while len(self.fetched_rounds) > KEEP_FETCHED_ROUNDS:
            self.fetched_rounds.popitem(last=False)


class AgentView(AttackView):
    """What an attack node shows its attack (mtl_node.attack_api): its own task and models, the
    neighbour models of its complete fetches, and requester models fetched while serving."""

    def __init__(self, side: AttackSide) -> None:
        self.side = side

    @property
    def task(self) -> Task:
        return self.side.agent.task

    def neighbors(self, round_: int) -> Mapping[str, StateDict]:
        return self.side.fetched_rounds.get(round_, {})

    def model_of(self, agent_id: str, round_: int) -> StateDict | None:
        return self.side.requester_models.get((agent_id, round_))

    def victim_task(self, agent_id: str) -> Task | None:
        return self.side.victim_task(agent_id)

    def own(self, round_: int) -> StateDict | None:
        store = self.side.agent.store
        latest = store.latest_round
        for r in range(max(round_, 1, latest - store.keep + 1), latest + 1):
            published = store.get(r)
            if published is not None:
                return published.state
        return None
