"""The sweep spec: a grid of tasks x topologies x rules x attacks x Byzantine fractions x seeds.

A sweep file is to ``mtl-orchestrate sweep`` what a topology file is to ``up``: it is validated in
full before the first cell runs, and every problem is one ``ConfigError`` naming the field and the
fix (the CLI prints it on one line and exits 2). Each grid point expands to a :class:`Cell`, which
is nothing but a topology (``orchestrator.spec.Spec``) with one rule and one attack, so a cell run
by the sweep gives exactly the numbers of ``mtl-orchestrate up --backend sim`` on
``cell.topology()``.

A cell's id is a hash of its canonical JSON: everything that determines its numbers and nothing
else. Resuming an interrupted sweep skips the cells whose id is already in the results log, and
widening a grid (one more seed, one more attack) reuses every cell it already has.

Torch-free: validation and planning run in the orchestrator process; torch is imported only by
the worker that runs a cell (orchestrator.sweep.cell). A little over 400 lines: the models, the
cell expansion and the error translation stay together because the errors name the models' fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError, UnknownNameError
from orchestrator.spec import GroupSpec, parse_spec
from orchestrator.spec_graphs import GRAPH_KINDS, GraphSpec

log = logging.getLogger(__name__)

Metric = Literal["test_loss", "test_accuracy", "loss", "attack_success"]
# The metric a cell reports when the task entry names none: accuracy where the task has it.
DEFAULT_METRIC: dict[str, Metric] = {"har": "test_accuracy", "digits": "test_accuracy"}
# Higher is better for these; "worse than alone" flips for them.
HIGHER_IS_BETTER = frozenset({"test_accuracy"})
NO_ATTACK = "-"  # the attack label of the 0% cells
AUTO = "auto"  # rule_params.f: each agent's true Byzantine neighbour count (see strongest_f)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SweepTask(_Model):
    """One task of the grid with its parameters (the topology fields that describe the learning)."""

    name: str | None = Field(None, description="label in the results (default: the task name)")
    task: str = Field("target-localization", description="built-in task name or module:factory")
    task_params: dict[str, Any] = Field(default_factory=dict, description="parameters for every agent")
    groups: list[GroupSpec] | None = Field(None, description="agent groups with their own task params")
    learning_rate: float | None = Field(None, gt=0.0, description="the task's step size (mu, lr)")
    nu: float = Field(0.1, gt=0.0, le=1.0, description="EMA forgetting factor, in (0, 1]")
    ema_init: float | None = Field(10.0, ge=0.0, description="EMA before the first observation")
    rule_params: dict[str, Any] = Field(
        default_factory=dict, description="other rule knobs (f, clip_tau, ...)"
    )
    metric: Metric | None = Field(
        None, description="test_loss, test_accuracy, loss or attack_success (default: by task)"
    )

    @property
    def label(self) -> str:
        return self.name or self.task

    @property
    def metric_name(self) -> Metric:
        return self.metric or DEFAULT_METRIC.get(self.task, "test_loss")


class SweepTopology(_Model):
    """One network of the grid: how many agents and how they are linked."""

    name: str | None = Field(None, description="label in the results (default: the graph kind)")
    agents: int = Field(ge=2, le=100_000, description="number of agents")
    graph: GraphSpec

    @field_validator("graph", mode="before")
    @classmethod
    def _graph_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @property
    def label(self) -> str:
        return self.name or self.graph.kind


class SweepAttack(_Model):
    """One attack of the grid; ``params`` null means the attack's defaults for the task."""

    name: str | None = Field(None, description="label in the results (default: the attack name)")
    attack: str = Field(description="attack name (mtl-node attacks)")
    params: dict[str, Any] | None = Field(None, description="attack parameters (default: the attack's)")

    @property
    def label(self) -> str:
        """The name given, else the attack's; an omniscient attack (it reads its victims' data: the
        in-process engine only) says so in every results row and report, whatever its name."""
        return catalog.attack_label(self.name or self.attack, self.params)


class SweepSpec(_Model):
    """The grid. Fraction 0 runs every rule once without attack (its attack label is ``-``)."""

    name: str = Field(description="sweep name")
    description: str = ""
    tasks: list[SweepTask] = Field(min_length=1, description="tasks with their parameters")
    topologies: list[SweepTopology] = Field(min_length=1, description="networks: agents and graph")
    rules: list[str] = Field(min_length=1, description="aggregation rules; `none` is the alone reference")
    attacks: list[SweepAttack] = Field(default_factory=list, description="attacks with parameters")
    fractions: list[float] = Field(
        default_factory=lambda: [0.0], min_length=1, description="Byzantine shares"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds (or a count)")
    rounds: int = Field(100, ge=1, le=10_000_000)
    window: float = Field(0.2, gt=0.0, le=1.0, description="share of final rounds averaged")

    @field_validator("tasks", "topologies", "attacks", mode="before")
    @classmethod
    def _shorthands(cls, v: Any, info: Any) -> Any:
        """A single entry may stand for a list of one; ``- constant`` is short for
        ``- {attack: constant}`` and ``- har`` for ``- {task: har}``."""
        if isinstance(v, dict | str):
            v = [v]
        key = {"tasks": "task", "attacks": "attack"}.get(info.field_name)
        if key and isinstance(v, list):
            v = [{key: x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        """``seeds: 3`` is short for ``seeds: [0, 1, 2]``."""
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError("a seed count must be at least 1")
            return list(range(v))
        return v

    @model_validator(mode="after")
    def _names(self) -> SweepSpec:
        for i, t in enumerate(self.tasks):
            if t.task not in catalog.TASK_NAMES and ":" not in t.task:
                raise UnknownNameError("task", t.task, catalog.TASK_NAMES, field=f"tasks.{i}.task")
        for i, r in enumerate(self.rules):
            if r not in catalog.RULE_NAMES:
                raise UnknownNameError("rule", r, catalog.RULE_NAMES, field=f"rules.{i}")
        for i, a in enumerate(self.attacks):
            if a.attack not in catalog.ATTACK_NAMES:
                raise UnknownNameError("attack", a.attack, catalog.ATTACK_NAMES, field=f"attacks.{i}.attack")
        for i, f in enumerate(self.fractions):
            if not 0.0 <= f < 1.0:
                raise ConfigError(f"fractions.{i}", f"{f} is not a share in [0, 1)", "e.g. 0.1 for 10%")
        for i, s in enumerate(self.seeds):
            if not 0 <= s < 2**63:
                raise ConfigError(f"seeds.{i}", f"{s} is not a seed", "use integers >= 0")
        _unique("rules", self.rules)
        _unique("fractions", [str(f) for f in self.fractions])
        _unique("seeds", [str(s) for s in self.seeds])
        _unique("tasks", [t.label for t in self.tasks], "give each a distinct name")
        _unique("topologies", [t.label for t in self.topologies], "give each a distinct name")
        _unique("attacks", [a.label for a in self.attacks], "give each a distinct name")
        if any(f > 0 for f in self.fractions) and not self.attacks:
            raise ConfigError(
                "attacks", "fractions above 0 need attacks", "list attacks, or use fractions: [0]"
            )
        for i, topo in enumerate(self.topologies):
            for j, f in enumerate(self.fractions):
                count = byzantine_count(f, topo.agents)
                if f > 0 and count == 0:
                    raise ConfigError(
                        f"fractions.{j}",
                        f"{f} of the {topo.agents} agents of topologies.{i} is no Byzantine agent",
                        f"use at least {1 / topo.agents:.3g}",
                    )
                if count >= topo.agents:
                    raise ConfigError(f"fractions.{j}", f"{f} leaves no normal agent", "use a smaller share")
        return self

    def cells(self) -> list[Cell]:
        """Every grid point, in a stable order (task, topology, seed, fraction, attack, rule)."""
        out = []
        for task in self.tasks:
            for topo in self.topologies:
                for seed in self.seeds:
                    for fraction in self.fractions:
                        attacks: list[SweepAttack | None] = list(self.attacks) if fraction > 0 else [None]
                        for attack in attacks:
                            for rule in self.rules:
                                out.append(
                                    Cell(task, topo, rule, attack, fraction, seed, self.rounds, self.window)
                                )
        return out


def byzantine_count(fraction: float, agents: int) -> int:
    """How many of ``agents`` are Byzantine at ``fraction``: the nearest whole number."""
    return round(fraction * agents)


def strongest_f(topology: dict[str, Any], rule: str) -> dict[str, Any]:
    """``overrides`` that give every agent of ``topology`` the strongest f for ``rule``: its true
    number of Byzantine neighbours, capped at the most its neighbourhood admits (median and
    trimmed-mean need 2f+1 members, krum 2f+3), so the robust baselines run at their best."""
    from mtl_node.aggregation.robust import max_f
    from orchestrator.planner import plan_topology

    if max_f(rule, 1_000_000) is None:
        return {}  # the rule has no f
    plan = plan_topology(parse_spec({**topology, "rules": ["none"]}))
    bad = {a.id for a in plan.agents if a.role == "byzantine"}
    out: dict[str, Any] = {}
    for a in plan.agents:
        cap = max_f(rule, len(a.neighbors) + 1)
        assert cap is not None
        f = max(0, min(sum(nb in bad for nb in a.neighbors), cap))
        out[a.id] = {"rule_params": {"f": f}}
    return out


def _unique(field: str, values: list[str], fix: str | None = None) -> None:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ConfigError(field, f"listed twice: {', '.join(dup)}", fix)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: one rule against one attack at one fraction and seed."""

    task: SweepTask
    topology: SweepTopology
    rule: str
    attack: SweepAttack | None
    fraction: float
    seed: int
    rounds: int
    window: float

    def canonical(self) -> dict[str, Any]:
        """Everything that determines the cell's numbers, as plain JSON (labels included, so two
        differently named but identical grid entries stay separate rows)."""
        return {
            "task": self.task.model_dump(mode="json", exclude_none=True),
            "topology": self.topology.model_dump(mode="json", exclude_none=True),
            "rule": self.rule,
            "attack": None if self.attack is None else self.attack.model_dump(mode="json", exclude_none=True),
            "fraction": self.fraction,
            "seed": self.seed,
            "rounds": self.rounds,
            "window": self.window,
        }

    @property
    def id(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def byzantine(self) -> int:
        return byzantine_count(self.fraction, self.topology.agents)

    @property
    def attack_label(self) -> str:
        return NO_ATTACK if self.attack is None else self.attack.label

    def topology_spec(self) -> dict[str, Any]:
        """The topology file of this cell (``mtl-orchestrate up --backend sim`` runs the same)."""
        t = self.task
        data: dict[str, Any] = {
            "name": f"sweep-{self.id}",
            "task": t.task,
            "task_params": dict(t.task_params),
            "agents": self.topology.agents,
            "graph": self.topology.graph.model_dump(mode="json", exclude_none=True),
            "rules": [self.rule],
            "rounds": self.rounds,
            "seed": self.seed,
            "nu": t.nu,
            "ema_init": t.ema_init,
            "rule_params": {k: v for k, v in t.rule_params.items() if not (k == "f" and v == AUTO)},
            "window": self.window,
        }
        if t.groups is not None:
            data["groups"] = [g.model_dump(mode="json", exclude_none=True) for g in t.groups]
        if t.learning_rate is not None:
            data["learning_rate"] = t.learning_rate
        if self.attack is not None and self.byzantine > 0:
            byz: dict[str, Any] = {"count": self.byzantine, "attack": self.attack.attack}
            if self.attack.params is not None:
                byz["attack_params"] = dict(self.attack.params)
            data["byzantine"] = byz
        if t.rule_params.get("f") == AUTO:
            overrides = strongest_f(data, self.rule)
            if overrides:
                data["overrides"] = overrides
        return data

    def labels(self) -> dict[str, Any]:
        return {
            "task": self.task.label,
            "topology": self.topology.label,
            "rule": self.rule,
            "attack": self.attack_label,
            "fraction": self.fraction,
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------- loading


def parse_sweep(data: Mapping[str, Any], *, check_plans: bool = True) -> SweepSpec:
    """Validate a parsed sweep mapping; with ``check_plans`` also plan every (task, topology, seed)
    so that what only shows when planning (a rule's assumption on a neighbourhood, a bad task
    parameter the planner reads) fails now, not an hour into the sweep."""
    try:
        spec = SweepSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    if check_plans:
        check_topologies(spec)
    return spec


def check_topologies(spec: SweepSpec) -> None:
    from orchestrator.planner import plan_topology

    for i, task in enumerate(spec.tasks):
        for j, topo in enumerate(spec.topologies):
            for seed in spec.seeds:
                # Fraction 0 checks every agent's neighbourhood (all of them are normal).
                for rule in spec.rules:
                    cell = Cell(task, topo, rule, None, 0.0, seed, spec.rounds, spec.window)
                    try:
                        plan_topology(parse_spec(cell.topology_spec()))
                    except ConfigError as exc:
                        top = exc.field.split(".")[0]
                        if top in ("rule", "rules"):
                            field = f"rules.{spec.rules.index(rule)}"
                        elif top in _TASK_FIELDS:
                            field = f"tasks.{i}.{exc.field}"
                        else:
                            field = f"topologies.{j}.{exc.field}"
                        raise ConfigError(f"{field} (seed {seed})", exc.problem, exc.fix) from None


_TASK_FIELDS = frozenset(SweepTask.model_fields) | {"rule_params"}


def load_sweep(path: str | Path, *, check_plans: bool = True) -> SweepSpec:
    """Read and validate a sweep YAML file; every problem is a ConfigError naming the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("sweep", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("sweep", f"{path} is not a text file", "give a sweep YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError("sweep", f"{path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            "sweep",
            f"{path} must hold a mapping of fields (got {type(data).__name__})",
            f"fields: {', '.join(SweepSpec.model_fields)}",
        )
    return parse_sweep(data, check_plans=check_plans)


_MODELS: dict[str, type[BaseModel]] = {
    "tasks": SweepTask,
    "topologies": SweepTopology,
    "attacks": SweepAttack,
}


def _from_validation_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    # A misspelt field shows up as "unknown" and as "missing": the unknown one says more.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    loc = [str(p) for p in err["loc"]]
    # Drop the union tag pydantic puts after "graph" (not part of what the user wrote).
    path: list[str] = []
    model: type[BaseModel] | None = SweepSpec
    for k, part in enumerate(loc):
        if k > 0 and loc[k - 1] == "graph" and part in GRAPH_KINDS:
            model = GRAPH_KINDS[part]
            continue
        path.append(part)
        if part in _MODELS and k == 0:
            model = _MODELS[part]
        elif part == "graph":
            model = None
        elif part.isdigit():
            pass
        elif k < len(loc) - 1:
            model = None
    kind = err["type"]
    where = ".".join(path) or "sweep"
    if kind == "extra_forbidden":
        fields = f"valid fields: {', '.join(sorted(model.model_fields))}" if model else None
        return ConfigError(where, "unknown field", fields)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        got = err.get("ctx", {}).get("tag")
        problem = f"unknown graph kind {got!r}" if kind == "union_tag_invalid" else "no graph kind given"
        return ConfigError(f"{where}.kind", problem, f"valid kinds: {', '.join(GRAPH_KINDS)}")
    if kind == "missing":
        return ConfigError(where, "required field is missing")
    msg = err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    return ConfigError(where, f"{msg} (got {got})")
