"""Where an agent writes what happened each round: metrics, filter decisions, checkpoints.

Files are appended and flushed every round (JSON lines), so a crash loses at most the round in
progress. The orchestrator merges these per-agent files into the results directory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mtl_node import wire
from mtl_node.aggregation import NeighborDecision
from mtl_node.tasks import Metrics
from mtl_node.wire import StateDict


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
    decisions: tuple[NeighborDecision, ...]
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
        self._metrics.write(json.dumps(rec.metrics_row()) + "\n")
        for row in rec.decision_rows():
            self._decisions.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self._decisions.flush()
        if self.save_models_every and rec.round % self.save_models_every == 0:
            self.save_model(rec.round, model)

    def save_model(self, round_: int, model: StateDict) -> None:
        models = self.directory / "models"
        models.mkdir(exist_ok=True)
        final = models / f"round-{round_:06d}.safetensors"
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(wire.encode(model))
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written checkpoint

    def close(self) -> None:
        self._metrics.close()
        self._decisions.close()
