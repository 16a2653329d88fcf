"""Where an agent writes what happened each round: metrics, filter decisions, checkpoints.

Files are appended and flushed every round (JSON lines), decisions before metrics, so a metrics
row is never on disk without its round's decisions. ``sync()`` makes them durable before the agent
writes its state (mtl_node/state.py): a state of round R then implies every row up to R is on disk.
On start, ``resume(R)`` cuts both files back to the rows of rounds <= R (dropping a line torn by a
crash and the rows of the round that was interrupted), so a resumed run continues with neither gaps
nor duplicates. The orchestrator merges these per-agent files into the results directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mtl_node import wire
from mtl_node.aggregation import NeighborDecision
from mtl_node.tasks import Metrics
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    agent: str
    round: int
    role: str
    rule: str
    metrics: Metrics
    accepted: int
    filtered: int
    missing: int
    # A tuple, or a sequence built on first read (the torch batched engine's RowDecisions).
    decisions: Sequence[NeighborDecision]
    seconds: float

    def metrics_row(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "agent": self.agent,
            "role": self.role,
            "rule": self.rule,
            "loss": _num(self.metrics.loss),
            "test_loss": _num(self.metrics.test_loss),
            "test_accuracy": _num(self.metrics.test_accuracy),
            "attack_success": _num(self.metrics.attack_success),
            "accepted": self.accepted,
            "filtered": self.filtered,
            "missing": self.missing,
            "seconds": round(self.seconds, 6),
        }

    def decision_rows(self) -> list[dict[str, Any]]:
        return [
            {"round": self.round, "agent": self.agent, "rule": self.rule}
            | {k: _num(v) if isinstance(v, float) else v for k, v in asdict(d).items()}
            | {"neighbor": d.agent_id}
            for d in self.decisions
        ]


def _num(x: float | None) -> float | None:
    """JSON has no NaN: write null instead."""
    if x is None or not math.isfinite(x):
        return None
    return x


class Recorder:
    """Receives one RoundRecord per completed round."""

    def record(self, rec: RoundRecord, model: StateDict) -> None:
        pass

    def resume(self, round_: int) -> None:
        """The run continues after ``round_``: forget whatever was recorded for later rounds."""

    def sync(self) -> None:
        """Make what was recorded durable (called before the agent's state is written)."""

    def close(self) -> None:
        pass


class MemoryRecorder(Recorder):
    """Keeps everything in lists (the in-process engine and tests)."""

    def __init__(self, keep_models: bool = False) -> None:
        self.records: list[RoundRecord] = []
        self.models: list[StateDict] = []
        self.keep_models = keep_models

    def record(self, rec: RoundRecord, model: StateDict) -> None:
        self.records.append(rec)
        if self.keep_models:
            self.models.append({k: v.detach().cpu().clone() for k, v in model.items()})


class FileRecorder(Recorder):
    """``metrics.jsonl``, ``decisions.jsonl`` and ``models/round-NNNNNN.safetensors``."""

    def __init__(self, directory: Path, save_models_every: int = 0) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.save_models_every = save_models_every
        self._metrics: IO[str] = open(directory / "metrics.jsonl", "a")  # noqa: SIM115
        self._decisions: IO[str] = open(directory / "decisions.jsonl", "a")  # noqa: SIM115

    def record(self, rec: RoundRecord, model: StateDict) -> None:
        # Decisions first: a crash between the two leaves decisions without metrics (cut on resume),
        # never a metrics row whose decisions are missing.
        self._decisions.write("".join(json.dumps(row) + "\n" for row in rec.decision_rows()))
        self._decisions.flush()
        self._metrics.write(json.dumps(rec.metrics_row()) + "\n")
        self._metrics.flush()
        if self.save_models_every and rec.round % self.save_models_every == 0:
            self.save_model(rec.round, model)

    def save_model(self, round_: int, model: StateDict) -> None:
        models = self.directory / "models"
        models.mkdir(exist_ok=True)
        final = models / f"round-{round_:06d}.safetensors"
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(wire.encode(model))
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written checkpoint

    def sync(self) -> None:
        for f in (self._decisions, self._metrics):
            f.flush()
            os.fsync(f.fileno())

    def resume(self, round_: int) -> None:
        for name in ("decisions", "metrics"):
            handle: IO[str] = getattr(self, f"_{name}")
            handle.close()
            path = self.directory / f"{name}.jsonl"
            _, dropped = truncate_rows(path, round_)
            if dropped:
                log.info("%s: kept rows of rounds <= %d, dropped %d later/torn lines", path, round_, dropped)
            setattr(self, f"_{name}", open(path, "a"))  # noqa: SIM115

    def close(self) -> None:
        self._metrics.close()
        self._decisions.close()


def truncate_rows(path: Path, round_: int) -> tuple[int, int]:
    """Rewrite ``path`` (atomically) with only its complete rows of rounds <= ``round_``.

    Returns (kept, dropped). Rows are appended in round order, so everything after the first row of
    a later round, or after a torn line, is what the interrupted run wrote after its last state.
    """
    if not path.exists():
        return 0, 0
    kept: list[str] = []
    dropped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= round_:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(kept), dropped
