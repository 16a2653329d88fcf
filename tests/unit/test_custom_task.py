"""Custom tasks by import path (``module:factory``): the example plugin end to end, a Task subclass
plugin, and every way of getting it wrong giving a ConfigError on ``task`` that says what is wrong."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtl_node.cli import app
from mtl_node.config import build_config
from mtl_node.core.errors import ConfigError
from mtl_node.engine import run_agents
from mtl_node.tasks import TASKS, make_task
from mtl_node.tasks.plugin import FactoryTask, _load
from orchestrator.planner import plan_topology
from orchestrator.spec import load_topology

ROOT = Path(__file__).parent.parent.parent
EXAMPLE = "examples.custom_task:make_task"


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for throwaway plugin modules; the loader's cache is cleared around it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _load.cache_clear()
    yield tmp_path
    _load.cache_clear()
    for name in [m for m in sys.modules if m.startswith("plug_")]:
        del sys.modules[name]


def write(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def from_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example is imported as ``examples.custom_task``, i.e. from the repository root."""
    monkeypatch.chdir(ROOT)
    _load.cache_clear()


def test_example_plugin_builds_and_learns(from_root: None) -> None:
    task = make_task(EXAMPLE, "a0", 0, {"options": {"angle": 90, "samples": 64}, "lr": 0.01})
    assert isinstance(task, FactoryTask) and task.name == EXAMPLE
    assert len(task.train) == 64 and len(task.test) == 500
    model = task.init_model()
    first = task.evaluate(model, 1)
    for r in range(1, 200):
        model = task.adapt(model, r)
    last = task.evaluate(model, 200)
    assert first.test_accuracy is not None and last.test_accuracy is not None
    assert last.test_accuracy > max(first.test_accuracy, 0.75)


def test_example_topology_runs_in_process(from_root: None) -> None:
    """The example YAML plans (groups, Byzantine agent, options) and its configs run a few rounds."""
    plan = plan_topology(load_topology(ROOT / "examples" / "custom-task.yaml"))
    assert plan.task == EXAMPLE
    assert {a.task_params["options"]["angle"] for a in plan.agents} == {0, 90}
    configs = []
    for agent in plan.agents:
        data = plan.node_config_data(agent, "loss-filtered")
        data["rounds"] = 5  # eval_every: 5 in the example
        data["neighbors"] = {n: "inproc:0" for n in agent.neighbors}
        configs.append(build_config(data))
    records = run_agents(configs)
    normal = [a.id for a in plan.agents if a.role == "normal"]
    assert all(len(records[a].records) == 5 for a in normal)
    assert all(records[a].records[-1].metrics.test_accuracy is not None for a in normal)


def test_vectorized_scoring_equals_one_by_one(from_root: None) -> None:
    params = {"options": {"samples": 50}, "init": "agent"}
    fast = make_task(EXAMPLE, "a0", 0, params)
    slow = make_task(EXAMPLE, "a0", 0, {**params, "vectorized_scoring": False})
    models = [make_task(EXAMPLE, f"n{i}", 0, params).init_model() for i in range(4)]
    fast.adapt(models[0], 1)
    slow.adapt(models[0], 1)
    np.testing.assert_allclose(fast.losses(models, 1), slow.losses(models, 1), rtol=1e-5)


def test_task_subclass_plugin(plugins: Path) -> None:
    write(
        plugins,
        "plug_sub",
        """
        import torch
        from pydantic import BaseModel, ConfigDict
        from mtl_node.tasks import Metrics, Task

        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            target: float = 3.0

        class Scalar(Task):
            Params = Params
            def init_model(self):
                return {"w": torch.zeros(1)}
            def adapt(self, model, round_):
                return {"w": model["w"] + 0.5 * (self.params.target - model["w"])}
            def losses(self, models, round_):
                return [float((m["w"] - self.params.target) ** 2) for m in models]
            def evaluate(self, model, round_):
                return Metrics(loss=self.losses([model], round_)[0])
        """,
    )
    task = make_task("plug_sub:Scalar", "a", 0, {"target": 2.0})
    assert task.losses([task.adapt(task.init_model(), 1)], 1) == [1.0]
    with pytest.raises(ConfigError, match=r"task_params\.nope"):
        make_task("plug_sub:Scalar", "a", 0, {"nope": 1})


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        ("", "plug_missing_module_x:f", "cannot import 'plug_missing_module_x': no module named"),
        (
            "def g(ctx, options): pass\n",
            "plug_a:f",
            "module 'plug_a' has no attribute 'f' (callables there: g)",
        ),
        ("f = 3\n", "plug_b:f", "plug_b:f is not callable (it is int)"),
        ("def f(ctx): pass\n", "plug_c:f", "must accept (ctx, options): f(ctx) does not"),
        ("class f: pass\n", "plug_d:f", "plug_d:f is class f"),
        ("raise RuntimeError('boom')\n", "plug_e:f", "importing 'plug_e' failed: RuntimeError: boom"),
        ("import plug_nowhere_y\n", "plug_g:f", "no module named 'plug_nowhere_y'"),
    ],
)
def test_bad_imports_are_config_errors(plugins: Path, source: str, spec: str, message: str) -> None:
    if source:
        write(plugins, spec.split(":")[0], source)
    with pytest.raises(ConfigError) as err:
        TASKS.get(spec, field="task")
    assert err.value.field == "task"
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return 42", "returned int, expected mtl_node.tasks.TaskDefinition"),
        ("raise ValueError('no data for ' + ctx.agent_id)", "failed: ValueError: no data for a0"),
        (
            "return TaskDefinition(model=lambda: 5, train=DATA)",
            "model() returned int, expected a torch nn.Module",
        ),
        ("return TaskDefinition(model=MODEL, train=(DATA[0], DATA[1][:3]))", "TaskDefinition.train must be"),
        ("return TaskDefinition(model=MODEL, train=DATA, test='x')", "TaskDefinition.test must be"),
    ],
)
def test_bad_factories_are_config_errors(plugins: Path, body: str, message: str) -> None:
    write(
        plugins,
        "plug_f",
        f"""
        import torch
        from mtl_node.tasks import TaskDefinition
        DATA = (torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
        MODEL = lambda: torch.nn.Linear(2, 2)
        def f(ctx, options):
            {body}
        """,
    )
    with pytest.raises(ConfigError) as err:
        make_task("plug_f:f", "a0", 0, {})
    assert err.value.field == "task"
    assert message in str(err.value)


def test_unknown_training_knob_is_named(from_root: None) -> None:
    with pytest.raises(ConfigError, match=r"task_params.learning_rate.*parameters of task"):
        make_task(EXAMPLE, "a0", 0, {"learning_rate": 0.1})


def test_config_and_cli_report_bad_plugins(plugins: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task: cannot import 'plug_nothing_here'"):
        build_config({"id": "a", "task": "plug_nothing_here:f"})
    result = CliRunner().invoke(app, ["serve", "--id", "a", "--task", "plug_nothing_here:f"])
    assert result.exit_code == 2
    assert "cannot import 'plug_nothing_here'" in result.output
    assert "Traceback" not in result.output
