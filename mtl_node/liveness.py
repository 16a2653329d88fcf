"""Neighbour liveness: a stalled neighbour costs one fetch deadline in total, not one per round.

The round loop asks ``skip(neighbor, round)`` before fetching. A neighbour whose fetch timed out
becomes a *suspect*: later rounds leave it out at once (missing, reason ``timeout``) while a
background probe asks it for its latest published round (GetInfo, with its own short deadline).
It is taken back as soon as it answers: then it is fetched with the normal deadline again, so a
neighbour that is merely behind (resumed after SIGSTOP, or slowed by a stall of its own) is waited
for and the network stays in step instead of running on without it. One that times out again soon
after being taken back (an attacker that hangs on purpose, or a neighbour too slow to keep up) is
held off for twice as many rounds each time: hanging costs O(log rounds) deadlines, not one a round.

Only timeouts make suspects: a refused connection is waited for within the deadline by the
transport (a neighbour restarted within it changes nothing), and a fast failure (refused round,
invalid model) costs nothing to retry.

``LoopWatch`` notices when this process itself was paused (SIGSTOP/SIGCONT, a VM freeze): its
deadlines expired while it was not running, which says nothing about its neighbours, so the
round loop asks again instead of leaving them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mtl_node.core.errors import FetchError

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 2.0
MAX_HOLD_ROUNDS = 64
# The event loop ticks every TICK_S; a gap longer than STALL_S means this process did not run.
TICK_S = 0.1
STALL_S = 1.5

Probe = Callable[[str, float], Awaitable[int]]
"""Returns the latest round ``neighbor`` has published; raises on no answer within the timeout."""


@dataclass
class _Suspect:
    since_round: int
    reason: str
    hold_until: int
    task: asyncio.Task[None] | None = None


class NeighbourLiveness:
    def __init__(self, agent_id: str, probe: Probe, fetch_timeout: float) -> None:
        self.agent_id = agent_id
        self.probe = probe
        self.fetch_timeout = fetch_timeout
        self.round = 0  # the round the agent is fetching (set by the round loop)
        self._suspects: dict[str, _Suspect] = {}
        self._strikes: dict[str, int] = {}
        self.taken_back = 0  # counters for metrics and tests
        self.skipped = 0

    @property
    def suspects(self) -> set[str]:
        return set(self._suspects)

    def skip(self, neighbor: str, round_: int) -> FetchError | None:
        """The error to record instead of fetching ``neighbor`` this round, or None to fetch it."""
        suspect = self._suspects.get(neighbor)
        if suspect is None:
            return None
        self.skipped += 1
        return FetchError(
            f"{neighbor}: not waited for since round {suspect.since_round} ({suspect.reason}); "
            "probing it in the background",
            reason="timeout",
        )

    def timed_out(self, neighbor: str, round_: int, reason: str) -> None:
        """``neighbor``'s fetch of ``round_`` ran out its deadline: skip it until it answers."""
        if neighbor in self._suspects:
            return
        strikes = self._strikes.get(neighbor, 0)
        self._strikes[neighbor] = strikes + 1
        hold = 0 if strikes == 0 else min(MAX_HOLD_ROUNDS, 2**strikes)
        suspect = _Suspect(round_, reason, round_ + hold)
        self._suspects[neighbor] = suspect
        suspect.task = asyncio.create_task(self._watch(neighbor, suspect), name=f"probe-{neighbor}")
        log.info(
            "%s: round %d: %s timed out; not waiting for it again until it answers (hold %d rounds)",
            self.agent_id,
            round_,
            neighbor,
            hold,
        )

    def answered(self, neighbor: str) -> None:
        """A fetch from ``neighbor`` succeeded: it is in good standing again."""
        self._strikes.pop(neighbor, None)

    async def _watch(self, neighbor: str, suspect: _Suspect) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(PROBE_INTERVAL_S)
            first = False
            if self.round < suspect.hold_until:
                continue
            try:
                published = await self.probe(neighbor, min(PROBE_TIMEOUT_S, self.fetch_timeout))
            except Exception as exc:  # no answer: keep probing
                log.debug("%s: probe of %s: %s", self.agent_id, neighbor, exc)
                continue
            break
        del self._suspects[neighbor]
        self.taken_back += 1
        log.info("%s: %s answers again (published round %d)", self.agent_id, neighbor, published)

    async def close(self) -> None:
        tasks = [s.task for s in self._suspects.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class LoopWatch:
    """Ticks on the event loop to tell whether this process stopped running for a while."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._last_tick = 0.0
        self._last_stall_end = -1.0
        self.stalls = 0
        self.on_stall: Callable[[], None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_tick = loop.time()
        self._task = asyncio.create_task(self._tick(), name="loop-watch")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if now - self._last_tick > STALL_S:
                self.stalls += 1
                self._last_stall_end = now
                log.warning("this process did not run for %.1fs (paused?)", now - self._last_tick)
                if self.on_stall is not None:
                    self.on_stall()
            self._last_tick = now

    def paused_since(self, started: float) -> bool:
        """Whether the process stopped running at some point after loop time ``started`` (a
        stall seen by the ticker, or one so recent that the ticker has not run since)."""
        if self._task is None:
            return False
        now = asyncio.get_running_loop().time()
        return self._last_stall_end >= started or now - self._last_tick > STALL_S

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
