"""The closed-form linear layer (mtl_node.batched.torch_linear) against the generic torch.func path.

HAR's softmax classifier runs on the closed form in the torch batched engine; the generic path is
what every other model runs (``vmap(grad(functional_call(...)))`` and ``F.cross_entropy``). Both
compute the same maths with float32 sums in different orders, so they agree to float32 rounding
(1e-5 relative leaves room; a wrong sign, class or scale is off in the first digits). The engine
against the per-agent engine is tests/unit/test_torch_batched.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl_node import wire
from mtl_node.batched import torch_linear, torch_pool
from mtl_node.batched.torch_model import BatchedModel
from mtl_node.batched.torch_pool import Pool
from mtl_node.batched.torch_trigger import TriggerRates, shared_trigger
from mtl_node.combine import squared_distance
from mtl_node.core.errors import WireError
from mtl_node.tasks import make_task
from mtl_node.tasks.torch_task import TorchTask

REL = 1e-5
ROWS, FEATURES, CLASSES = 5, 561, 6


def stacked(rows: int, seed: int, scale: float = 0.3, bias: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"weight": torch.randn(rows, CLASSES, FEATURES, generator=g) * scale}
    if bias:
        out["bias"] = torch.randn(rows, CLASSES, generator=g) * scale
    return out


def batch(rows: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, samples, FEATURES, generator=g) * 2 - 1
    return x, torch.randint(0, CLASSES, (rows, samples), generator=g)


def generic_loss(module: nn.Module):  # type: ignore[no-untyped-def]
    def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, params, (x,)), y)

    return loss_of


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=REL, atol=1e-7)


def har_tasks(n: int = 4) -> list[TorchTask]:
    tasks = [
        make_task("har", f"a{k}", 3, {"subject": k + 1, "samples": 40 + 9 * k, "batch_size": 4})
        for k in range(n)
    ]
    assert all(isinstance(t, TorchTask) for t in tasks)
    return tasks  # type: ignore[return-value]


def test_gradients_equal_the_vmapped_autograd_gradients() -> None:
    for bias in (True, False):
        module = nn.Linear(FEATURES, CLASSES, bias=bias)
        params = stacked(ROWS, 1, bias=bias)
        x, y = batch(ROWS, 10, 2)
        want = vmap(grad(generic_loss(module)))(params, x, y)
        got = torch_linear.grads(params, x, y)
        assert set(got) == set(want)
        for name in want:
            assert_close(got[name], want[name])


def test_one_rows_gradient_equals_what_the_agents_own_optimizer_sees() -> None:
    module = nn.Linear(FEATURES, CLASSES)
    params = stacked(1, 3)
    x, y = batch(1, 10, 4)
    with torch.no_grad():
        module.weight.copy_(params["weight"][0])
        module.bias.copy_(params["bias"][0])
    F.cross_entropy(module(x[0]), y[0]).backward()
    got = torch_linear.grads(params, x, y)
    assert module.weight.grad is not None and module.bias.grad is not None
    assert_close(got["weight"][0], module.weight.grad)
    assert_close(got["bias"][0], module.bias.grad)


def test_losses_equal_cross_entropy_per_row_and_per_pool_model() -> None:
    module = nn.Linear(FEATURES, CLASSES)
    params = stacked(ROWS, 5)
    x, y = batch(ROWS, 10, 6)
    want = vmap(generic_loss(module))(params, x, y)
    assert_close(torch_linear.row_losses(params, x, y), want)
    pool = stacked(7, 7)
    got = torch_linear.pool_losses(pool, x, y)  # (pool, rows)
    for m in range(7):
        for r in range(ROWS):
            one = F.cross_entropy(x[r] @ pool["weight"][m].T + pool["bias"][m], y[r])
            assert_close(got[m, r], one)


def test_scoring_only_the_received_models_gives_every_slot_its_models_loss() -> None:
    module = nn.Linear(FEATURES, CLASSES)
    models = stacked(8, 8)
    x, y = batch(3, 10, 9)
    src = torch.tensor([[0, 5, 7], [1, 5, 2], [2, 7, 0]])
    pool = Pool(models, src, present=src.numpy() >= 0, missing={})
    got = torch_pool.PoolScorer(module, F.cross_entropy, closed_form=True).losses(pool, torch.arange(3), x, y)
    generic = torch_pool.PoolScorer(module, F.cross_entropy).losses(pool, torch.arange(3), x, y)
    for r in range(3):
        for s in range(3):
            m = int(src[r, s])
            want = F.cross_entropy(x[r] @ models["weight"][m].T + models["bias"][m], y[r])
            assert_close(got[r, s], want)
    assert_close(got, generic)


def test_distances_are_each_slots_squared_distance() -> None:
    models = stacked(8, 10)
    prev = stacked(3, 11)
    src = torch.tensor([[0, 5, 7], [1, 5, 2], [2, 7, 2]])
    pool = Pool(models, src, present=src.numpy() >= 0, missing={})
    rows = torch.tensor([0, 2])
    got = torch_pool.distances(prev, pool, rows)
    assert got.dtype == torch.float64
    for j, k in enumerate(rows.tolist()):
        for s in range(3):
            m = int(src[k, s])
            want = squared_distance({n: t[k] for n, t in prev.items()}, {n: t[m] for n, t in models.items()})
            assert abs(float(got[j, s]) - want) <= REL * want


def test_har_runs_the_closed_form_and_a_custom_loss_does_not() -> None:
    assert BatchedModel(har_tasks(2)).linear

    class Smoothed(type(har_tasks(1)[0])):  # type: ignore[misc]
        def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs, targets, label_smoothing=0.1)

    tasks = [Smoothed(t.ctx, t.p) for t in har_tasks(2)]
    assert not BatchedModel(tasks).linear


def test_test_metrics_and_attack_success_equal_each_tasks_own() -> None:
    tasks = har_tasks()
    model = BatchedModel(tasks)
    theta = stacked(len(tasks), 12, scale=0.05)
    longest = max(len(t.test) for t in tasks)
    xt = torch.zeros(len(tasks), longest, FEATURES)
    y = torch.zeros(len(tasks), longest, dtype=torch.long)
    mask = torch.zeros(len(tasks), longest, dtype=torch.float64)
    for k, t in enumerate(tasks):
        xt[k, : len(t.test)], y[k, : len(t.test)], mask[k, : len(t.test)] = t.test.x, t.test.y, 1.0
    count = mask.sum(dim=1)
    split = (torch_linear.layout(xt), y, mask, count)
    trigger = shared_trigger(tasks)
    assert trigger is not None and trigger is not False
    tests = torch_linear.Tests(split, trigger)
    loss, acc, rates = tests(theta)
    via_trigger = TriggerRates(tasks, model.layout).rates(model.predict, theta)
    assert rates == via_trigger
    for k, t in enumerate(tasks):
        own = {n: p[k] for n, p in theta.items()}
        want_loss, want_acc = t.test_metrics(own)
        assert abs(loss[k] - want_loss) <= REL * abs(want_loss)
        assert want_acc is not None and abs(acc[k] - want_acc) <= 1e-7  # the task's is a float32 mean
        assert rates[k] == t.attack_success(own)
    assert 0.0 < sum(rates.values()) < len(tasks)  # the rates are not all 0 or all 1


def test_surely_valid_never_accepts_what_validate_state_rejects() -> None:
    good = {"weight": torch.rand(CLASSES, FEATURES), "bias": torch.rand(CLASSES)}
    manifest = wire.manifest_of(good)
    spec = torch_pool.spec_of(good)
    nan = dict(good, bias=torch.tensor([0.0, math.nan, 0, 0, 0, 0]))
    inf = dict(good, weight=good["weight"].clone().index_fill_(1, torch.tensor([3]), math.inf))
    shape = dict(good, bias=torch.rand(CLASSES + 1))
    dtype = dict(good, bias=torch.rand(CLASSES, dtype=torch.float64))
    names = {"weight": good["weight"]}
    big = {"weight": torch.full((CLASSES, FEATURES), 3e38), "bias": good["bias"]}  # sum overflows
    assert torch_pool.surely_valid(good, spec)
    wire.validate_state(good, manifest)
    for bad in (nan, inf, shape, dtype, names):
        assert not torch_pool.surely_valid(bad, spec)
        with pytest.raises(WireError):
            wire.validate_state(bad, manifest)
    assert not torch_pool.surely_valid(big, spec)  # unsure: validate_state decides (and accepts)
    wire.validate_state(big, manifest)
