"""Sweep spec: examples load, bad fields get one-line errors naming the field and the fix, cells
expand in a stable order with stable ids, and each cell is a valid topology."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError
from orchestrator.planner import plan_topology
from orchestrator.spec import parse_spec
from orchestrator.sweep.spec import NO_ATTACK, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "examples").glob("sweep-*.yaml"))
BASE: dict[str, Any] = {
    "name": "s",
    "tasks": [{"task": "target-localization"}],
    "topologies": [{"agents": 8, "graph": "complete"}],
    "rules": ["none", "loss-filtered"],
    "attacks": ["constant", {"attack": "sign-flip", "name": "flip"}],
    "fractions": [0.0, 0.25],
    "seeds": 2,
    "rounds": 10,
}


def error_of(**changes: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_sweep({**BASE, **changes})
    return info.value


def test_examples_exist_and_load() -> None:
    assert SWEEPS, "examples/sweep-*.yaml"
    for path in SWEEPS:
        spec = load_sweep(path)
        assert spec.cells()


def test_unknown_rule_lists_the_valid_rules() -> None:
    err = error_of(rules=["none", "avrage"])
    assert err.field == "rules.1"
    assert "avrage" in str(err)
    for name in catalog.RULE_NAMES:
        assert name in str(err)


def test_unknown_attack_lists_the_valid_attacks() -> None:
    err = error_of(attacks=["constant", {"attack": "sign-flap"}])
    assert err.field == "attacks.1.attack"
    for name in catalog.ATTACK_NAMES:
        assert name in str(err)


def test_unknown_task_lists_the_valid_tasks() -> None:
    err = error_of(tasks=["har", {"task": "mnist"}])
    assert err.field == "tasks.1.task"
    for name in catalog.TASK_NAMES:
        assert name in str(err)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"rounds": 0}, "rounds", "greater than or equal to 1"),
        ({"fractions": [0.0, 1.0]}, "fractions.1", "[0, 1)"),
        ({"fractions": [0.0, 0.01]}, "fractions.1", "no Byzantine agent"),
        ({"seeds": 0}, "seeds", "at least 1"),
        ({"rules": ["none", "none"]}, "rules", "listed twice"),
        ({"attacks": [], "fractions": [0.0, 0.5]}, "attacks", "need attacks"),
        ({"topologies": [{"agents": 8, "graph": {"kind": "rnig"}}]}, "topologies.0.graph.kind", "ring"),
        ({"topologies": [{"agents": 8, "graph": {"kind": "ring", "kk": 1}}]}, "topologies.0.graph.kk", "k"),
        ({"topologies": [{"agents": 8, "grahp": "ring"}]}, "topologies.0.grahp", "valid fields"),
        ({"tasks": [{"task": "har", "metric": "acc"}]}, "tasks.0.metric", "test_accuracy"),
        ({"colour": 1}, "colour", "valid fields"),
    ],
)
def test_bad_fields_name_the_field(changes: dict[str, Any], field: str, words: str) -> None:
    err = error_of(**changes)
    assert err.field == field, str(err)
    assert words in str(err)
    assert "\n" not in str(err)


def test_plan_time_problems_fail_at_load_naming_the_topology() -> None:
    # krum needs 2f+3 = 5 members; a ring with k=1 gives 3.
    err = error_of(rules=["krum"], topologies=[{"agents": 8, "graph": {"kind": "ring", "k": 1}}])
    assert err.field.startswith("rules.0"), str(err)
    assert "krum" in str(err)


def test_cells_expand_the_grid_with_stable_ids() -> None:
    spec = parse_sweep(BASE)
    cells = spec.cells()
    # per seed: fraction 0 (no attack) x 2 rules + 2 attacks x 1 fraction x 2 rules
    assert len(cells) == 2 * (2 + 2 * 2)
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids)
    assert ids == [c.id for c in parse_sweep(BASE).cells()]
    assert {c.attack_label for c in cells if c.fraction == 0} == {NO_ATTACK}
    assert {c.attack_label for c in cells if c.fraction > 0} == {"constant", "flip"}
    # Widening the grid keeps every existing cell's id (resume reuses them).
    wider = parse_sweep({**BASE, "seeds": 3, "attacks": [*BASE["attacks"], "echo"]})
    assert set(ids) < {c.id for c in wider.cells()}
    # Anything that changes the numbers changes the id.
    assert not set(ids) & {c.id for c in parse_sweep({**BASE, "rounds": 11}).cells()}


def test_each_cell_is_a_topology_with_its_byzantine_count() -> None:
    spec = parse_sweep(BASE)
    for cell in spec.cells():
        plan = plan_topology(parse_spec(cell.topology_spec()))
        assert plan.rules == (cell.rule,)
        assert plan.seed == cell.seed
        byz = [a for a in plan.agents if a.role == "byzantine"]
        assert len(byz) == (2 if cell.fraction == 0.25 else 0)
        if byz:
            assert cell.attack is not None
            assert {a.attack for a in byz} == {cell.attack.attack}


def test_sweep_validation_does_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    code = (
        "import sys\n"
        "from orchestrator.sweep.spec import load_sweep\n"
        "import orchestrator.sweep.runner, orchestrator.sweep.report\n"
        f"print(len(load_sweep({str(path)!r}).cells()))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "12"


def test_cli_bad_sweep_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "rules": ["none", "avrage"]}))
    bin_ = Path(sys.executable).parent / "mtl-orchestrate"
    out = subprocess.run(
        [str(bin_), "sweep", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert "rules.1: unknown rule 'avrage'" in out.stderr
    out = subprocess.run(
        [str(bin_), "sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "dask"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--executor: unknown executor 'dask'" in out.stderr and "local, ray" in out.stderr


def test_agent_rule_params_override_reaches_only_that_agent() -> None:
    plan = plan_topology(
        parse_spec(
            {
                "name": "t",
                "agents": 6,
                "graph": "complete",
                "rule": "median",
                "overrides": {"a2": {"rule_params": {"f": 2}}},
            }
        )
    )
    configs = {a.id: plan.node_config_data(a, "median")["rule_params"] for a in plan.agents}
    assert configs["a2"]["f"] == 2
    assert {configs[a]["f"] for a in configs if a != "a2"} == {1}
    with pytest.raises(ConfigError) as info:
        parse_spec_and_plan({"overrides": {"a2": {"rule_params": {"f": -1}}}})
    assert info.value.field == "overrides.a2.rule_params.f"
    # The assumption is checked with the agent's own f: 3 members admit f = 1, not 2.
    with pytest.raises(ConfigError) as info:
        parse_spec_and_plan(
            {"graph": {"kind": "ring", "k": 1}, "overrides": {"a2": {"rule_params": {"f": 2}}}}
        )
    assert "agent a2" in str(info.value)


def parse_spec_and_plan(changes: dict[str, Any]) -> Any:
    return plan_topology(
        parse_spec({"name": "t", "agents": 6, "graph": "complete", "rule": "median", **changes})
    )


def test_f_auto_gives_each_agent_its_true_byzantine_count_capped() -> None:
    from mtl_node.aggregation.robust import max_f

    data = {
        **BASE,
        "tasks": [{"task": "target-localization", "rule_params": {"f": "auto"}}],
        "topologies": [{"agents": 12, "graph": {"kind": "ring", "k": 2}}],
        "rules": ["krum", "median"],
        "fractions": [0.0, 0.5],
    }
    cells = parse_sweep(data).cells()
    seen = set()
    for cell in cells:
        plan = plan_topology(parse_spec(cell.topology_spec()))
        bad = {a.id for a in plan.agents if a.role == "byzantine"}
        for a in plan.agents:
            f = plan.node_config_data(a, cell.rule)["rule_params"]["f"]
            cap = max_f(cell.rule, len(a.neighbors) + 1)
            assert f == max(0, min(sum(n in bad for n in a.neighbors), cap))
            seen.add(f)
    assert seen == {0, 1, 2}  # ring k=2: 5 members admit krum f=1, median f=2


def test_an_agent_whose_neighbourhood_admits_no_f_falls_back_with_a_warning() -> None:
    # One link: a0 and a1 have 2 members, the rest 1; krum needs 2f+3 >= 3. Without an own f: an error.
    graph = {"kind": "edges", "edges": [["a0", "a1"]]}
    with pytest.raises(ConfigError):
        parse_spec_and_plan({"graph": graph, "rule": "krum"})
    overrides = {f"a{i}": {"rule_params": {"f": 0}} for i in range(6)}
    plan = parse_spec_and_plan({"graph": graph, "rule": "krum", "overrides": overrides})
    assert any("keep their own model" in w and "a0" in w for w in plan.warnings)
    # An f: auto sweep over such a graph plans (and runs: the rule keeps the agent's own model).
    data = {
        **BASE,
        "tasks": [{"task": "target-localization", "rule_params": {"f": "auto"}}],
        "topologies": [{"agents": 6, "graph": graph}],
        "rules": ["none", "krum"],
    }
    assert parse_sweep(data).cells()


def test_the_robustness_sweep_file_is_what_the_benchmark_generates(tmp_path: Path) -> None:
    """benchmarks/robustness.py is a thin caller of the sweep; its grid is examples/sweep-robustness.yaml."""
    out = tmp_path / "sweep-robustness.yaml"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--write-sweep", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (ROOT / "examples" / "sweep-robustness.yaml").read_text()
    spec = load_sweep(out)
    assert len(spec.cells()) == 4 * 3 * (10 + 13 * 4 * 10)


def test_rows_carry_attack_success_and_label_the_omniscient_attack(tmp_path: Path) -> None:
    """A cell record's attack_success (the backdoor trigger's rate, where the task measures it)
    lands in results.csv next to the cell's metric; an omniscient adaptive attack is labelled."""
    from orchestrator.sweep.store import read_csv, rows, write_tables

    spec = parse_sweep(
        {**BASE, "attacks": [{"attack": "adaptive", "params": {"omniscient": True}}], "seeds": 1}
    )
    cells = spec.cells()
    assert {c.attack_label for c in cells if c.fraction > 0} == {"adaptive (omniscient)"}
    records: dict[str, dict[str, Any]] = {}
    for k, cell in enumerate(cells):
        normal = 8 - cell.byzantine
        records[cell.id] = {
            "id": cell.id,
            "agents": [f"a{i}" for i in range(normal)],
            "final": [1.0 + k] * normal,
        }
        if k % 2:
            records[cell.id]["attack_success"] = [0.1 * k] * normal
    table = rows(cells, records)
    write_tables(tmp_path, table)
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == len(table)
    for row, want in zip(back, table, strict=True):
        assert row["attack_success"] == want["attack_success"]
    assert {r["attack_success"] is None for r in back} == {True, False}
