"""Prometheus metrics of the agents of one process (``--metrics-listen HOST:PORT``).

One registry and one HTTP endpoint per process: ``serve`` exports its agent, ``serve-many`` all
of its agents, each series carrying an ``agent`` label. Names are in the ``mtl_`` namespace. Label
values come from bounded sets only: agent ids of this process, the configured neighbours (anything
else is ``other``), outcome and reason tags of mtl_node.core.errors, decision names; never a round.

The round loop and the server call an ``AgentObserver``: the base class does nothing (the
in-process engine and tests pay nothing), ``PrometheusMetrics.agent`` returns one that counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mtl_node.config import parse_hostport

if TYPE_CHECKING:
    from mtl_node.recorder import RoundRecord

log = logging.getLogger(__name__)

NAMESPACE = "mtl"
OTHER = "other"
ROUND_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FETCH_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = frozenset(
    {
        "ok",
        "timeout",
        "unavailable",
        "expired",
        "oversized",
        "truncated",
        "digest",
        "manifest",
        "non-finite",
        "format",
        "invalid",
        "skipped",
        "error",
    }
)


class AgentObserver:
    """What the round loop and the server report; the base class ignores it all."""

    def round_done(self, record: RoundRecord) -> None:
        pass

    def fetched(self, neighbor: str, outcome: str, seconds: float) -> None:
        pass

    def received(self, nbytes: int) -> None:
        pass

    def served(self, nbytes: int) -> None:
        pass

    def started(self, kind: str) -> None:
        """The agent started: ``start`` (round 1) or ``resume`` (from saved state)."""

    def rejected(self, method: str, code: str) -> None:
        """A server limit refused a call (mtl_node.limits)."""

    def suspects(self, count: int) -> None:
        pass

    def paused(self) -> None:
        pass


class PrometheusMetrics:
    """The process's registry: standard process/platform/GC collectors plus the agents' metrics."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        kw: dict[str, Any] = {"namespace": NAMESPACE, "registry": r}
        agent = ["agent"]
        self.rounds = Counter("rounds_completed", "Rounds this agent completed", agent, **kw)
        self.round = Gauge("round", "The last round this agent completed", agent, **kw)
        self.round_seconds = Histogram(
            "round_duration_seconds",
            "Wall time of one round (adapt, fetch, score, combine, evaluate)",
            agent,
            buckets=ROUND_BUCKETS,
            **kw,
        )
        self.fetch_seconds = Histogram(
            "fetch_duration_seconds",
            "Time to fetch and validate one neighbour's model, by outcome",
            ["agent", "outcome"],
            buckets=FETCH_BUCKETS,
            **kw,
        )
        self.fetches = Counter(
            "fetches",
            "Neighbour model fetches by outcome (ok, or the reason it was left out)",
            ["agent", "neighbor", "outcome"],
            **kw,
        )
        self.received_bytes = Counter("received_bytes", "Model payload bytes received", agent, **kw)
        self.served_bytes = Counter("served_bytes", "Model payload bytes served", agent, **kw)
        self.round_neighbors = Gauge(
            "round_neighbors",
            "Neighbours by decision, last round",
            ["agent", "decision"],
            **kw,
        )
        self.decisions = Counter(
            "neighbor_decisions", "Neighbour decisions over all rounds", ["agent", "decision"], **kw
        )
        self.loss = Gauge("loss", "Training loss after the last round", agent, **kw)
        self.test_loss = Gauge("test_loss", "Test loss at the last evaluation", agent, **kw)
        self.test_accuracy = Gauge("test_accuracy", "Test accuracy at the last evaluation", agent, **kw)
        self.attack_success = Gauge(
            "attack_success", "Backdoor trigger's attack success rate at the last evaluation", agent, **kw
        )
        self.starts = Counter("agent_starts", "Agent starts: kind=start or resume", ["agent", "kind"], **kw)
        self.rejected = Counter(
            "rpc_rejected", "Calls refused by a server limit", ["agent", "method", "code"], **kw
        )
        self.suspects = Gauge("suspect_neighbors", "Neighbours skipped until probed back", agent, **kw)
        self.pauses = Counter("process_pauses", "Times the process was stopped", agent, **kw)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def agent(self, agent_id: str, neighbors: Iterable[str]) -> AgentObserver:
        return _PrometheusAgent(self, agent_id, frozenset(neighbors))

    def serve(self, address: str) -> int:
        """Export on ``address`` (HOST:PORT, port 0 = any free) from a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        host, port = parse_hostport(address, "metrics_listen")
        host = host.strip("[]")
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _PrometheusAgent(AgentObserver):
    def __init__(self, metrics: PrometheusMetrics, agent_id: str, neighbors: frozenset[str]) -> None:
        self.m = metrics
        self.id = agent_id
        self.neighbors = neighbors
        self._rounds = metrics.rounds.labels(agent_id)
        self._round = metrics.round.labels(agent_id)
        self._round_seconds = metrics.round_seconds.labels(agent_id)
        self._received = metrics.received_bytes.labels(agent_id)
        self._served = metrics.served_bytes.labels(agent_id)
        for decision in ("accepted", "filtered", "missing"):
            metrics.round_neighbors.labels(agent_id, decision).set(0)
            metrics.decisions.labels(agent_id, decision)
        self._rounds.inc(0)

    def round_done(self, record: RoundRecord) -> None:
        m = self.m
        self._rounds.inc()
        self._round.set(record.round)
        self._round_seconds.observe(record.seconds)
        for decision, count in (
            ("accepted", record.accepted),
            ("filtered", record.filtered),
            ("missing", record.missing),
        ):
            m.round_neighbors.labels(self.id, decision).set(count)
            m.decisions.labels(self.id, decision).inc(count)
        metrics = record.metrics
        if metrics.loss is not None:
            m.loss.labels(self.id).set(metrics.loss)
        if metrics.test_loss is not None:
            m.test_loss.labels(self.id).set(metrics.test_loss)
        if metrics.test_accuracy is not None:
            m.test_accuracy.labels(self.id).set(metrics.test_accuracy)
        if metrics.attack_success is not None:
            m.attack_success.labels(self.id).set(metrics.attack_success)

    def fetched(self, neighbor: str, outcome: str, seconds: float) -> None:
        outcome = outcome if outcome in OUTCOMES else "error"
        neighbor = neighbor if neighbor in self.neighbors else OTHER
        self.m.fetches.labels(self.id, neighbor, outcome).inc()
        self.m.fetch_seconds.labels(self.id, outcome).observe(seconds)

    def received(self, nbytes: int) -> None:
        self._received.inc(nbytes)

    def served(self, nbytes: int) -> None:
        self._served.inc(nbytes)

    def started(self, kind: str) -> None:
        self.m.starts.labels(self.id, kind if kind in ("start", "resume") else OTHER).inc()

    def rejected(self, method: str, code: str) -> None:
        self.m.rejected.labels(self.id, method, code).inc()

    def suspects(self, count: int) -> None:
        self.m.suspects.labels(self.id).set(count)

    def paused(self) -> None:
        self.m.pauses.labels(self.id).inc()
