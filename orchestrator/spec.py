"""The topology spec: what a user writes in a topology YAML, validated before anything is deployed.

Why pydantic with ``extra="forbid"`` everywhere: a typo in a 100-agent experiment must fail in a
second with the field's name, not after an hour of rounds with a silently ignored setting. Every
problem surfaces as one ``ConfigError`` (field path, problem, what is allowed) which the CLI prints
on one line before exiting 2.

This module must stay torch-free (the orchestrator plans and renders deployments on machines
without torch): names are checked against ``mtl_node.core.names``, rule knobs against ``RuleParams``.
Task parameters are passed through unvalidated here; the agent validates them against its task.

The graph kinds are plain models of their own (orchestrator.spec_graphs). Why the rest stays one
module of ~570 lines: the spec is one tree of pydantic models (groups, Byzantine set, overrides,
rules) whose validators check each other's fields (ids against groups, overrides against agent ids)
and share one error-translation path; split, each part would import the others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError, UnknownNameError
from mtl_node.core.ids import ID_RE
from orchestrator.spec_graphs import (
    GRAPH_KINDS,
    AdjacencyGraph,
    CompleteGraph,
    EdgesGraph,
    GraphSpec,
    KRegularGraph,
)

log = logging.getLogger(__name__)

_ID = ID_RE
_CUSTOM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_HOST = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-@]+)$")

# The task parameter that ``learning_rate`` sets, per task; tasks not listed use "lr".
STEP_PARAMS: dict[str, str] = {"target-localization": "mu"}
DEFAULT_STEP_PARAM = "lr"


def step_param(task: str) -> str:
    return STEP_PARAMS.get(task, DEFAULT_STEP_PARAM)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ids(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise ValueError(f"must be a list of agent ids (got {v!r})")
    for i, a in enumerate(v):
        if not isinstance(a, str) or not _ID.match(a):
            raise ValueError(
                f"item {i}: {a!r} is not a valid agent id (ids are strings of letters, digits, "
                "'_', '.', '-', up to 63 long, e.g. a7)"
            )
    dup = sorted({a for a in v if v.count(a) > 1})
    if dup:
        raise ValueError(f"agent ids listed twice: {', '.join(dup)}")
    return v


def _check_count_or_ids(v: Any) -> Any:
    """A count or a list of ids; bool is an int to Python but never what the user meant."""
    if isinstance(v, bool) or not isinstance(v, int | list):
        raise ValueError(f"must be a count or a list of agent ids (got {v!r})")
    if isinstance(v, list):
        _check_ids(v)
    return v


class GroupSpec(_Model):
    """Agents sharing task parameters (for target localization: one target per group)."""

    name: str | None = None
    agents: int | list[str] = Field(description="how many agents (taken in id order) or their ids")
    task_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("agents", mode="before")
    @classmethod
    def _agents(cls, v: Any) -> Any:
        v = _check_count_or_ids(v)
        if isinstance(v, int) and v < 1:
            raise ValueError("a group needs at least 1 agent")
        return v


def _check_attack(v: str, field: str) -> str:
    if v not in catalog.ATTACK_NAMES:
        raise UnknownNameError("attack", v, catalog.ATTACK_NAMES, field=field)
    return v


class AttackChoice(_Model):
    """One Byzantine agent's own attack, in ``byzantine.attacks.<id>``."""

    attack: str = Field(description="attack name (mtl-node attacks)")
    attack_params: dict[str, Any] | None = Field(
        None, description="default: the attack's defaults (constant: the task's usual interval)"
    )


class ByzantineSpec(_Model):
    """Which agents are Byzantine and how they behave.

    Every Byzantine agent runs ``attack`` with ``attack_params``, except those listed in ``attacks``
    (id -> {attack, attack_params}), which needs explicit ``ids``: a drawn ``count`` cannot name
    agents in advance. Attack parameters are checked by the agents against ``mtl-node attacks``.
    """

    count: int | None = Field(None, ge=0, description="how many, chosen at random from seed")
    seed: int | None = Field(None, ge=0, description="seed of the choice; default: the run's")
    ids: list[str] | None = Field(None, description="explicit Byzantine agent ids (instead of count)")
    attack: str = Field("constant", description="attack name (mtl-node attacks)")
    attack_params: dict[str, Any] | None = Field(None, description="default: the task's usual attack")
    attacks: dict[str, AttackChoice] = Field(
        default_factory=dict, description="per-agent attacks: Byzantine id -> {attack, attack_params}"
    )

    @field_validator("ids", mode="before")
    @classmethod
    def _ids(cls, v: Any) -> Any:
        return None if v is None else _check_ids(v)

    @field_validator("attack")
    @classmethod
    def _attack(cls, v: str) -> str:
        return _check_attack(v, "byzantine.attack")

    @model_validator(mode="after")
    def _count_or_ids(self) -> ByzantineSpec:
        if (self.count is None) == (self.ids is None):
            raise ConfigError("byzantine", "give exactly one of count or ids", "e.g. count: 20, seed: 1")
        if self.attacks and self.ids is None:
            raise ConfigError(
                "byzantine.attacks",
                "per-agent attacks need the Byzantine agents named",
                "give byzantine.ids instead of byzantine.count",
            )
        for agent, choice in self.attacks.items():
            if agent not in (self.ids or []):
                raise ConfigError(
                    f"byzantine.attacks.{agent}",
                    f"{agent!r} is not in byzantine.ids",
                    "list it in byzantine.ids, or remove it here",
                )
            _check_attack(choice.attack, f"byzantine.attacks.{agent}.attack")
        return self

    def attack_of(self, agent: str) -> tuple[str, dict[str, Any] | None]:
        """(attack, attack_params or None for the defaults) of Byzantine ``agent``."""
        choice = self.attacks.get(agent)
        if choice is not None:
            return choice.attack, choice.attack_params
        return self.attack, self.attack_params


class OverrideSpec(_Model):
    """Per-agent settings that differ from the rest."""

    device: str | None = Field(None, description="cpu, cuda or cuda:N")
    host: str | None = Field(None, description="where the agent runs (ssh/k8s backends)")
    task_params: dict[str, Any] = Field(default_factory=dict)
    rule_params: dict[str, Any] = Field(
        default_factory=dict, description="this agent's rule knobs over the run's (e.g. its own f)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and not _DEVICE.match(v):
            raise ValueError("must be cpu, cuda or cuda:N")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not _HOST.match(v):
            raise ValueError("must be a host name or address, e.g. node1, user@node1 or 10.0.0.5")
        return v


class Spec(_Model):
    """A topology: agents, their tasks and graph, the Byzantine ones, and the rules to compare."""

    name: str = Field(description="run name (letters, digits, '_', '.', '-')")
    description: str = ""
    task: str = Field("target-localization", description="built-in task name or module:factory")
    task_params: dict[str, Any] = Field(default_factory=dict, description="parameters for every agent")
    groups: list[GroupSpec] | None = Field(None, description="agent groups with their own task params")
    agents: int | list[str] = Field(description="number of agents (ids a0, a1, ...) or explicit ids")
    graph: GraphSpec = Field(default_factory=lambda: CompleteGraph(kind="complete"))
    byzantine: ByzantineSpec | None = None
    rule: str | None = Field(None, description="one aggregation rule (or use rules)")
    rules: list[str] | None = Field(None, description="rules compared on identical topology and seeds")
    rounds: int = Field(100, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0, lt=2**63)
    nu: float = Field(0.1, gt=0.0, le=1.0, description="EMA forgetting factor, in (0, 1]")
    ema_init: float | None = Field(10.0, ge=0.0, description="EMA before the first observation")
    rule_params: dict[str, Any] = Field(
        default_factory=dict,
        description="other rule knobs (mtl_node.aggregation.RuleParams: f, clip_tau, floor, ...)",
    )
    learning_rate: float | None = Field(None, gt=0.0, description="the task's step size (mu, lr)")
    fetch_timeout: float = Field(30.0, gt=0, description="deadline of one model fetch, seconds")
    window: float = Field(0.2, gt=0.0, le=1.0, description="share of final rounds summarised")
    device: str = Field("cpu", description="default device of every agent: cpu, cuda or cuda:N")
    overrides: dict[str, OverrideSpec] = Field(default_factory=dict, description="agent id -> settings")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("use letters, digits, '_', '.', '-' (up to 63, starting with a letter or digit)")
        return v

    @field_validator("agents", mode="before")
    @classmethod
    def _agents(cls, v: Any) -> Any:
        v = _check_count_or_ids(v)
        if isinstance(v, int) and not 1 <= v <= 100_000:
            raise ValueError("must be between 1 and 100000")
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one agent id")
        return v

    @field_validator("graph", mode="before")
    @classmethod
    def _graph_shorthand(cls, v: Any) -> Any:
        """``graph: complete`` is short for ``graph: {kind: complete}``."""
        return {"kind": v} if isinstance(v, str) else v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v not in catalog.TASK_NAMES and not _CUSTOM.match(v):
            raise ConfigError(
                "task",
                f"unknown task {v!r}",
                f"valid tasks: {', '.join(sorted(catalog.TASK_NAMES))}, or module:factory",
            )
        return v

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        if v is not None and v not in catalog.RULE_NAMES:
            raise UnknownNameError("rule", v, catalog.RULE_NAMES, field="rule")
        return v

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ConfigError("rules", "is empty", f"list one or more of: {', '.join(catalog.RULE_NAMES)}")
        for i, r in enumerate(v):
            if r not in catalog.RULE_NAMES:
                raise UnknownNameError("rule", r, catalog.RULE_NAMES, field=f"rules.{i}")
        dup = sorted({r for r in v if v.count(r) > 1})
        if dup:
            raise ConfigError("rules", f"listed twice: {', '.join(dup)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError("must be cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        ids = self.agent_ids
        known = set(ids)
        n = len(ids)
        if self.rule is not None and self.rules is not None:
            raise ConfigError("rule", "rule and rules are both set", "give one rule, or a list in rules")
        _check_graph(self.graph, ids, known)
        if self.byzantine is not None:
            b = self.byzantine
            if b.count is not None and b.count >= n:
                raise ConfigError(
                    "byzantine.count",
                    f"{b.count} Byzantine agents among {n} agents",
                    f"use at most {n - 1}, so that at least one agent is normal",
                )
            if b.ids is not None:
                for i, a in enumerate(b.ids):
                    if a not in known:
                        raise ConfigError(f"byzantine.ids.{i}", f"unknown agent {a!r}", _known_ids(ids))
                if len(b.ids) >= n:
                    raise ConfigError("byzantine.ids", "every agent is Byzantine", "leave one agent normal")
        for a in self.overrides:
            if a not in known:
                raise ConfigError(f"overrides.{a}", f"unknown agent {a!r}", _known_ids(ids))
        if self.groups is not None:
            self.group_members()  # raises on overlaps and gaps
        if self.learning_rate is not None and step_param(self.task) in self.task_params:
            p = step_param(self.task)
            raise ConfigError(
                "learning_rate",
                f"set together with task_params.{p}, which it maps to for task {self.task}",
                "give one of them",
            )
        return self

    @property
    def agent_ids(self) -> list[str]:
        if isinstance(self.agents, list):
            return list(self.agents)
        width = len(str(self.agents - 1))
        return [f"a{i:0{width}d}" for i in range(self.agents)]

    @property
    def rule_names(self) -> tuple[str, ...]:
        if self.rules is not None:
            return tuple(self.rules)
        return (self.rule or "loss-filtered",)

    def group_members(self) -> list[list[str]]:
        """The agent ids of each group, in id order.

        Groups given by ids are placed first; groups given by a count take the next agents in id
        order among those left. Together the groups must cover every agent exactly once, so that no
        agent silently runs with parameters nobody chose for it.
        """
        ids = self.agent_ids
        known = set(ids)
        groups = self.groups or []
        taken: dict[str, int] = {}
        members: list[list[str]] = [[] for _ in groups]
        for g, group in enumerate(groups):
            if isinstance(group.agents, list):
                for a in group.agents:
                    if a not in known:
                        raise ConfigError(f"groups.{g}.agents", f"unknown agent {a!r}", _known_ids(ids))
                    if a in taken:
                        raise ConfigError(
                            f"groups.{g}.agents",
                            f"agent {a} is already in group {taken[a]}",
                            "one group each",
                        )
                    taken[a] = g
                    members[g].append(a)
        free = [a for a in ids if a not in taken]
        for g, group in enumerate(groups):
            if isinstance(group.agents, int):
                if group.agents > len(free):
                    raise ConfigError(
                        f"groups.{g}.agents",
                        f"{group.agents} agents asked but only {len(free)} are in no group yet",
                        f"the groups' counts and ids must add up to the {len(ids)} agents",
                    )
                members[g], free = free[: group.agents], free[group.agents :]
        if free:
            raise ConfigError(
                "groups",
                f"{len(free)} agents are in no group ({_short(free)})",
                f"the groups must cover all {len(ids)} agents",
            )
        order = {a: i for i, a in enumerate(ids)}
        return [sorted(m, key=order.__getitem__) for m in members]


def _check_graph(graph: Any, ids: list[str], known: set[str]) -> None:
    n = len(ids)
    if isinstance(graph, KRegularGraph):
        if graph.k >= n:
            raise ConfigError("graph.k", f"k={graph.k} with {n} agents", f"use k < {n}")
        if (graph.k * n) % 2:
            raise ConfigError("graph.k", f"k={graph.k} with {n} agents: n*k is odd", "n*k must be even")
    elif isinstance(graph, EdgesGraph):
        for i, (a, b) in enumerate(graph.edges):
            for j, x in enumerate((a, b)):
                if x not in known:
                    raise ConfigError(f"graph.edges.{i}.{j}", f"unknown agent {x!r}", _known_ids(ids))
            if a == b:
                raise ConfigError(
                    f"graph.edges.{i}", f"links {a} to itself", "an agent is always its own member"
                )
    elif isinstance(graph, AdjacencyGraph):
        for a, nbrs in graph.adjacency.items():
            if a not in known:
                raise ConfigError(f"graph.adjacency.{a}", f"unknown agent {a!r}", _known_ids(ids))
            for j, x in enumerate(nbrs):
                if x not in known:
                    raise ConfigError(f"graph.adjacency.{a}.{j}", f"unknown agent {x!r}", _known_ids(ids))
                if x == a:
                    raise ConfigError(
                        f"graph.adjacency.{a}.{j}", f"lists {a} itself", "an agent is always its own member"
                    )


def _short(ids: list[str], limit: int = 8) -> str:
    if len(ids) <= limit:
        return ", ".join(ids)
    return ", ".join(ids[:limit]) + f", ... ({len(ids)} in all)"


def _known_ids(ids: list[str]) -> str:
    if len(ids) <= 8:
        return f"agents are {', '.join(ids)}"
    return f"agents are {ids[0]}, {ids[1]}, ..., {ids[-1]} ({len(ids)} in all)"


# ---------------------------------------------------------------------------------------- loading


def _model_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model a pydantic error location points into, and the location without union tags."""
    model: type[BaseModel] | None = Spec
    path: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        path.append(str(part))
        i += 1
        if model is None:
            continue
        if part == "graph" and model is Spec:
            if i < len(loc) and loc[i] in GRAPH_KINDS:
                model = GRAPH_KINDS[str(loc[i])]
                i += 1  # the union tag is not part of what the user wrote
            else:
                model = None
        elif part == "groups" and model is Spec:
            model = GroupSpec
            if i < len(loc) and isinstance(loc[i], int):
                path.append(str(loc[i]))
                i += 1
        elif part == "byzantine" and model is Spec:
            model = ByzantineSpec
        elif part == "attacks" and model is ByzantineSpec:
            model = AttackChoice
            if i < len(loc):
                path.append(str(loc[i]))
                i += 1
        elif part == "overrides" and model is Spec:
            model = OverrideSpec
            if i < len(loc):
                path.append(str(loc[i]))
                i += 1
        else:
            model = None
    return model, path


def _from_validation_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        model, path = _model_at(loc[:-1])
        where = ".".join([*path, str(loc[-1])])
        if model is None:
            return ConfigError(where, "unknown field")
        return ConfigError(where, "unknown field", f"valid fields: {', '.join(sorted(model.model_fields))}")
    model, path = _model_at(loc)
    where = ".".join(path) or "topology"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        got = err.get("ctx", {}).get("tag")
        problem = f"unknown graph kind {got!r}" if kind == "union_tag_invalid" else "no graph kind given"
        return ConfigError(f"{where}.kind", problem, f"valid kinds: {', '.join(GRAPH_KINDS)}")
    if kind == "missing":
        parent, _ = _model_at(loc[:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else ""
        return ConfigError(where, "required field is missing", f"fields here: {allowed}" if allowed else None)
    msg = err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    return ConfigError(where, f"{msg} (got {got})")


def parse_spec(data: Mapping[str, Any]) -> Spec:
    """Validate an already-parsed topology mapping; raises ConfigError."""
    try:
        return Spec.model_validate(dict(data))
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


_FLAGS = {"seed": "--seed", "rounds": "--rounds", "rules": "--rule"}


def apply_overrides(
    spec: Spec,
    *,
    seed: int | None = None,
    rounds: int | None = None,
    rules: list[str] | None = None,
) -> Spec:
    """``spec`` with command-line overrides applied (None keeps the file's value), re-validated.

    Errors name the flag rather than the file's field, since that is what the user typed.
    """
    data = spec.model_dump()
    changed: dict[str, Any] = {}
    if seed is not None:
        changed["seed"] = seed
    if rounds is not None:
        changed["rounds"] = rounds
    if rules:
        changed["rules"] = list(rules)
        data["rule"] = None
    if not changed:
        return spec
    try:
        return parse_spec({**data, **changed})
    except ConfigError as exc:
        top = exc.field.split(".")[0]
        if top in changed:
            raise ConfigError(_FLAGS[top], exc.problem, exc.fix) from None
        raise


def load_topology(path: str | Path) -> Spec:
    """Read and validate a topology YAML file; every problem is a ConfigError naming the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("topology", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("topology", f"{path} is not a text file", "give a topology YAML file") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(
            "topology", f"{path} is nested too deeply", "a topology is a few levels deep"
        ) from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError("topology", f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            "topology",
            f"{path} must hold a mapping of fields (got {type(data).__name__})",
            "start with e.g. 'name: my-run' and 'agents: 8'",
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            str(bad[0]), "field names must be strings", f"valid fields: {', '.join(Spec.model_fields)}"
        )
    return parse_spec(data)
