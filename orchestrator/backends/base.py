"""The backend interface: run one rule of a plan to completion and hand back every row.

A backend only deploys and collects; the runner owns the results directory and the progress bar.
``docker``, ``ssh`` and ``k8s`` backends plug in here by registering a Backend subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mtl_node.core.registry import Registry
from orchestrator.plan import RunPlan

if TYPE_CHECKING:
    from orchestrator.tls import RunCerts

Row = dict[str, Any]


@dataclass(frozen=True)
class Progress:
    """One progress update: the slowest normal agent's round and the normal agents' means."""

    rule: str
    round: int
    rounds: int
    mean_loss: float
    accepted: float
    filtered: float
    missing: float


ProgressSink = Callable[[Progress], None]


@dataclass(frozen=True)
class RunContext:
    """Everything a backend needs besides the plan: where to work and whom to tell."""

    rule: str
    workdir: Path  # backend scratch space (per rule), inside the results directory
    progress: ProgressSink
    record_decisions: bool = True
    options: dict[str, Any] | None = None  # backend-specific knobs (e.g. agents_per_process)
    # Agents whose process/container died and was not recovered (filled in by ``follow``): the run
    # then fails naming them (summary.json records them too).
    lost: set[str] = field(default_factory=set)
    certs: RunCerts | None = None  # mutual TLS material; None only with --insecure


@dataclass
class RunOutput:
    metrics: list[Row]
    decisions: list[Row]


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        """Deploy every agent of ``plan`` with ``ctx.rule``, run all rounds, collect, tear down.

        Must leave nothing running when it returns or raises (including KeyboardInterrupt).
        """


BACKENDS: Registry[type[Backend]] = Registry("backend")
