"""Topology spec and planner: examples load, bad fields get clear errors, plans are deterministic."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError
from orchestrator.plan import RunPlan
from orchestrator.planner import plan_file, plan_topology
from orchestrator.spec import Spec, apply_overrides, load_topology, parse_spec

ROOT = Path(__file__).resolve().parents[2]
# Topology files; examples/sweep-*.yaml are sweep files (tests/unit/test_sweep_spec.py).
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("sweep-"))
BASE: dict[str, Any] = {"name": "t", "agents": 8}


def write(tmp_path: Path, data: dict[str, Any] | str) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict[str, Any] | str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        plan_topology(load_topology(write(tmp_path, data)))
    return info.value


def plan_of(**fields: Any) -> RunPlan:
    return plan_topology(parse_spec({**BASE, **fields}))


# ------------------------------------------------------------------------------------------ examples


def test_the_paper_examples_and_quickstart_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "quickstart",
        "target-localization-0",
        "target-localization-20",
        "target-localization-99",
    } <= names


@pytest.mark.parametrize("n", [0, 20, 99])
def test_paper_examples_give_five_agents_the_reference_direction_noise(n: int) -> None:
    """As the reference code: direction-noise std drawn in [0.01, 0.02] per agent, except five
    agents at 0.1 (docs/results.md, case study 1)."""
    from mtl_node.tasks import make_task

    plan = plan_topology(load_topology(ROOT / "examples" / f"target-localization-{n}.yaml"))
    stds = {}
    for agent in plan.agents:
        data = plan.node_config_data(agent, plan.rules[0])
        task = make_task(data["task"], agent.id, data["seed"], data["task_params"])
        stds[agent.id] = task.r.direction_noise_std  # type: ignore[attr-defined]
    noisy = sorted(a for a, std in stds.items() if std == 0.1)
    assert noisy == ["a26", "a30", "a50", "a61", "a81"]
    assert all(0.01 <= std <= 0.02 for a, std in stds.items() if a not in noisy)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads_plans_and_gives_valid_node_configs(path: Path) -> None:
    from mtl_node.attack_api import ATTACKS, load_plugins
    from mtl_node.config import build_config
    from mtl_node.tasks import TASKS

    spec = load_topology(path)
    plan = plan_topology(spec)
    assert len(plan.agents) == len(spec.agent_ids)
    assert plan.rules and all(r in catalog.RULE_NAMES for r in plan.rules)
    byz = [a for a in plan.agents if a.role == "byzantine"]
    if spec.byzantine is not None and spec.byzantine.count is not None:
        assert len(byz) == spec.byzantine.count
    load_plugins()
    for a in plan.agents:
        # what the planner resolved must be accepted by the agent's own validation
        cfg = build_config({**plan.node_config_data(a, plan.rules[0]), "neighbors": {}})
        TASKS.get(cfg.task).Params.model_validate(cfg.task_params)
        if a.attack:
            ATTACKS.get(a.attack).Params.model_validate(a.attack_params)
    assert RunPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@pytest.mark.parametrize("byzantine", [0, 20, 99])
def test_paper_examples_match_the_paper_setup(byzantine: int) -> None:
    plan = plan_file(ROOT / "examples" / f"target-localization-{byzantine}.yaml")
    assert len(plan.agents) == 100
    assert sum(a.role == "byzantine" for a in plan.agents) == byzantine
    assert set(plan.rules) == {"none", "average", "loss-filtered", "distance"}
    assert plan.rounds == 500
    assert plan.rule_params["nu"] == 0.1 and plan.rule_params["ema_init"] == 10.0
    for a in plan.agents:
        assert a.position is not None and all(0 <= c <= 3 for c in a.position)
        assert len(a.neighbors) <= 9
        for nb in a.neighbors:
            other = plan.agent(nb).position
            assert other is not None and math.dist(a.position, other) <= 1.0
        assert a.group is not None
        tx, ty = a.task_params["target"]
        base = ((10, 10), (10, 20), (20, 10), (20, 20))[a.group]
        assert base[0] <= tx <= base[0] + 1 and base[1] <= ty <= base[1] + 1
        if a.role == "byzantine":
            assert a.attack == "constant" and a.attack_params == {"low": 15.0, "high": 16.0}
    # four equal index groups, each sharing one target
    assert [sum(a.group == g for a in plan.agents) for g in range(4)] == [25, 25, 25, 25]
    assert len({tuple(a.task_params["target"]) for a in plan.agents}) == 4


def test_quickstart_runs_end_to_end_with_the_constant_attack() -> None:
    """The paper's claim on the quickstart topology: averaging follows the attackers, the filter does not."""
    from mtl_node.config import build_config
    from mtl_node.engine import IN_PROCESS, run_agents

    spec = load_topology(ROOT / "examples" / "quickstart.yaml")
    plan = plan_topology(Spec.model_validate({**spec.model_dump(), "rounds": 40}))
    assert sum(a.role == "byzantine" for a in plan.agents) >= 1
    final: dict[str, float] = {}
    for rule in ("average", "loss-filtered", "none"):
        configs = [
            build_config(
                {**plan.node_config_data(a, rule), "neighbors": {n: IN_PROCESS for n in a.neighbors}}
            )
            for a in plan.agents
        ]
        records = run_agents(configs)
        final[rule] = statistics.mean(records[a].records[-1].metrics.loss for a in plan.normal_ids)
    assert final["loss-filtered"] < final["average"] / 10
    assert final["loss-filtered"] < 2 * final["none"] + 1.0


# ---------------------------------------------------------------------------------------- bad fields


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"rule": "median-of-doom"}, "rule", ["unknown rule 'median-of-doom'", "loss-filtered", "average"]),
        ({"rules": ["none", "nope"]}, "rules.1", ["unknown rule 'nope'", "loss-filtered"]),
        ({"rules": ["none", "none"]}, "rules", ["twice"]),
        ({"rule": "none", "rules": ["average"]}, "rule", ["both"]),
        ({"graph": {"kind": "hypercube"}}, "graph.kind", ["unknown graph kind 'hypercube'", "geometric"]),
        ({"graph": {"radius": 1}}, "graph.kind", ["no graph kind", "complete"]),
        ({"graph": {"kind": "geometric", "radius": -1}}, "graph.radius", ["greater than 0", "-1"]),
        ({"graph": {"kind": "geometric"}}, "graph.radius", ["missing", "max_degree"]),
        ({"graph": {"kind": "geometric", "radius": 1, "range": 2}}, "graph.range", ["unknown", "radius"]),
        ({"graph": {"kind": "erdos-renyi", "p": 1.5}}, "graph.p", ["less than or equal to 1"]),
        ({"graph": {"kind": "erdos-renyi", "p": -0.1}}, "graph.p", ["greater than or equal to 0"]),
        ({"graph": {"kind": "ring", "k": 0}}, "graph.k", ["greater than or equal to 1"]),
        ({"graph": {"kind": "k-regular", "k": 3}, "agents": 7}, "graph.k", ["odd", "even"]),
        ({"graph": {"kind": "k-regular", "k": 8}}, "graph.k", ["k < 8"]),
        ({"graph": {"kind": "edges", "edges": [["a0", "zz"]]}}, "graph.edges.0.1", ["unknown agent 'zz'"]),
        ({"graph": {"kind": "edges", "edges": [["a1", "a1"]]}}, "graph.edges.0", ["itself"]),
        ({"graph": {"kind": "adjacency", "adjacency": {"q": []}}}, "graph.adjacency.q", ["unknown agent"]),
        ({"byzantine": {"count": 9}}, "byzantine.count", ["9 Byzantine agents among 8", "at most 7"]),
        ({"byzantine": {"count": -1}}, "byzantine.count", ["greater than or equal to 0"]),
        ({"byzantine": {"ids": ["a1", "b7"]}}, "byzantine.ids.1", ["unknown agent 'b7'", "a0"]),
        ({"byzantine": {"count": 1, "ids": ["a1"]}}, "byzantine", ["exactly one of count or ids"]),
        (
            {"byzantine": {"count": 1, "attack": "gremlin"}},
            "byzantine.attack",
            ["unknown attack", "constant"],
        ),
        ({"overrides": {"a99": {"device": "cpu"}}}, "overrides.a99", ["unknown agent 'a99'", "a0"]),
        ({"overrides": {"a3": {"device": "tpu"}}}, "overrides.a3.device", ["cpu, cuda or cuda:N"]),
        ({"overrides": {"a3": {"gpu": 1}}}, "overrides.a3.gpu", ["unknown field", "device", "host"]),
        ({"colour": "red"}, "colour", ["unknown field", "agents", "graph", "byzantine", "rules"]),
        ({"agents": 0}, "agents", ["between 1 and"]),
        ({"agents": True}, "agents", ["count or a list"]),
        ({"agents": ["a", "b", "a"]}, "agents", ["twice"]),
        ({"agents": ["ok", "not ok"]}, "agents", ["item 1", "not a valid agent id"]),
        ({"task": "juggling"}, "task", ["unknown task 'juggling'", "target-localization"]),
        ({"nu": 0}, "nu", ["greater than 0"]),
        ({"rounds": 0}, "rounds", ["greater than or equal to 1"]),
        ({"window": 1.5}, "window", ["less than or equal to 1"]),
        ({"learning_rate": 0.2, "task_params": {"mu": 0.3}}, "learning_rate", ["task_params.mu"]),
        ({"groups": [{"agents": 3}, {"agents": 3}]}, "groups", ["2 agents are in no group", "a6, a7"]),
        ({"groups": [{"agents": ["a1"]}, {"agents": ["a1"]}]}, "groups.1.agents", ["already in group 0"]),
        ({"groups": [{"agents": 10}]}, "groups.0.agents", ["only 8"]),
        ({"groups": [{"agents": 8, "colour": 1}]}, "groups.0.colour", ["unknown field", "task_params"]),
        ({"task_params": {"position": "here"}}, "task_params.position", ["not a point"]),
    ],
)
def test_bad_field_names_the_field_and_what_is_allowed(
    tmp_path: Path, fields: dict[str, Any], where: str, says: list[str]
) -> None:
    err = error_of(tmp_path, {**BASE, **fields})
    assert err.field == where, str(err)
    for s in says:
        assert s in str(err), f"{s!r} not in {err}"
    assert "\n" not in str(err)


def test_unknown_top_level_field_lists_every_allowed_field(tmp_path: Path) -> None:
    err = error_of(tmp_path, {**BASE, "rulez": ["none"]})
    for f in Spec.model_fields:
        assert f in str(err)


def test_missing_required_field(tmp_path: Path) -> None:
    err = error_of(tmp_path, {"name": "t"})
    assert err.field == "agents"
    assert "missing" in str(err)


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    err = error_of(tmp_path, "- a\n- b\n")
    assert err.field == "topology"
    assert "topology.yaml" in str(err) and "mapping" in str(err)


def test_empty_file_is_not_a_mapping(tmp_path: Path) -> None:
    err = error_of(tmp_path, "")
    assert "topology.yaml" in str(err) and "mapping" in str(err)


def test_invalid_yaml(tmp_path: Path) -> None:
    err = error_of(tmp_path, "name: t\nagents: [1, 2\n")
    assert err.field == "topology"
    assert "topology.yaml" in str(err) and "not valid YAML" in str(err) and "line" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_topology(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ planning


def test_same_seed_same_plan_and_other_seed_other_positions() -> None:
    spec = {"graph": {"kind": "geometric", "radius": 1.0, "max_degree": 5}, "byzantine": {"count": 2}}
    a = plan_of(agents=40, seed=3, **spec)
    b = plan_of(agents=40, seed=3, **spec)
    c = plan_of(agents=40, seed=4, **spec)
    assert a == b
    assert [x.position for x in a.agents] != [x.position for x in c.agents]
    assert [x.task_params["target"] for x in a.agents] != [x.task_params["target"] for x in c.agents]


def test_byzantine_seed_changes_only_who_is_byzantine() -> None:
    a = plan_of(agents=30, byzantine={"count": 5, "seed": 1})
    b = plan_of(agents=30, byzantine={"count": 5, "seed": 2})
    assert [x.position for x in a.agents] == [x.position for x in b.agents]
    assert [x.neighbors for x in a.agents] == [x.neighbors for x in b.agents]
    assert {x.id for x in a.agents if x.role == "byzantine"} != {
        x.id for x in b.agents if x.role == "byzantine"
    }


def test_ids_are_zero_padded_and_neighbours_in_index_order() -> None:
    plan = plan_of(agents=100, graph={"kind": "erdos-renyi", "p": 0.2})
    assert plan.agents[0].id == "a00" and plan.agents[-1].id == "a99"
    order = {a.id: i for i, a in enumerate(plan.agents)}
    for a in plan.agents:
        assert a.id not in a.neighbors
        assert [order[n] for n in a.neighbors] == sorted(order[n] for n in a.neighbors)


def test_explicit_ids_and_edges() -> None:
    plan = plan_of(
        agents=["x", "y", "z"], graph={"kind": "edges", "edges": [["x", "y"], ["z", "y"]], "directed": True}
    )
    assert [a.neighbors for a in plan.agents] == [(), ("x", "z"), ()]


def test_explicit_byzantine_ids_get_the_attack() -> None:
    plan = plan_of(byzantine={"ids": ["a2", "a5"], "attack_params": {"low": 1.0, "high": 2.0}})
    for a in plan.agents:
        if a.id in ("a2", "a5"):
            assert (a.role, a.attack, a.attack_params) == ("byzantine", "constant", {"low": 1.0, "high": 2.0})
        else:
            assert (a.role, a.attack, a.attack_params) == ("normal", None, {})


def test_parameters_layer_all_then_group_then_override() -> None:
    plan = plan_of(
        learning_rate=0.05,
        task_params={"noise_std": 0.1},
        groups=[
            {"name": "near", "agents": 4, "task_params": {"target": [1, 1], "noise_std": 0.2}},
            {"agents": ["a7", "a4", "a5", "a6"]},
        ],
        overrides={"a1": {"device": "cuda:1", "host": "node7", "task_params": {"mu": 0.5}}},
        device="cpu",
    )
    a0, a1, a5 = plan.agent("a0"), plan.agent("a1"), plan.agent("a5")
    assert a0.task_params["mu"] == 0.05 and a0.task_params["noise_std"] == 0.2
    assert a0.task_params["target"] == [1, 1] and a0.group == 0
    assert a1.task_params["mu"] == 0.5 and a1.device == "cuda:1" and a1.host == "node7"
    assert a0.device == "cpu" and a0.host is None
    assert a5.group == 1 and a5.task_params["noise_std"] == 0.1
    # group 1 gives no target: it gets the paper's (jittered) second target
    tx, ty = a5.task_params["target"]
    assert 10 <= tx <= 11 and 20 <= ty <= 21


def test_given_position_is_used_for_the_graph_and_moves_nobody_else() -> None:
    graph = {"kind": "geometric", "radius": 0.5}
    free = plan_of(agents=10, graph=graph)
    pinned = plan_of(agents=10, graph=graph, overrides={"a3": {"task_params": {"position": [10, 10]}}})
    assert pinned.agent("a3").position == (10.0, 10.0)
    assert pinned.agent("a3").task_params["position"] == [10.0, 10.0]
    assert pinned.agent("a3").neighbors == ()
    for f, p in zip(free.agents, pinned.agents, strict=True):
        if f.id != "a3":
            assert f.position == p.position


def test_other_tasks_get_no_positions_unless_the_graph_needs_them() -> None:
    plain = plan_of(task="mypkg.tasks:make", graph={"kind": "ring", "k": 1}, learning_rate=0.01)
    assert all(a.position is None and "position" not in a.task_params for a in plain.agents)
    assert plain.agent("a0").task_params == {"lr": 0.01}
    assert plain.agent("a0").neighbors == ("a1", "a7")
    geo = plan_of(task="mypkg.tasks:make", graph={"kind": "geometric", "radius": 1, "area": 2})
    assert all(a.position is not None and max(a.position) <= 2 for a in geo.agents)
    assert all("position" not in a.task_params for a in geo.agents)


def test_single_rule_default_and_rule_params() -> None:
    plan = plan_of(nu=0.3, ema_init=None, fetch_timeout=5, window=0.5)
    assert plan.rules == ("loss-filtered",)
    assert plan.rule_params["nu"] == 0.3 and plan.rule_params["ema_init"] is None
    assert (plan.fetch_timeout, plan.window) == (5.0, 0.5)
    assert plan_of(rule="average").rules == ("average",)


def test_warns_about_isolated_agent() -> None:
    plan = plan_of(
        agents=4, graph={"kind": "edges", "edges": [["a0", "a1"], ["a1", "a2"]]}, byzantine={"ids": ["a2"]}
    )
    assert any("no neighbours" in w and "a3" in w for w in plan.warnings), plan.warnings
    assert not any("a0" in w or "a1" in w for w in plan.warnings), plan.warnings


def test_warns_about_normal_agent_surrounded_by_byzantines() -> None:
    plan = plan_of(
        agents=5,
        graph={"kind": "adjacency", "adjacency": {"a0": ["a1", "a2"], "a3": ["a1", "a4"], "a4": ["a3"]}},
        byzantine={"ids": ["a1", "a2"]},
    )
    surrounded = [w for w in plan.warnings if "only Byzantine" in w]
    assert len(surrounded) == 1 and "a0" in surrounded[0]
    assert "a3" not in surrounded[0] and "a4" not in surrounded[0]


def test_no_warnings_on_a_healthy_topology() -> None:
    assert plan_of(graph={"kind": "ring", "k": 2}, byzantine={"count": 1}).warnings == ()


def test_plan_json_round_trip(tmp_path: Path) -> None:
    plan = plan_of(graph={"kind": "geometric", "radius": 1.5, "max_degree": 4}, byzantine={"count": 2})
    plan.save(tmp_path / "plan.json")
    assert RunPlan.load(tmp_path / "plan.json") == plan


def test_command_line_overrides_keep_everything_else() -> None:
    spec = parse_spec(
        {
            **BASE,
            "graph": {"kind": "edges", "edges": [["a0", "a1"], ["a2", "a3"]]},
            "groups": [
                {"agents": 4, "task_params": {"noise_std": 0.3}},
                {"agents": ["a4", "a5", "a6", "a7"]},
            ],
            "byzantine": {"ids": ["a3"]},
            "overrides": {"a1": {"host": "n1"}},
            "rule": "average",
        }
    )
    assert apply_overrides(spec) is spec
    changed = apply_overrides(spec, seed=7, rounds=12, rules=["none", "loss-filtered"])
    assert (changed.seed, changed.rounds, changed.rule_names) == (7, 12, ("none", "loss-filtered"))
    assert changed.model_dump(exclude={"seed", "rounds", "rule", "rules"}) == spec.model_dump(
        exclude={"seed", "rounds", "rule", "rules"}
    )
    assert [a.neighbors for a in plan_topology(changed).agents] == [
        a.neighbors for a in plan_topology(spec).agents
    ]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"rules": ["nope"]}, "--rule"), ({"rounds": 0}, "--rounds"), ({"seed": -2}, "--seed")],
)
def test_command_line_override_errors_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(parse_spec(BASE), **kwargs)
    assert info.value.field == flag


# ------------------------------------------------------------------------------------------ no torch


def test_planning_and_rendering_modules_do_not_import_torch(tmp_path: Path) -> None:
    example = ROOT / "examples" / "target-localization-20.yaml"
    code = textwrap.dedent(
        f"""
        import sys
        import orchestrator.spec, orchestrator.plan, orchestrator.graphs, orchestrator.planner
        orchestrator.planner.plan_file({str(example)!r})
        assert 'torch' not in sys.modules, 'torch was imported'
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_rule_params_reach_the_plan_and_the_robust_checks() -> None:
    plan = plan_of(rules=["krum"], rule_params={"f": 0}, graph={"kind": "ring", "k": 1}, agents=6)
    assert plan.rule_params["f"] == 0
    with pytest.raises(ConfigError, match=r"^rules\.0: krum with f=1"):
        plan_of(rules=["krum"], rule_params={"f": 1}, graph={"kind": "ring", "k": 1}, agents=6)
    with pytest.raises(ConfigError, match=r"^rule_params\.bogus: "):
        plan_of(rule_params={"bogus": 1})
