"""The torch batched engine (mtl_node.batched.torch_engine) against the per-agent engine (the oracle).

HAR, digits and a custom ``module:factory`` task on small networks: per-round metrics and every
decision (kind, weight, EMA, loss, reason) equal the per-agent engine's within 1e-5 relative. Why
not exactly: the models are float32, and the batched engine computes logits and losses with batched
calls (vmap over agents and neighbour slots, or one call per model over several agents' batches)
whose sums run in a different order than one agent's own calls, so values differ in the last bits of
a float32 (relative 1e-7) and those differences may grow a little over rounds; 1e-5 leaves room for
that and still catches any real difference (a wrong batch, a wrong weight or a wrong slot changes
values in the second or third digit). Decisions (accepted / filtered / missing) must be equal
exactly.

Adam on the CNN is the exception once models are combined: its first step moves every parameter by
about ``lr * sign(g)``, so a gradient component that is nearly zero and whose sign a last-bit
difference of the model decides (the combination sums in another order, and loss-based weights
come from scores computed in other batch layouts, so the combined model can be one ulp off) ends up
2 lr apart in the two engines; the tests there check equal decisions and metrics within
``ADAM_REL`` over a few rounds (docs/performance.md has the drift over longer runs). With rule none
the CNN's local steps are the agents' own operations, so Adam runs equal too.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mtl_node.batched import torch_engine
from mtl_node.config import NodeConfig, build_config
from mtl_node.engine import run_agents
from mtl_node.recorder import RoundRecord
from mtl_node.tasks.plugin import _load

ROOT = Path(__file__).parent.parent.parent
EXAMPLE = "examples.custom_task:make_task"

REL = 1e-5
ABS = 1e-6  # for values near 0 (an accuracy of 0, a loss of a perfect fit)
ADAM_REL = 1e-3  # Adam on the CNN with loss-based weights (see above)


def configs(
    rule: str,
    *,
    agents: int = 6,
    rounds: int = 5,
    byzantine: dict[str, tuple[str, dict[str, Any]]] | None = None,
    task_params: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    nu: float = 0.1,
) -> list[NodeConfig]:
    """A complete graph of HAR agents (generator data, 40 samples each), like the example config."""
    ids = [f"a{k}" for k in range(agents)]
    out = []
    for k, a in enumerate(ids):
        params = {"subject": k + 1, "samples": 40 + 7 * k, "batch_size": 4, "lr": 0.05}
        params.update(task_params or {})
        params.update((overrides or {}).get(a, {}))
        data: dict[str, Any] = {
            "id": a,
            "task": "har",
            "rule": rule,
            "rounds": rounds,
            "seed": 7,
            "neighbors": {n: "inproc:0" for n in ids if n != a},
            "task_params": params,
            "rule_params": {"nu": nu, "ema_init": 1.0},
        }
        if byzantine and a in byzantine:
            data["attack"], data["attack_params"] = byzantine[a]
        out.append(build_config(data))
    return out


def close(x: float | None, y: float | None, rel: float = REL) -> bool:
    if x is None or y is None:
        return x is y
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=rel, abs_tol=ABS)


def assert_same(cfgs: list[NodeConfig], rel: float = REL) -> None:
    oracle = {a: r.records for a, r in run_agents(cfgs).items()}
    fast = torch_engine.run_torch_batched(cfgs)
    assert set(fast) == set(oracle)
    for agent, want in oracle.items():
        got: list[RoundRecord] = fast[agent]
        assert [r.round for r in got] == [r.round for r in want]
        for g, w in zip(got, want, strict=True):
            where = (agent, w.round)
            assert (g.accepted, g.filtered, g.missing) == (w.accepted, w.filtered, w.missing), where
            for f in ("loss", "test_loss", "test_accuracy", "attack_success"):
                assert close(getattr(g.metrics, f), getattr(w.metrics, f), rel), (
                    where,
                    f,
                    g.metrics,
                    w.metrics,
                )
            assert [d.agent_id for d in g.decisions] == [d.agent_id for d in w.decisions], where
            for dg, dw in zip(g.decisions, w.decisions, strict=True):
                assert dg.decision == dw.decision, (where, dg, dw)
                assert close(dg.weight, dw.weight, rel), (where, dg, dw)
                assert close(dg.ema, dw.ema, rel), (where, dg, dw)
                assert close(dg.loss, dw.loss, rel), (where, dg, dw)
                if dg.decision != "filtered" or "ema" not in dw.reason:
                    assert dg.reason == dw.reason, (where, dg, dw)


@pytest.mark.parametrize("rule", torch_engine.RULES)
def test_rules_without_attack_equal_the_per_agent_engine(rule: str) -> None:
    assert_same(configs(rule))


@pytest.mark.parametrize(
    ("attack", "params"),
    [
        ("constant", {"low": 0.0, "high": 0.1}),
        ("sign-flip", {"scale": 2.0}),
        ("ipm", {"epsilon": 0.5}),
        ("alie", {"z": 1.5}),
        ("gaussian", {"std": 0.5}),
        ("scaled", {"low": 0.0, "high": 0.1}),
        ("small-perturbation", {"std": 0.05}),
        ("mimic", {}),
    ],
)
@pytest.mark.parametrize("rule", ["average", "distance", "loss-filtered", "median", "loss-filtered-clipped"])
def test_attacks_equal_the_per_agent_engine(rule: str, attack: str, params: dict[str, Any]) -> None:
    byz = {"a1": (attack, params), "a4": (attack, params)}
    assert_same(configs(rule, byzantine=byz))


def test_uneven_agents_train_share_and_resample_equal_the_per_agent_engine() -> None:
    """The example's settings: some agents train only in a share of the rounds; scoring: resample;
    two local steps; test metrics every other round."""
    cfgs = configs(
        "loss-filtered",
        rounds=8,
        byzantine={"a5": ("constant", {"low": 0.0, "high": 0.1})},
        task_params={"local_steps": 2, "scoring": "resample", "eval_every": 2},
        overrides={"a0": {"train_share": 0.3}, "a3": {"train_share": 0.3}, "a2": {"lr": 0.02}},
    )
    assert_same(cfgs)


def test_adam_keeps_each_agents_moments_like_the_per_agent_engine() -> None:
    """Adam (torch.optim.Adam per agent there): moments and step counts per row, agents that skip
    training rounds (train_share) keep their step count, as their own optimizer does."""
    cfgs = configs(
        "loss-filtered",
        rounds=6,
        byzantine={"a1": ("ipm", {"epsilon": 0.5})},
        task_params={"optimizer": "adam", "lr": 0.01},
        overrides={"a0": {"train_share": 0.4}, "a3": {"lr": 0.003}},
    )
    assert_same(cfgs)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"state_dir": "/tmp/never-written"}, "a state directory"),
        ({"attack": "low-loss"}, "attack 'low-loss'"),
    ],
)
def test_what_it_cannot_batch_is_named(change: dict[str, Any], reason: str) -> None:
    cfgs = configs("loss-filtered")
    first = cfgs[0].model_dump()
    for key, value in change.items():
        first[key] = {**first[key], **value} if isinstance(value, dict) else value
    cfgs[0] = NodeConfig.model_validate(first)
    got = torch_engine.unsupported_reason(cfgs)
    assert got is not None and reason in got and got.startswith("a0: ")
    with pytest.raises(ValueError, match="cannot run this"):
        torch_engine.run_torch_batched(cfgs)


def network(
    task: str,
    rule: str,
    params: list[dict[str, Any]],
    *,
    rounds: int = 3,
    byzantine: dict[str, tuple[str, dict[str, Any]]] | None = None,
) -> list[NodeConfig]:
    """A complete graph of agents of ``task``, agent k with ``params[k]``."""
    ids = [f"a{k}" for k in range(len(params))]
    out = []
    for a, p in zip(ids, params, strict=True):
        data: dict[str, Any] = {
            "id": a,
            "task": task,
            "rule": rule,
            "rounds": rounds,
            "seed": 5,
            "neighbors": {n: "inproc:0" for n in ids if n != a},
            "task_params": p,
            "rule_params": {"nu": 0.1, "ema_init": 1.0},
        }
        if byzantine and a in byzantine:
            data["attack"], data["attack_params"] = byzantine[a]
        out.append(build_config(data))
    return out


def digits(
    rule: str, optimizer: str, rounds: int = 3, **byzantine: tuple[str, dict[str, Any]]
) -> list[NodeConfig]:
    """Four CNN agents, two per group, tiny splits; a1 trains in half of the rounds."""
    base = {"train_samples": 24, "test_samples": 10, "batch_size": 8, "optimizer": optimizer}
    base["lr"] = 0.05 if optimizer == "sgd" else 0.001
    params = [{**base, "dataset": "mnist" if k < 2 else "synthetic"} for k in range(4)]
    params[1]["train_share"] = 0.5
    return network("digits", rule, params, rounds=rounds, byzantine=byzantine)


CONSTANT = ("constant", {"low": 0.0, "high": 0.1})


@pytest.mark.parametrize("rule", ["loss-filtered", "distance", "average", "median"])
def test_digits_with_sgd_equals_the_per_agent_engine(rule: str) -> None:
    cfgs = digits(rule, "sgd", a3=CONSTANT)
    assert torch_engine.unsupported_reason(cfgs) is None
    assert_same(cfgs)


def test_digits_with_two_local_steps_resampled_scores_and_sparse_tests_equals_the_per_agent_engine() -> None:
    cfgs = digits("loss-filtered", "sgd", rounds=4, a2=("ipm", {"epsilon": 0.5}))
    extra = {"local_steps": 2, "scoring": "resample", "eval_every": 2}
    cfgs = [
        NodeConfig.model_validate({**c.model_dump(), "task_params": {**c.task_params, **extra}}) for c in cfgs
    ]
    assert_same(cfgs)


def test_digits_with_adam_trains_as_the_agents_do() -> None:
    """Rule none: each agent keeps its own model, and the CNN's local steps are its own
    forward/backward and Adam step, so nothing is amplified: equal within REL."""
    assert_same(digits("none", "adam", a3=CONSTANT))


@pytest.mark.parametrize("rule", ["average", "loss-filtered"])
def test_digits_with_adam_and_combined_models_decides_alike(rule: str) -> None:
    """Decisions equal; metrics within ADAM_REL (Adam amplifies last-bit differences, see above)."""
    assert_same(digits(rule, "adam", a3=CONSTANT), rel=ADAM_REL)


@pytest.fixture
def from_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples.custom_task is imported from the repository root."""
    monkeypatch.chdir(ROOT)
    _load.cache_clear()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_custom_example_task_equals_the_per_agent_engine(from_root: None, optimizer: str) -> None:
    """examples/custom_task.py (an MLP, vmapped), two groups of angles, an ipm attacker."""
    params = [
        {
            "options": {"angle": 0 if k < 3 else 90, "samples": 48},
            "lr": 0.01,
            "batch_size": 8,
            "optimizer": optimizer,
        }
        for k in range(5)
    ]
    params[0]["train_share"] = 0.5
    cfgs = network(EXAMPLE, "loss-filtered", params, rounds=5, byzantine={"a4": ("ipm", {"epsilon": 0.5})})
    assert torch_engine.unsupported_reason(cfgs) is None
    assert_same(cfgs)


def plugin(folder: Path, name: str, body: str) -> str:
    """A throwaway plugin module ``name`` with ``make(ctx, options)``; its module:factory spec."""
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch
            from torch import nn
            from mtl_node import seeding
            from mtl_node.tasks import TaskDefinition

            def data(ctx, n):
                rng = seeding.generator(ctx.seed, ctx.agent_id, seeding.DATA)
                x = rng.standard_normal((n, 3)).astype(np.float32)
                return x, (x.sum(axis=1) > 0).astype(np.int64)
            """
        )
        + textwrap.dedent(body)
    )
    return f"{name}:make"


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    _load.cache_clear()
    yield tmp_path
    _load.cache_clear()
    for name in [m for m in sys.modules if m.startswith("plug_")]:
        del sys.modules[name]


def test_a_loss_vmap_cannot_trace_runs_one_call_per_model(plugins: Path) -> None:
    """A custom loss calling .item() is not vmappable: the engine evaluates model by model."""
    spec = plugin(
        plugins,
        "plug_item",
        """
        def loss(out, y):
            scale = 1.0 if float(out.abs().max().item()) < 1e6 else 0.5
            return scale * torch.nn.functional.cross_entropy(out, y)

        def make(ctx, options):
            return TaskDefinition(
                model=lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)),
                train=data(ctx, 40), test=data(ctx, 12), loss=loss,
            )
        """,
    )
    cfgs = network(spec, "loss-filtered", [{"batch_size": 4, "optimizer": "sgd", "lr": 0.1}] * 4)
    engine = torch_engine._Engine(cfgs)
    assert engine.model.per_model and not engine.model.per_sample_tests
    assert_same(cfgs)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            """
            def make(ctx, options):
                width = 4 if ctx.agent_id == "a2" else 8
                return TaskDefinition(model=lambda: nn.Linear(3, width), train=data(ctx, 20))
            """,
            "a2: its model differs from a0's",
        ),
        (
            """
            def make(ctx, options):
                model = lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
                return TaskDefinition(model=model, train=data(ctx, 20))
            """,
            "the model has dropout",
        ),
        (
            """
            def make(ctx, options):
                model = lambda: nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
                return TaskDefinition(model=model, train=data(ctx, 20))
            """,
            "the model has buffers",
        ),
        (
            """
            def make(ctx, options):
                smooth = 0.2 if ctx.agent_id == "a1" else 0.0
                loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, label_smoothing=smooth)
                return TaskDefinition(model=lambda: nn.Linear(3, 2), train=data(ctx, 20), loss=loss)
            """,
            "a1: its loss function differs from a0's",
        ),
    ],
)
def test_what_only_the_built_tasks_tell_is_named(plugins: Path, body: str, reason: str) -> None:
    name = f"plug_{abs(hash(body)) % 10**8}"
    cfgs = network(plugin(plugins, name, body), "loss-filtered", [{"batch_size": 4}] * 3, rounds=1)
    assert torch_engine.unsupported_reason(cfgs) is None  # only building the tasks tells
    with pytest.raises(torch_engine.Unbatchable, match="cannot run this") as info:
        torch_engine.run_torch_batched(cfgs)
    assert reason in info.value.reason


def test_a_task_class_that_overrides_the_training_is_named(plugins: Path) -> None:
    (plugins / "plug_cls.py").write_text(
        textwrap.dedent(
            """
            from mtl_node.tasks.har import HumanActivityRecognition

            class Mine(HumanActivityRecognition):
                name = "plug_cls:Mine"

                def adapt(self, model, round_):
                    return super().adapt(model, round_)
            """
        )
    )
    cfgs = configs("loss-filtered", agents=3)
    cfgs = [NodeConfig.model_validate({**c.model_dump(), "task": "plug_cls:Mine"}) for c in cfgs]
    got = torch_engine.unsupported_reason(cfgs)
    assert got is not None and got.startswith("a0: ") and "overrides TorchTask.adapt" in got


def test_an_honest_model_that_is_not_finite_arrives_as_missing_like_the_per_agent_engine() -> None:
    """An agent whose training diverges (a huge learning rate: its model overflows to inf/NaN) is
    left out by every receiver as a fetch that fails validation, with the same reason."""
    cfgs = configs("loss-filtered", rounds=4, overrides={"a2": {"lr": 1e38}})
    fast = torch_engine.run_torch_batched(cfgs)
    missing = [d for rec in fast["a0"] for d in rec.decisions if d.decision == "missing"]
    assert missing and all(d.agent_id == "a2" and d.reason.startswith("non-finite") for d in missing)
    assert_same(cfgs)


def test_decisions_are_built_when_read_and_compare_like_tuples() -> None:
    cfgs = configs("loss-filtered", rounds=2, byzantine={"a1": ("constant", {"low": 0.0, "high": 0.1})})
    rec = torch_engine.run_torch_batched(cfgs)["a0"][-1]
    assert len(rec.decisions) == len(cfgs[0].neighbors) + 1
    items = tuple(rec.decisions)
    assert rec.decisions == items and items == tuple(rec.decisions)
    assert rec.decisions[0].agent_id == "a0" and rec.decisions[-1] == items[-1]
    assert hash(rec.decisions) == hash(items)


def test_the_engine_runs_with_its_thread_setting_and_restores_the_callers() -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    cfgs = configs("none", rounds=1)
    torch_engine.run_torch_batched(cfgs, on_round=lambda _: seen.append(torch.get_num_threads()))
    assert seen == [torch_engine.THREADS]
    assert torch.get_num_threads() == before


def test_a_convolutional_model_runs_with_the_callers_threads() -> None:
    """digits' CNN is run one call per model: large operations, which a thread team speeds up."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        torch_engine.run_torch_batched(
            digits("none", "sgd", rounds=1), on_round=lambda _: seen.append(torch.get_num_threads())
        )
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("attack", "params"), [("constant", {"low": 0.0, "high": 0.1}), ("small-perturbation", {"std": 0.05})]
)
@pytest.mark.parametrize("rule", ["loss", "loss-filtered-capped"])
def test_vectorized_running_score_rules_with_attackers_equal_the_per_agent_engine(
    rule: str, attack: str, params: dict[str, Any]
) -> None:
    """The rules aggregated over all rows at once (torch_rules.EMA_RULES) against the agents' own
    rule objects, with attackers, and a weight cap that binds (0.3 x the agent's own weight)."""
    byz = {"a1": (attack, params), "a4": (attack, params)}
    lazy = {"train_share": 0.05}
    cfgs = [
        c.model_copy(update={"rule_params": c.rule_params.model_copy(update={"weight_cap": 0.3})})
        # a0 and a2 rarely train: their neighbours' models beat their own, so they keep them
        for c in configs(rule, byzantine=byz, rounds=6, overrides={"a0": lazy, "a2": lazy})
    ]
    if rule == "loss-filtered-capped":
        fast = torch_engine.run_torch_batched(cfgs)
        assert any("weight capped" in d.reason for recs in fast.values() for r in recs for d in r.decisions)
    assert_same(cfgs)


# backdoor and adaptive (issue 13): crafted per receiver by the attacker's own attack object, which
# reads the requester's model (torch_engine.requester_model), its own trajectory and data, the run's
# rule and, omniscient, a private copy of the victim's task. One requester-model attacker per network
# here: two that list each other are refused (which asks first decides what both get).
BACKDOOR_CASES: list[tuple[str, dict[str, tuple[str, dict[str, Any]]]]] = [
    ("average", {"a1": ("backdoor", {}), "a4": ("backdoor", {"poison": 0.3, "blend": 0.5})}),
    ("loss-filtered", {"a1": ("backdoor", {"blend": "auto"}), "a4": ("ipm", {"epsilon": 0.5})}),
    ("loss-filtered", {"a1": ("backdoor", {"base": "victim", "blend": "auto"}), "a4": ("alie", {})}),
    ("median", {"a1": ("backdoor", {"base": "victim", "blend": 0.7})}),
]


@pytest.mark.parametrize(("rule", "byz"), BACKDOOR_CASES, ids=lambda x: str(x))
def test_backdoor_equals_the_per_agent_engine(rule: str, byz: dict[str, tuple[str, dict[str, Any]]]) -> None:
    cfgs = configs(rule, byzantine=byz, rounds=6, task_params={"eval_every": 2})
    fast = torch_engine.run_torch_batched(cfgs)
    rates = [r.metrics.attack_success for r in fast["a0"] if r.round % 2 == 0]
    assert rates and all(x is not None for x in rates), rates  # the trigger's metric, every evaluation
    assert_same(cfgs)


ADAPTIVE_CASES: list[tuple[str, dict[str, tuple[str, dict[str, Any]]]]] = [
    ("average", {"a1": ("adaptive", {}), "a4": ("alie", {"z": 1.5})}),
    ("median", {"a1": ("adaptive", {"max_step": 0.5, "direction": "goal", "goal": 0.0})}),
    ("self-clipping", {"a1": ("adaptive", {})}),
    ("balance", {"a1": ("adaptive", {"direction": "away"})}),
    ("clipped-gossip", {"a1": ("adaptive", {}), "a4": ("ipm", {"epsilon": 0.5})}),
    ("loss-filtered", {"a1": ("adaptive", {"test": "none", "max_step": 0.3})}),
]


@pytest.mark.parametrize(("rule", "byz"), ADAPTIVE_CASES, ids=lambda x: str(x))
def test_adaptive_equals_the_per_agent_engine(rule: str, byz: dict[str, tuple[str, dict[str, Any]]]) -> None:
    cfgs = configs(rule, byzantine=byz, rounds=6)
    assert torch_engine.unsupported_reason(cfgs) is None
    assert_same(cfgs)


def test_adaptive_loss_test_and_mutual_requester_model_attackers_are_refused() -> None:
    for rule, params in [
        ("loss-filtered", {}),
        ("ubar", {"omniscient": True}),
        ("average", {"test": "loss"}),
    ]:
        got = torch_engine.unsupported_reason(configs(rule, byzantine={"a1": ("adaptive", params)}))
        assert got is not None and "loss test" in got and got.startswith("a1: "), got
    victim = ("backdoor", {"base": "victim"})
    for byz in [{"a1": ("adaptive", {}), "a4": victim}, {"a1": victim, "a4": victim}]:
        got = torch_engine.unsupported_reason(configs("average", byzantine=byz))
        assert got is not None and "which asks first" in got, got
    # a backdoor blending with its honest model reads no requester: two of them are fine
    assert (
        torch_engine.unsupported_reason(
            configs("average", byzantine={"a1": ("backdoor", {}), "a4": ("backdoor", {})})
        )
        is None
    )
