"""Spec -> RunPlan: draw positions, targets, the graph and the Byzantine agents, resolve parameters.

Planning is deterministic: every random draw comes from a numpy Generator seeded by the spec's seed
and a purpose (one stream each for positions, targets, graph and Byzantine choice), so planning the
same file twice gives the same plan, and changing e.g. the Byzantine count does not move agents.

Task parameters are layered, later wins: what the planner draws (target localization: ``position``
and ``target``), ``learning_rate``, ``task_params``, the agent's group's ``task_params``, the agent's
override. Classification defaults, filled only where none of those set them: ``har`` gives agent i
(id order) subject i+1 (one agent per subject, cycling past 30); ``digits`` without ``groups`` puts
the first half of the agents in group 1 (``dataset: mnist``) and the rest in group 2
(``dataset: synthetic``), as the paper. Torch-free, like the spec.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import ValidationError

from mtl_node.aggregation.base import RuleParams
from mtl_node.aggregation.robust import check_neighbourhood, max_f
from mtl_node.core.errors import ConfigError
from orchestrator import graphs
from orchestrator.plan import AgentPlan, RunPlan
from orchestrator.spec import Spec, load_topology, parse_spec, step_param
from orchestrator.spec_graphs import (
    AdjacencyGraph,
    CompleteGraph,
    EdgesGraph,
    ErdosRenyiGraph,
    GeometricGraph,
    KRegularGraph,
    RingGraph,
)

log = logging.getLogger(__name__)

__all__ = ["load_topology", "parse_spec", "plan_file", "plan_topology"]

# Streams of the planner's generator, one per purpose.
POSITIONS = 1
TARGETS = 2
GRAPH = 3
BYZANTINE = 4

TARGET_LOCALIZATION = "target-localization"
# The paper's four targets; each is jittered by U[0,1] per coordinate (reference code: 10 + U).
PAPER_TARGETS = ((10.0, 10.0), (10.0, 20.0), (20.0, 10.0), (20.0, 20.0))
PAPER_AREA = 3.0
HAR = "har"
DIGITS = "digits"
HAR_SUBJECTS = 30
# Digit classification: group 1 learns handwritten digits (MNIST), group 2 synthetic ones.
DIGIT_GROUPS = ("mnist", "synthetic")
# The paper's attack: values from [15, 16] for target localization, [0, 0.1] for classification.
PAPER_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    TARGET_LOCALIZATION: {"low": 15.0, "high": 16.0},
    HAR: {"low": 0.0, "high": 0.1},
    DIGITS: {"low": 0.0, "high": 0.1},
}


def default_attack_params(task: str, attack: str) -> dict[str, Any]:
    """What an attacker given no attack_params runs with: the paper's interval for ``constant``
    (PAPER_ATTACK_PARAMS), the attack's own defaults for every other attack."""
    return dict(PAPER_ATTACK_PARAMS.get(task, {})) if attack == "constant" else {}


def stream(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


def plan_file(path: Any) -> RunPlan:
    return plan_topology(load_topology(path))


def plan_topology(spec: Spec) -> RunPlan:
    """Resolve ``spec`` into one AgentPlan per agent (raises ConfigError for what only shows here)."""
    ids = spec.agent_ids
    n = len(ids)
    index = {a: i for i, a in enumerate(ids)}
    tl = spec.task == TARGET_LOCALIZATION

    # Groups: the spec's, or the paper's (target localization: 4 equal index groups; digits: 2).
    group_of: list[int | None] = [None] * n
    members = spec.group_members() if spec.groups is not None else None
    if members is not None:
        for number, m in enumerate(members):
            for a in m:
                group_of[index[a]] = number
    elif tl:
        group_of = [i * len(PAPER_TARGETS) // n for i in range(n)]
    elif spec.task == DIGITS and "dataset" not in spec.task_params:
        # The paper's split: the first half of the agents (id order) group 1, the rest group 2.
        group_of = [i * len(DIGIT_GROUPS) // n for i in range(n)]

    # Task parameters, layered (see the module docstring); positions/targets filled in below.
    step = step_param(spec.task)
    params: list[dict[str, Any]] = []
    for i, a in enumerate(ids):
        p: dict[str, Any] = {}
        if spec.learning_rate is not None:
            p[step] = spec.learning_rate
        p.update(spec.task_params)
        g = group_of[i]
        if spec.groups is not None and g is not None:
            p.update(spec.groups[g].task_params)
        if a in spec.overrides:
            p.update(spec.overrides[a].task_params)
        if spec.task == HAR and "subject" not in p:
            p["subject"] = i % HAR_SUBJECTS + 1  # one agent per subject, in id order
        if spec.task == DIGITS and spec.groups is None and g is not None and "dataset" not in p:
            p["dataset"] = DIGIT_GROUPS[g]
        params.append(p)

    # Positions: drawn for every agent (so giving one agent a position moves nobody else), used by
    # target localization and geometric graphs, and kept for drawing the network.
    geometric = isinstance(spec.graph, GeometricGraph)
    positions: list[tuple[float, float]] | None = None
    if tl or geometric:
        side = spec.graph.area if isinstance(spec.graph, GeometricGraph) else PAPER_AREA
        drawn = stream(spec.seed, POSITIONS).uniform(0.0, side, size=(n, 2))
        positions = []
        for i, a in enumerate(ids):
            given = params[i].get("position")
            if given is None:
                positions.append((float(drawn[i, 0]), float(drawn[i, 1])))
            else:
                positions.append(_point(given, _param_field(spec, a, group_of[i], "position")))
        if tl:
            for i in range(n):
                params[i]["position"] = list(positions[i])

    if tl:
        base = np.asarray(PAPER_TARGETS, dtype=np.float64)
        targets = base + stream(spec.seed, TARGETS).uniform(0.0, 1.0, size=base.shape)
        for i in range(n):
            group = group_of[i]
            if "target" in params[i] or group is None:
                continue
            t = targets[group % len(targets)]
            params[i]["target"] = [float(t[0]), float(t[1])]

    neighbourhoods = _graph(spec, ids, positions)

    byz = _byzantine(spec, ids)
    attacks: dict[str, tuple[str, dict[str, Any]]] = {}
    if spec.byzantine is not None:
        for a in byz:
            name, given = spec.byzantine.attack_of(a)
            attacks[a] = (name, dict(given) if given is not None else default_attack_params(spec.task, name))

    agents = []
    for i, a in enumerate(ids):
        o = spec.overrides.get(a)
        bad = a in byz
        attack, attack_params = attacks.get(a, (None, {}))
        agents.append(
            AgentPlan(
                id=a,
                role="byzantine" if bad else "normal",
                neighbors=tuple(ids[j] for j in neighbourhoods[i]),
                task=spec.task,
                task_params=params[i],
                attack=attack,
                attack_params=attack_params,
                device=(o.device if o and o.device else spec.device),
                host=o.host if o else None,
                group=group_of[i],
                position=positions[i] if positions is not None else None,
                rule_params=dict(o.rule_params) if o else {},
            )
        )

    knobs = _rule_params(spec)
    # Robust baselines' assumptions (e.g. krum: 2f+3 members) on every normal agent's neighbourhood,
    # with the agent's own knobs where overrides give it some. An agent given its own f
    # (overrides.<id>.rule_params.f, e.g. by a sweep's `f: auto`) whose neighbourhood admits no f at
    # all for a rule is not an error: the rule's run-time fallback keeps its own model (it learns
    # alone), and the plan says so in a warning.
    fallback: list[str] = []
    for agent in agents:
        if agent.role != "normal":
            continue
        own = _agent_rule_params(spec, agent.id, knobs) if agent.rule_params else knobs
        for i, rule in enumerate(spec.rule_names):
            cap = max_f(rule, len(agent.neighbors) + 1)
            if "f" in agent.rule_params and cap is not None and cap < 0:
                fallback.append(agent.id)
                continue
            where = f"rules.{i}" if spec.rules is not None else "rule"
            check_neighbourhood(rule, own, len(agent.neighbors), agent.id, where)
    warnings = topology_warnings(agents)
    if fallback:
        ids = sorted(set(fallback))
        warnings.append(
            f"{_count(ids, 'normal agent')} too few neighbours for {', '.join(spec.rule_names)} with "
            f"any f and keep their own model: {_list(ids)}"
        )
    rule_params = knobs.model_dump()
    plan = RunPlan(
        name=spec.name,
        task=spec.task,
        rules=spec.rule_names,
        rounds=spec.rounds,
        seed=spec.seed,
        rule_params=rule_params,
        agents=tuple(agents),
        fetch_timeout=spec.fetch_timeout,
        window=spec.window,
        warnings=tuple(warnings),
    )
    for w in plan.warnings:
        log.debug("plan %s: %s", spec.name, w)
    return plan


def _param_field(spec: Spec, agent: str, group: int | None, key: str) -> str:
    """Where a task parameter of ``agent`` came from, for error messages."""
    if agent in spec.overrides and key in spec.overrides[agent].task_params:
        return f"overrides.{agent}.task_params.{key}"
    if spec.groups is not None and group is not None and key in spec.groups[group].task_params:
        return f"groups.{group}.task_params.{key}"
    return f"task_params.{key}"


def _point(value: Any, field: str) -> tuple[float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    if ok:
        try:
            x, y = (float(v) for v in value)
        except (TypeError, ValueError):
            ok = False
        else:
            if all(np.isfinite((x, y))) and not any(isinstance(v, bool) for v in value):
                return (x, y)
            ok = False
    raise ConfigError(field, f"{value!r} is not a point", "give two numbers, e.g. [1.5, 0.3]")


def _graph(spec: Spec, ids: list[str], positions: list[tuple[float, float]] | None) -> graphs.Neighbourhoods:
    n = len(ids)
    index = {a: i for i, a in enumerate(ids)}
    g = spec.graph
    if isinstance(g, CompleteGraph):
        return graphs.complete(n)
    if isinstance(g, RingGraph):
        return graphs.ring(n, g.k)
    if isinstance(g, GeometricGraph):
        assert positions is not None
        rng = stream(spec.seed if g.seed is None else g.seed, GRAPH)
        return graphs.geometric(np.asarray(positions), g.radius, g.max_degree, rng)
    if isinstance(g, ErdosRenyiGraph):
        return graphs.erdos_renyi(n, g.p, stream(spec.seed if g.seed is None else g.seed, GRAPH))
    if isinstance(g, KRegularGraph):
        try:
            return graphs.k_regular(n, g.k, stream(spec.seed if g.seed is None else g.seed, GRAPH))
        except (ValueError, RuntimeError) as exc:
            raise ConfigError("graph.k", str(exc)) from None
    if isinstance(g, EdgesGraph):
        return graphs.from_edges(n, [(index[a], index[b]) for a, b in g.edges], g.directed)
    if isinstance(g, AdjacencyGraph):
        adj = {index[a]: [index[b] for b in nbrs] for a, nbrs in g.adjacency.items()}
        return graphs.from_adjacency(n, adj, g.directed)
    raise AssertionError(f"unhandled graph {g!r}")


def _byzantine(spec: Spec, ids: list[str]) -> set[str]:
    b = spec.byzantine
    if b is None:
        return set()
    if b.ids is not None:
        return set(b.ids)
    assert b.count is not None
    rng = stream(spec.seed if b.seed is None else b.seed, BYZANTINE)
    chosen = rng.choice(len(ids), size=b.count, replace=False)
    return {ids[int(i)] for i in chosen}


def topology_warnings(agents: list[AgentPlan] | tuple[AgentPlan, ...]) -> list[str]:
    """Human-readable notes on topologies that make an experiment say less than intended."""
    role = {a.id: a.role for a in agents}
    fetched_by: dict[str, int] = {a.id: 0 for a in agents}
    for a in agents:
        if a.role == "normal":
            for nb in a.neighbors:
                fetched_by[nb] += 1
    isolated = [a.id for a in agents if a.role == "normal" and not a.neighbors]
    surrounded = [
        a.id
        for a in agents
        if a.role == "normal" and a.neighbors and all(role[nb] == "byzantine" for nb in a.neighbors)
    ]
    # A Byzantine agent nobody fetches from and that fetches from nobody cannot attack anyone.
    idle = [a.id for a in agents if a.role == "byzantine" and fetched_by[a.id] == 0 and not a.neighbors]
    out = []
    if isolated:
        out.append(f"{_count(isolated, 'normal agent')} no neighbours and learn alone: {_list(isolated)}")
    if surrounded:
        out.append(f"{_count(surrounded, 'normal agent')} only Byzantine neighbours: {_list(surrounded)}")
    if idle:
        out.append(f"{_count(idle, 'Byzantine agent')} no links at all (no effect): {_list(idle)}")
    return out


def _count(ids: list[str], what: str) -> str:
    return f"1 {what} has" if len(ids) == 1 else f"{len(ids)} {what}s have"


def _list(ids: list[str], limit: int = 12) -> str:
    if len(ids) <= limit:
        return ", ".join(ids)
    return ", ".join(ids[:limit]) + f", ... ({len(ids)} in all)"


def _agent_rule_params(spec: Spec, agent: str, knobs: RuleParams) -> RuleParams:
    """The run's knobs with ``overrides.<agent>.rule_params`` over them, validated."""
    given = spec.overrides[agent].rule_params
    try:
        return RuleParams.model_validate({**knobs.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"overrides.{agent}.rule_params.{where}",
            f"{err['msg']} (got {err.get('input')!r})",
            f"rule parameters: {', '.join(sorted(RuleParams.model_fields))}",
        ) from None


def _rule_params(spec: Spec) -> RuleParams:
    """nu and ema_init (top-level, as in the paper) plus ``rule_params``, validated together."""
    data = {"nu": spec.nu, "ema_init": spec.ema_init, **spec.rule_params}
    try:
        return RuleParams.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        field = (
            where if where in ("nu", "ema_init") and where not in spec.rule_params else f"rule_params.{where}"
        )
        raise ConfigError(
            field,
            f"{err['msg']} (got {err.get('input')!r})",
            f"rule parameters: {', '.join(sorted(RuleParams.model_fields))}",
        ) from None
