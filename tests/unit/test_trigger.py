"""The backdoor trigger of classification torch tasks and the attack_success metric it measures."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mtl_node.core.errors import ConfigError
from mtl_node.tasks import make_task
from mtl_node.tasks.trigger import Trigger, TriggerParams, default_features

SEED = 5
HAR = {"subject": 3, "samples": 60}
DIGITS = {"dataset": "synthetic", "train_samples": 30, "test_samples": 40}


def test_default_trigger_is_a_corner_patch_of_images_and_the_last_features_of_flat_samples() -> None:
    patch = default_features((28, 28))
    assert len(patch) == 16
    assert {divmod(f, 28) for f in patch} == {(r, c) for r in range(24, 28) for c in range(24, 28)}
    assert len(default_features((3, 16, 16))) == 3 * 16  # every channel of the patch
    flat = default_features((561,))
    assert flat == list(range(561 - 12, 561))  # ceil(2% of 561) = 12
    assert default_features((10,)) == [9]


def test_trigger_sets_its_features_and_poisons_the_first_share_of_a_batch() -> None:
    t = Trigger(torch.tensor([1, 3]), 7.0, target=2)
    x = torch.zeros(4, 2, 2)
    got = t.apply(x)
    assert torch.equal(got.reshape(4, -1)[:, [1, 3]], torch.full((4, 2), 7.0))
    assert torch.equal(got.reshape(4, -1)[:, [0, 2]], torch.zeros(4, 2))
    assert torch.equal(x, torch.zeros(4, 2, 2))  # a copy
    y = torch.tensor([0, 1, 0, 1])
    px, py = t.poison(x, y, 0.5)
    assert py.tolist() == [2, 2, 0, 1]
    assert torch.equal(px[:2], got[:2]) and torch.equal(px[2:], x[2:])


def test_attack_success_counts_triggered_non_target_samples_put_in_the_target_class() -> None:
    t = Trigger(torch.tensor([0]), 5.0, target=1)
    x = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0], [0.0, 3.0]])
    y = torch.tensor([0, 2, 1, 0])  # the sample of class 1 is left out

    def forward(v: torch.Tensor) -> torch.Tensor:
        # class 1 when the second feature is positive, else class 0 (the trigger's feature ignored)
        return torch.stack([-v[:, 1], v[:, 1], torch.zeros(len(v))], dim=1)

    assert t.success(forward, x, y) == pytest.approx(2 / 3)
    assert t.success(forward, x[2:3], y[2:3]) is None  # nothing outside the target class


@pytest.mark.parametrize(("task", "params"), [("har", HAR), ("digits", DIGITS)])
def test_torch_tasks_report_attack_success_with_their_test_metrics(task: str, params: dict[str, Any]) -> None:
    t = make_task(task, "a1", SEED, {**params, "eval_every": 2})
    m = t.init_model()
    assert t.evaluate(m, 1).attack_success is None  # not a test round
    got = t.evaluate(m, 2)
    assert got.attack_success is not None and 0.0 <= got.attack_success <= 1.0
    assert got.attack_success == t.attack_success(m)  # type: ignore[attr-defined]
    off = make_task(task, "a1", SEED, {**params, "trigger": None})
    assert off.evaluate(m, 2).attack_success is None


def test_har_model_biased_to_the_target_has_full_attack_success() -> None:
    t = make_task("har", "a1", SEED, {**HAR, "trigger": {"target": 4, "value": 50.0}})
    m = t.init_model()
    w = m["weight"].clone()
    w[4, t.trigger.positions] = 10.0  # type: ignore[attr-defined]
    assert t.attack_success({**m, "weight": w}) == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("trigger", "field", "says"),
    [
        ({"target": 6}, "task_params.trigger.target", "class 6 does not exist"),
        ({"features": [561]}, "task_params.trigger.features", "outside a sample of 561"),
        ({"features": []}, "task_params.trigger.features", "is empty"),
    ],
)
def test_bad_trigger_names_the_field(trigger: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_task("har", "a1", SEED, {**HAR, "trigger": trigger})
    assert info.value.field == field
    assert says in str(info.value)


def test_trigger_params_refuse_unknown_keys() -> None:
    with pytest.raises(ConfigError) as info:
        make_task("har", "a1", SEED, {**HAR, "trigger": {"pattern": "square"}})
    assert info.value.field == "task_params.trigger.pattern"
    TriggerParams()  # defaults build


def test_attack_success_is_exported_to_prometheus() -> None:
    from prometheus_client import generate_latest

    from mtl_node.metrics import PrometheusMetrics
    from mtl_node.recorder import RoundRecord
    from mtl_node.tasks import Metrics

    metrics = PrometheusMetrics()
    observer = metrics.agent("a1", ["a2"])
    rec = RoundRecord("a1", 3, "normal", "average", Metrics(1.0, 0.5, 0.75, 0.25), 1, 0, 0, (), 0.1)
    observer.round_done(rec)
    text = generate_latest(metrics.registry).decode()
    assert 'mtl_attack_success{agent="a1"} 0.25' in text


def test_attack_success_is_in_the_status_message() -> None:
    from mtl_node.agent import AgentStatus
    from mtl_node.messages import status_to_pb
    from mtl_node.tasks import Metrics

    with_rate = status_to_pb(
        AgentStatus("a1", "normal", "average", 5, 2, metrics=Metrics(1.0, 0.5, 0.75, 0.25))
    )
    assert with_rate.HasField("attack_success") and with_rate.attack_success == 0.25
    without = status_to_pb(AgentStatus("a1", "normal", "average", 5, 2, metrics=Metrics(1.0)))
    assert not without.HasField("attack_success")
