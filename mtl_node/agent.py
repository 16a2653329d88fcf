"""The round loop of one agent (DESIGN §1 and §3), independent of how models travel.

Each round i: adapt (psi = local step from theta), publish psi as round i, fetch every neighbour's
round-i model concurrently with a deadline, score them on our own data, let the rule filter and
weigh, combine. A neighbour that fails, times out or sends an invalid model is left out of that
round and counted; it is never fatal. Publishing before fetching means neighbours never wait on
each other in a cycle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mtl_node import state as agent_state
from mtl_node import wire
from mtl_node.aggregation import Aggregation, Candidate, NeighborDecision, Rule, make_rule
from mtl_node.attack_api import attack_of
from mtl_node.attack_node import AttackSide
from mtl_node.combine import flatten, squared_distance, unflatten, weighted_sum
from mtl_node.config import NodeConfig
from mtl_node.core.errors import FetchError, WireError
from mtl_node.liveness import LoopWatch, NeighbourLiveness
from mtl_node.metrics import AgentObserver
from mtl_node.recorder import MemoryRecorder, Recorder, RoundRecord
from mtl_node.store import ModelStore
from mtl_node.tasks import Metrics, Task, make_task
from mtl_node.transport import Transport
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)
T = TypeVar("T")

# Models above this size are adapted/scored in a worker thread so the event loop keeps serving.
OFFLOAD_BYTES = 1 << 20
# A task call that holds the event loop longer than this moves every later call of the agent to a
# worker thread: health, status and GetModel must be answered during a round, however costly the
# task (a CNN's local step takes ~0.1 s; target localization's takes microseconds and stays inline,
# where a thread hop would cost more than the call).
INLINE_BUDGET_S = 0.02


@dataclass
class AgentStatus:
    """What GetStatus/WatchStatus report; replaced (not mutated) after every round."""

    agent_id: str
    role: str
    rule: str
    rounds_total: int
    round: int = 0
    state: str = "starting"
    metrics: Metrics | None = None
    accepted: int = 0
    filtered: int = 0
    missing: int = 0
    decisions: tuple[NeighborDecision, ...] = field(default_factory=tuple)


class Agent:
    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        recorder: Recorder | None = None,
        task: Task | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self.neighbors: list[str] = list(config.neighbors)
        self.transport = transport
        self.recorder = recorder or MemoryRecorder()
        self.task = task or make_task(config.task, config.id, config.seed, config.task_params, config.device)
        # A Byzantine agent learns alone to keep an honest-looking model to craft from.
        self.rule: Rule = make_rule("none" if config.attack else config.rule, config.rule_params)
        attack = attack_of(config) if config.attack else None
        self.store = ModelStore(config.id, keep=config.keep_rounds)
        self.theta: StateDict = self.task.init_model()
        self.manifest = wire.manifest_of(self.theta)
        transport.expect(self.manifest)
        self.status = AgentStatus(config.id, config.role, config.rule, config.rounds)
        self._status_changed = asyncio.Event()
        self.last_fetched: dict[str, StateDict | Exception] = {}
        self._offload = self.manifest.data_bytes > OFFLOAD_BYTES
        # One task call at a time per agent, as when every call ran inline: an attack crafting
        # while the round's adapt runs in a thread must not share the task's module with it.
        self._compute_lock = asyncio.Lock()
        # Byzantine agents fetch too (and discard): it keeps them in step with their victims and
        # gives attacks the neighbours' honest models. Non-cooperative agents need nothing.
        self.fetches = attack is not None or self.rule.name != "none"
        self._last_failure: dict[str, str] = {}
        self.liveness = NeighbourLiveness(config.id, transport.latest_round, config.fetch_timeout)
        self.loop_watch = LoopWatch()
        # Metrics hooks (mtl_node.metrics); the daemon swaps in a Prometheus one.
        self.observer = AgentObserver()
        self.done = asyncio.Event()
        # Byzantine: the attack, what it sees and how its answers are served (mtl_node.attack_node).
        self.byzantine = AttackSide(self, attack, self._compute) if attack is not None else None
        # Crash-only (mtl_node/state.py): continue after the last round whose state is on disk.
        self.state_dir = config.state_path
        self.fingerprint = agent_state.fingerprint(config, self.manifest)
        self.start_round = 0
        self.schedule = agent_state.WriteSchedule(
            config.state_every, config.rounds, self.store.keep, every_round=self.byzantine is not None
        )
        saved = agent_state.load(self.state_dir, self.fingerprint, config.device) if self.state_dir else None
        if saved is not None:
            self.restore(saved)
        else:
            self.store.publish(0, self.theta)
        self.recorder.resume(self.start_round)

    # -- crash-only state -----------------------------------------------------------------------

    def snapshot(self, i: int) -> agent_state.AgentState:
        """Everything needed to continue after round ``i`` exactly (see mtl_node/state.py)."""
        # Published rounds back to where a neighbour restarted from its own (older) state may ask:
        # the state interval plus a few rounds, within what the store keeps anyway.
        window = min(self.store.keep, self.schedule.interval() + self.config.keep_rounds + 2)
        published = {}
        for r in range(max(1, i - window + 1), i + 1):
            p = self.store.get(r)
            if p is not None:
                published[r] = p.state
        task_meta, task_tensors = self.task.state()
        byz = self.byzantine
        attack_meta, attack_tensors = byz.attack.state() if byz is not None else ({}, {})
        return agent_state.AgentState(
            round=i,
            fingerprint=self.fingerprint,
            theta=self.theta,
            published=published,
            fetched=dict(byz.fetched_rounds) if byz is not None else {},
            rule=self.rule.state(),
            task=task_meta,
            task_tensors=task_tensors,
            attack=attack_meta,
            attack_tensors=attack_tensors,
        )

    def restore(self, saved: agent_state.AgentState) -> None:
        self.theta = saved.theta
        for r in sorted(saved.published):
            self.store.publish(r, saved.published[r])
        self.rule.load_state(saved.rule)
        self.task.load_state(saved.task, saved.task_tensors)
        if self.byzantine is not None:
            self.byzantine.fetched_rounds.update(sorted(saved.fetched.items()))
            self.byzantine.attack.load_state(saved.attack, saved.attack_tensors)
        self.start_round = self.schedule.last_round = saved.round
        self.status = _replace(self.status, round=saved.round)
        log.info("%s: resumed after round %d from %s", self.id, saved.round, self.state_dir)

    async def _save_state(self, i: int) -> None:
        if self.state_dir is None or not self.schedule.due(i):
            return
        started = time.perf_counter()
        snap = self.snapshot(i)
        self.recorder.sync()  # rows up to i durable before the state that says "after round i"
        await self._compute(agent_state.write, self.state_dir, snap, self.id)
        self.schedule.written(i, started)

    # -- what the server side asks --------------------------------------------------------------

    async def model_for(self, round_: int, requester: str, timeout: float) -> StateDict:
        """The model served for ``round_`` to ``requester``: published, or crafted if Byzantine."""
        deadline = asyncio.get_running_loop().time() + timeout
        published = await self.store.wait_for(round_, timeout)
        if self.byzantine is None:
            return published.state
        return await self.byzantine.craft(published.round, requester, published.state, deadline)

    async def payload_for(self, round_: int, requester: str, timeout: float) -> tuple[int, bytes, str]:
        """(round, safetensors bytes, digest) served for ``round_``; honest payloads are cached."""
        deadline = asyncio.get_running_loop().time() + timeout
        published = await self.store.wait_for(round_, timeout)
        if self.byzantine is None:
            payload, digest = await self._compute(published.payload, exclusive=False)
            return published.round, payload, digest
        crafted = await self.byzantine.craft(published.round, requester, published.state, deadline)
        payload = await self._compute(wire.encode, crafted, exclusive=False)
        return published.round, payload, wire.digest(payload)

    async def wait_status_change(self) -> None:
        await self._status_changed.wait()

    def _set_status(self, status: AgentStatus) -> None:
        self.status = status
        self._status_changed.set()
        self._status_changed = asyncio.Event()

    # -- the round loop -------------------------------------------------------------------------

    async def run(self) -> None:
        self._set_status(_replace(self.status, state="running"))
        self.observer.started("resume" if self.start_round > 0 else "start")
        self.loop_watch.on_stall = lambda: self.observer.paused()
        self.loop_watch.start()
        try:
            for i in range(self.start_round + 1, self.config.rounds + 1):
                await self.run_round(i)
        except Exception:
            self._set_status(_replace(self.status, state="failed"))
            raise
        finally:
            self.recorder.close()
            await self.liveness.close()
            await self.loop_watch.close()
        self._set_status(_replace(self.status, state="done"))
        self.done.set()

    async def _compute(self, fn: Callable[..., T], *args: Any, exclusive: bool = True) -> T:
        """``fn(*args)``: inline while it is cheap, else in a worker thread (INLINE_BUDGET_S).

        ``exclusive=False`` for work that touches no task state (encoding a payload), which may
        then run alongside the round's own computation.
        """
        if self._offload:
            if not exclusive:
                return await asyncio.to_thread(fn, *args)
            async with self._compute_lock:
                return await asyncio.to_thread(fn, *args)
        started = time.perf_counter()
        result = fn(*args)
        if time.perf_counter() - started > INLINE_BUDGET_S:
            log.debug("%s: %s took over %.3fs; in a thread from now on", self.id, fn, INLINE_BUDGET_S)
            self._offload = True
        return result

    async def run_round(self, i: int) -> None:
        # A fair turn for the event loop every round: an agent that fetches nothing (rule none,
        # no neighbours) would otherwise never await, and its server, its signal handlers and the
        # other agents of a serve-many process would wait for its last round.
        await asyncio.sleep(0)
        started = time.perf_counter()
        theta_prev = self.theta
        psi = await self._compute(self.task.adapt, theta_prev, i)
        self.store.publish(i, psi)

        fetched = await self._fetch_all(i) if self.fetches else {}
        if self.byzantine is None and self.rule.name != "none":
            candidates, models = await self._candidates(i, psi, theta_prev, fetched)
        else:
            # Non-cooperative (or Byzantine): nothing to score; neighbours show as filtered.
            self.last_fetched = fetched
            if self.byzantine is not None:
                self.byzantine.keep_fetched(i, fetched)
            candidates = [Candidate(a) for a in [self.id, *self.neighbors]]
            models = {self.id: psi}
        agg: Aggregation = self.rule.aggregate(candidates)
        if agg.combined is not None:
            self.theta = await self._compute(unflatten, agg.combined, psi)
        else:
            self.theta = await self._compute(weighted_sum, models, agg.weights)
        metrics = await self._compute(self.task.evaluate, self.theta, i)

        record = RoundRecord(
            agent=self.id,
            round=i,
            role=self.config.role,
            rule=self.config.rule,
            metrics=metrics,
            accepted=agg.count("accepted"),
            filtered=agg.count("filtered"),
            missing=agg.count("missing"),
            decisions=tuple(agg.decisions),
            seconds=time.perf_counter() - started,
        )
        self.recorder.record(record, self.theta)
        self.observer.round_done(record)
        self.observer.suspects(len(self.liveness.suspects))
        await self._save_state(i)
        self._set_status(
            AgentStatus(
                self.id,
                self.config.role,
                self.config.rule,
                self.config.rounds,
                round=i,
                state="running",
                metrics=metrics,
                accepted=record.accepted,
                filtered=record.filtered,
                missing=record.missing,
                decisions=tuple(record.decisions),
            )
        )

    async def _fetch_all(self, i: int) -> dict[str, StateDict | Exception]:
        self.liveness.round = i
        results = await asyncio.gather(*(self._fetch_one(n, i) for n in self.neighbors))
        return dict(zip(self.neighbors, results, strict=True))

    async def _fetch_one(self, neighbor: str, i: int) -> StateDict | Exception:
        # Until a neighbour has answered once, wait for it to come up (startup barrier).
        # Round 1 is the startup barrier: neighbours may still be starting, so wait longer for
        # them. Afterwards every fetch has the normal deadline, so a neighbour that never answers
        # (dead from the start, or an attacker that hangs) costs at most fetch_timeout a round.
        timeout = self.config.startup_timeout if i == 1 else self.config.fetch_timeout
        skipped = self.liveness.skip(neighbor, i)
        if skipped is not None:
            log.debug("%s: round %d: left out %s: %s", self.id, i, neighbor, skipped)
            self.observer.fetched(neighbor, "skipped", 0.0)
            return skipped
        started = asyncio.get_running_loop().time()
        try:
            try:
                state = await self.transport.fetch(neighbor, i, self.id, timeout)
            except FetchError as exc:
                # Our own deadline ran out while this process was stopped: that says nothing
                # about the neighbour, so ask again with a fresh deadline.
                if exc.reason != "timeout" or not self.loop_watch.paused_since(started):
                    raise
                log.info("%s: round %d: was paused; asking %s again", self.id, i, neighbor)
                state = await self.transport.fetch(neighbor, i, self.id, self.config.fetch_timeout)
            wire.validate_state(state, self.manifest)
        except (FetchError, WireError) as exc:
            if isinstance(exc, FetchError) and exc.reason == "timeout":
                self.liveness.timed_out(neighbor, i, str(exc))
            # Warn when a neighbour starts failing (or fails differently), not every round.
            reason = getattr(exc, "reason", "error")
            level = logging.DEBUG if self._last_failure.get(neighbor) == reason else logging.WARNING
            log.log(level, "%s: round %d: left out %s: %s", self.id, i, neighbor, exc)
            self._last_failure[neighbor] = reason
            self.observer.fetched(neighbor, reason, asyncio.get_running_loop().time() - started)
            return exc
        self.observer.fetched(neighbor, "ok", asyncio.get_running_loop().time() - started)
        self.liveness.answered(neighbor)
        if self._last_failure.pop(neighbor, None):
            log.info("%s: round %d: %s is back", self.id, i, neighbor)
        return state

    async def _candidates(
        self,
        i: int,
        psi: StateDict,
        theta_prev: StateDict,
        fetched: dict[str, StateDict | Exception],
    ) -> tuple[list[Candidate], dict[str, StateDict]]:
        models: dict[str, StateDict] = {self.id: psi}
        missing: dict[str, str] = {}
        for n in self.neighbors:
            got = fetched.get(n)
            if isinstance(got, dict):
                models[n] = got
            elif isinstance(got, Exception):
                missing[n] = _reason(got)
            else:
                missing[n] = "not fetched"
        present = list(models)
        losses: dict[str, float] = {}
        if self.rule.needs_loss:
            values = await self._compute(self.task.losses, [models[a] for a in present], i)
            losses = dict(zip(present, values, strict=True))
        distances: dict[str, float] = {}
        if self.rule.needs_distance:
            distances = {a: squared_distance(theta_prev, models[a]) for a in present}
        vectors = {a: flatten(models[a]) for a in present} if self.rule.needs_models else {}
        candidates = [
            Candidate(a, losses.get(a), distances.get(a), model=vectors.get(a))
            if a in models
            else Candidate(a, missing_reason=missing[a])
            for a in [self.id, *self.neighbors]
        ]
        return candidates, models


def _reason(exc: Exception) -> str:
    tag = getattr(exc, "reason", "error")
    return f"{tag}: {exc}"


def _replace(status: AgentStatus, **changes: Any) -> AgentStatus:
    return dataclasses.replace(status, **changes)
