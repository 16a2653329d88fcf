"""An agent's per-round state on disk: everything needed to continue a run exactly after a crash.

Layout (DESIGN §5 "Crash-only"; docs/design.md "State directory"): one file,
``<state_dir>/state.safetensors``, replaced atomically after a round (temp file, fsync, rename,
fsync of the directory), so a reader sees either the previous complete round or the new one, never
a mix. Tensors are stored with safetensors; everything else is JSON in the file's metadata (no
pickle anywhere):

- ``theta/<name>``: the combined model after the round;
- ``published/<round>/<name>``: the last ``keep_rounds`` models the agent published (what
  neighbours that are a round or two behind may still ask for);
- ``fetched/<round>/<neighbour>/<name>``: attack nodes only, the neighbour models their attacks
  craft from;
- ``task/<key>``, ``attack/<key>``: tensors of the task's / attack's own state (optimizer moments);
- metadata ``mtl_state``: JSON with the version, the round, the fingerprint and the JSON parts of the
  rule, task and attack state (the rule's EMA per neighbour, step counters...).

Random streams need no position of their own: every draw comes from a generator keyed by (seed,
agent, purpose, round or batch counter) (mtl_node.seeding), so the round counter *is* the position
of every stream, and re-running round R+1 draws exactly what the interrupted run drew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mtl_node.core.errors import ConfigError
from mtl_node.wire import Manifest, StateDict

if TYPE_CHECKING:
    from mtl_node.config import NodeConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.safetensors"
META_KEY = "mtl_state"
# Test hook (inert unless set): "MARKER_DIR:AGENT:ROUND" makes the writer SIGKILL its own process
# between writing the temp file and renaming it, at its first state write of a round >= ROUND, once
# (a marker file in MARKER_DIR remembers it; tests/integration/test_crash.py).
CRASH_HOOK_ENV = "MTL_TEST_CRASH_IN_STATE_WRITE"
# state_every unset ("auto"): write the state once the time since the last write is this many times
# what the last write took (bounding its share of the run to about 1/(1+AUTO_STATE_FACTOR)), at
# most AUTO_STATE_MAX_ROUNDS and keep-2 rounds apart (so the neighbours still keep every round a
# resumed agent re-runs). docs/performance.md has the measurements behind it.
AUTO_STATE_FACTOR = 10.0
AUTO_STATE_MAX_ROUNDS = 50


@dataclass
class AgentState:
    """What one round leaves behind; ``Agent.snapshot()`` builds it, ``Agent.restore()`` reads it."""

    round: int
    fingerprint: dict[str, Any]
    theta: StateDict
    published: dict[int, StateDict] = field(default_factory=dict)
    fetched: dict[int, dict[str, StateDict]] = field(default_factory=dict)
    rule: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    task_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    attack: dict[str, Any] = field(default_factory=dict)
    attack_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def fingerprint(config: NodeConfig, manifest: Manifest) -> dict[str, Any]:
    """What must match for a state to be loadable by ``config``: same agent, task, neighbourhood,
    seed, rule, attack and model layout. (The number of rounds may grow; addresses may change.)"""

    def digest(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    return {
        "agent": config.id,
        "task": config.task,
        "task_params": digest(config.task_params),
        "seed": config.seed,
        "neighbors": sorted(config.neighbors),
        "rule": config.rule,
        "rule_params": digest(config.rule_params.model_dump()),
        "attack": config.attack,
        "attack_params": digest(config.attack_params),
        "model": digest([[t.name, t.dtype, list(t.shape)] for t in manifest.tensors]),
    }


# -- writing ------------------------------------------------------------------------------------


def encode(state: AgentState) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if ident in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(ident)
        tensors[key] = t

    for name, t in state.theta.items():
        put(f"theta/{name}", t)
    for r, model in state.published.items():
        for name, t in model.items():
            put(f"published/{r}/{name}", t)
    for r, models in state.fetched.items():
        for neighbor, model in models.items():
            for name, t in model.items():
                put(f"fetched/{r}/{neighbor}/{name}", t)
    for key, t in state.task_tensors.items():
        put(f"task/{key}", t)
    for key, t in state.attack_tensors.items():
        put(f"attack/{key}", t)
    meta = {
        "version": STATE_VERSION,
        "round": state.round,
        "fingerprint": state.fingerprint,
        "published": sorted(state.published),
        "fetched": {str(r): sorted(m) for r, m in state.fetched.items()},
        "rule": state.rule,
        "task": state.task,
        "attack": state.attack,
    }
    return st_save(tensors, metadata={META_KEY: json.dumps(meta)})


def write(directory: Path, state: AgentState, agent_id: str) -> None:
    """Atomically replace ``directory/state.safetensors`` (temp + fsync + rename + fsync dir)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    tmp = directory / (STATE_FILE + ".tmp")
    data = encode(state)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    _crash_hook(agent_id, state.round)
    os.replace(tmp, final)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_hook(agent_id: str, round_: int) -> None:
    spec = os.environ.get(CRASH_HOOK_ENV)
    if not spec:
        return
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or parts[1] != agent_id or not parts[2].isdigit() or round_ < int(parts[2]):
        return
    marker = Path(parts[0]) / f"crashed-{agent_id}"
    if marker.exists():
        return
    marker.write_text("killed during the state write\n")
    log.warning("%s: test hook: killing this process during the state write of round %d", agent_id, round_)
    os.kill(os.getpid(), signal.SIGKILL)


# -- reading ------------------------------------------------------------------------------------


def path_of(directory: Path) -> Path:
    return directory / STATE_FILE


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The JSON part of the state in ``directory`` (header only), or None if there is none."""
    path = path_of(directory)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return dict(json.loads(meta[META_KEY]))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ConfigError("state_dir", f"{path} is not a readable agent state: {exc}", _FIX) from None


_FIX = "start with another --state-dir, or delete it to start the run afresh"


def check(directory: Path, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The state's metadata if it may be resumed by an agent with fingerprint ``expected``; None if
    there is no state; a ConfigError naming the first mismatch otherwise."""
    meta = read_meta(directory)
    if meta is None:
        return None
    version = meta.get("version")
    if version != STATE_VERSION:
        raise ConfigError(
            "state_dir",
            f"{path_of(directory)} has state version {version}, this agent reads {STATE_VERSION}",
            _FIX,
        )
    got = meta.get("fingerprint", {})
    for key, want in expected.items():
        if got.get(key) != want:
            raise ConfigError(
                "state_dir",
                f"{path_of(directory)} belongs to another run: {key} is {got.get(key)!r} there, "
                f"{want!r} here",
                _FIX,
            )
    return meta


def load(directory: Path, expected: Mapping[str, Any], device: str = "cpu") -> AgentState | None:
    """The state in ``directory`` (checked against ``expected``), or None if there is none."""
    meta = check(directory, expected)
    if meta is None:
        return None
    tensors = st_load(path_of(directory).read_bytes())
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    published = {int(r): under(f"published/{r}/") for r in meta["published"]}
    fetched = {
        int(r): {n: under(f"fetched/{r}/{n}/") for n in neighbors} for r, neighbors in meta["fetched"].items()
    }
    return AgentState(
        round=int(meta["round"]),
        fingerprint=meta["fingerprint"],
        theta=under("theta/"),
        published=published,
        fetched=fetched,
        rule=meta.get("rule", {}),
        task=meta.get("task", {}),
        task_tensors=under("task/"),
        attack=meta.get("attack", {}),
        attack_tensors=under("attack/"),
    )


class WriteSchedule:
    """When an agent writes its state: every ``state_every`` rounds, or (unset) as often as keeps the
    writes' share of the run small (AUTO_STATE_FACTOR), and always after the last round.

    An attack node crafts from the neighbour models of the previous round, which it keeps for a few
    rounds only: its state is written every round (attack nodes are few).
    """

    def __init__(self, state_every: int | None, rounds: int, keep: int, every_round: bool) -> None:
        self.state_every = state_every
        self.rounds = rounds
        self.keep = keep
        self.every_round = every_round
        self.last_round = 0  # last round whose state was written
        self._written_at = time.perf_counter()
        self._write_s = 0.0  # what the last write took (auto interval)

    def auto_cap(self) -> int:
        """The most rounds between two writes when ``state_every`` is unset."""
        return min(AUTO_STATE_MAX_ROUNDS, max(1, self.keep - 2))

    def interval(self) -> int:
        return self.state_every or self.auto_cap()

    def due(self, i: int) -> bool:
        every = self.state_every
        if i == self.rounds:
            return True
        if every is not None:
            return every > 0 and i % every == 0
        if self.every_round:
            return True
        if i - self.last_round >= self.auto_cap():
            return True
        return time.perf_counter() - self._written_at >= AUTO_STATE_FACTOR * self._write_s

    def written(self, i: int, started: float) -> None:
        """Round ``i``'s state is on disk; its write began at ``started`` (time.perf_counter)."""
        self._written_at = time.perf_counter()
        self._write_s = self._written_at - started
        self.last_round = i
