"""What every backend that runs real daemons shares: wait until healthy, follow, collect.

The local, docker and ssh backends differ only in how they start and stop agents and how they
tell whether an agent's process (or container) is still there; reaching the agents is the same
gRPC everywhere: health, then ``GetStatus`` polling, then each agent's metrics.jsonl /
decisions.jsonl read back from a results directory on this machine.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mtl_node.channel import SERVICE, create_sync_channel
from mtl_node.core.errors import ConfigError, MTLError
from mtl_node.identity import agent_id as spiffe_agent
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc
from orchestrator.backends.base import Progress, Row, RunContext, RunOutput
from orchestrator.plan import RunPlan
from orchestrator.tls import RunCerts

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
RPC_TIMEOUT_S = 5.0

AliveAgents = Callable[[], set[str]]
"""Returns the agents whose process/container still runs (called once per poll)."""


class DeploymentError(MTLError):
    """The deployment could not start or lost every agent."""


def check_options(backend: str, options: Mapping[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """The ``-o KEY=VALUE`` options of ``backend``; a key it does not know is an error (a typo must
    not be silently ignored). ``processes`` comes from ``--processes`` and is only the local one's."""
    for key in options:
        if key not in allowed and key != "processes":
            valid = ", ".join(allowed) if allowed else "none (this backend takes no -o options)"
            raise ConfigError(f"--option {key}", f"unknown option for backend {backend}", f"valid: {valid}")
    return dict(options)


def int_option(options: Mapping[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = options.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--option {key}", f"{value!r} is not a whole number") from None
    if number < minimum:
        raise ConfigError(f"--option {key}", f"{number} is below {minimum}")
    return number


def agent_channel(agent: str, address: str, certs: RunCerts | None) -> grpc.Channel:
    """A channel to ``agent`` as the operator: mutual TLS checking that it is that agent, or
    plaintext for an ``--insecure`` run."""
    if certs is None:
        return create_sync_channel(address, tls=None)
    return create_sync_channel(
        address, tls=certs.operator, expected_identity=spiffe_agent(agent, certs.trust_domain)
    )


def wait_healthy(
    addresses: Mapping[str, str],
    timeout: float,
    alive: AliveAgents | None = None,
    what: str = "agent",
    certs: RunCerts | None = None,
) -> None:
    """Until every agent's grpc.health.v1 says SERVING for ``mtl.v1.Node``.

    Retries within ``timeout`` (containers and remote hosts import torch before they bind); gives up
    at once on an agent whose process is gone, with ``what`` naming where it ran.
    """
    deadline = time.monotonic() + timeout
    pending = dict(addresses)
    last_error: dict[str, str] = {}
    while pending:
        running = alive() if alive else set(pending)
        for agent_id, address in list(pending.items()):
            if agent_id not in running:
                raise DeploymentError(f"{agent_id}: its {what} exited before serving")
            with agent_channel(agent_id, address, certs) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=SERVICE), timeout=min(RPC_TIMEOUT_S, 2.0)
                    )
                except grpc.RpcError as exc:
                    last_error[agent_id] = f"{exc.code().name}: {exc.details()}"
                    continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                del pending[agent_id]
            else:
                last_error[agent_id] = "NOT_SERVING"
        if pending and time.monotonic() > deadline:
            first = next(iter(pending))
            raise DeploymentError(
                f"{len(pending)} agents not healthy within {timeout:.0f}s "
                f"(e.g. {first} at {pending[first]}: {last_error.get(first, 'no answer')})"
            )
        if pending:
            time.sleep(POLL_INTERVAL_S)


def follow(
    plan: RunPlan,
    ctx: RunContext,
    addresses: Mapping[str, str],
    alive: AliveAgents,
    resolve: Callable[[str], str | None] | None = None,
) -> None:
    """Poll every agent's status until all finished, reporting the normal agents' progress.

    An agent whose process/container is gone (and not restarted) counts as finished and lost (its
    neighbours carry on without it); losing every agent is an error. ``resolve`` gives an agent's
    current address when it may have changed (a restarted container's published port).
    """
    addresses = dict(addresses)
    channels = {a: agent_channel(a, addr, ctx.certs) for a, addr in addresses.items()}
    stubs = {a: pb_grpc.NodeStub(ch) for a, ch in channels.items()}
    normal = set(plan.normal_ids)
    finished: set[str] = set()
    completed: set[str] = set()  # reported done/failed (not merely gone)
    last_round = -1
    try:
        while len(finished) < len(stubs):
            running = alive()
            statuses: list[pb.NodeStatus] = []
            for agent_id, stub in stubs.items():
                if agent_id in finished:
                    continue
                if agent_id not in running:
                    log.warning("%s: its process exited and was not restarted; giving up on it", agent_id)
                    finished.add(agent_id)
                    ctx.lost.add(agent_id)
                    continue
                try:
                    st = stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as exc:
                    log.debug("%s: status: %s", agent_id, exc)
                    moved = resolve(agent_id) if resolve else None
                    if moved and moved != addresses[agent_id]:
                        log.info("%s: now at %s (restarted)", agent_id, moved)
                        channels[agent_id].close()
                        addresses[agent_id] = moved
                        channels[agent_id] = agent_channel(agent_id, moved, ctx.certs)
                        stubs[agent_id] = pb_grpc.NodeStub(channels[agent_id])
                    continue
                if st.state in ("done", "failed"):
                    finished.add(agent_id)
                    completed.add(agent_id)
                if agent_id in normal:
                    statuses.append(st)
            if not running and len(completed) < len(stubs):
                raise DeploymentError("every agent process exited before the run finished")
            if statuses:
                p = progress_of(ctx.rule, plan.rounds, statuses)
                if p.round != last_round:
                    ctx.progress(p)
                    last_round = p.round
            if len(finished) < len(stubs):
                time.sleep(POLL_INTERVAL_S)
    finally:
        for ch in channels.values():
            ch.close()
    ctx.progress(Progress(ctx.rule, plan.rounds, plan.rounds, math.nan, 0, 0, 0))


def progress_of(rule: str, rounds: int, statuses: list[pb.NodeStatus]) -> Progress:
    losses = [s.loss for s in statuses if math.isfinite(s.loss)]
    n = len(statuses)
    return Progress(
        rule=rule,
        round=min(s.round for s in statuses),
        rounds=rounds,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        accepted=sum(s.accepted for s in statuses) / n,
        filtered=sum(s.filtered for s in statuses) / n,
        missing=sum(s.missing for s in statuses) / n,
    )


def collect(plan: RunPlan, ctx: RunContext) -> RunOutput:
    """Read every agent's metrics.jsonl / decisions.jsonl under ``workdir/agents/<id>/`` (what
    survived, even after a crash)."""
    metrics: list[Row] = []
    decisions: list[Row] = []
    for agent in plan.agents:
        directory = ctx.workdir / "agents" / agent.id
        metrics.extend(read_jsonl(directory / "metrics.jsonl"))
        if ctx.record_decisions:
            decisions.extend(read_jsonl(directory / "decisions.jsonl"))
    return RunOutput(metrics, decisions)


def read_jsonl(path: Path) -> list[Row]:
    """Every row of a JSON-lines file. A line that is not a JSON object (torn by a crash, or
    damaged) is reported with its file:line and skipped; the rows after it are kept."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: unreadable row skipped (%s)", path, number, exc.msg)
                continue
            if not isinstance(row, dict):
                log.warning("%s:%d: row is not a JSON object; skipped", path, number)
                continue
            rows.append(row)
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def process_record(pid: int) -> dict[str, Any]:
    """pid, start time and command line of a process we started: ``down`` signals a listed pid
    only if all three still match (a pid may have been reused by an unrelated process)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return {"pid": pid, "create_time": p.create_time(), "cmdline": p.cmdline()}
    except psutil.Error:
        return {"pid": pid, "create_time": None, "cmdline": []}


# A start time is boot time + ticks since boot, and Linux gives the boot time to the second,
# recomputed from the wall clock: two processes reading it can differ by a second (a VM's clock
# being adjusted). A pid reused by a process with the same command line within two seconds is not
# a case to guard against.
START_TIME_TOLERANCE_S = 2.0


def is_same_process(record: Mapping[str, Any]) -> bool:
    """Whether the process ``record`` (process_record) describes is still running as that
    process: same pid, same start time, same command line, not a zombie."""
    import psutil

    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("create_time") is None:
        return False
    try:
        p = psutil.Process(pid)
        return (
            abs(p.create_time() - float(record["create_time"])) < START_TIME_TOLERANCE_S
            and p.cmdline() == list(record.get("cmdline", []))
            and p.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


RESULT_FILES = ("metrics.jsonl", "decisions.jsonl")


def extract_results(data: bytes, workdir: Path, agents: Sequence[str], prefix: str = "") -> None:
    """Unpack a tar stream of ``<prefix><...>/<id>/{metrics,decisions}.jsonl`` (from a remote host
    or a Pod) into ``workdir/agents/<id>/``: only those files, only as plain files (tarfile's
    "data" filter). ``prefix`` is prepended to member names (a Pod's tar is relative to
    /results, i.e. has no ``agents/``)."""
    if not data:
        return
    allowed = {f"agents/{a}/{f}" for a in agents for f in RESULT_FILES}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = []
        for m in tar.getmembers():
            if m.isfile() and prefix + m.name in allowed:
                m.name = prefix + m.name
                members.append(m)
        tar.extractall(workdir, members=members, filter="data")
