"""Target localization: deterministic per (seed, agent id), pure adapt, and LMS that actually learns."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_node.core.errors import ConfigError
from mtl_node.tasks import Task, make_task
from mtl_node.tasks.target_localization import BLOCK, TargetLocalization

TASK = "target-localization"


def task(agent: str = "a", seed: int = 0, **params: object) -> TargetLocalization:
    t = make_task(TASK, agent, seed, params)
    assert isinstance(t, TargetLocalization)
    return t


def samples(t: TargetLocalization, rounds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [t.sample(i) for i in rounds]


ROUNDS = [1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def test_same_seed_and_id_give_identical_samples_and_init() -> None:
    a1, a2 = task("a", 7), task("a", 7)
    assert torch.equal(a1.init_model()["w"], a2.init_model()["w"])
    for (u1, d1), (u2, d2) in zip(samples(a1, ROUNDS), samples(a2, ROUNDS), strict=True):
        assert torch.equal(u1, u2) and torch.equal(d1, d2)
    assert torch.equal(a1.adapt(a1.init_model(), 5)["w"], a2.adapt(a2.init_model(), 5)["w"])
    assert a1.evaluate(a1.init_model(), 5) == a2.evaluate(a2.init_model(), 5)


def test_samples_do_not_depend_on_the_order_rounds_are_asked_in() -> None:
    forward = samples(task("a", 7), ROUNDS)
    backward = samples(task("a", 7), ROUNDS[::-1])[::-1]
    for (u1, d1), (u2, d2) in zip(forward, backward, strict=True):
        assert torch.equal(u1, u2) and torch.equal(d1, d2)


def test_different_ids_and_seeds_differ() -> None:
    a, b, a_other_seed = task("a", 7), task("b", 7), task("a", 8)
    for other in (b, a_other_seed):
        assert not torch.equal(a.init_model()["w"], other.init_model()["w"])
        assert not all(
            torch.equal(d1, d2)
            for (_, d1), (_, d2) in zip(samples(a, ROUNDS), samples(other, ROUNDS), strict=True)
        )


def test_explicit_params_are_used() -> None:
    t = task(
        "a",
        0,
        position=(1.0, 2.0),
        target=(10.0, 20.0),
        init=(0.5, 0.5),
        noise_std=0.0,
        direction_noise_std=0.0,
    )
    assert torch.equal(t.init_model()["w"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    u, d = t.sample(1)
    direction = torch.tensor([9.0, 18.0], dtype=torch.float64)
    assert torch.allclose(u, direction / direction.norm())
    assert float(d) == pytest.approx(float(direction.norm()))
    # Noise-free, one LMS step with mu = 1 lands exactly on the target.
    t1 = task(
        "a", 0, position=(1.0, 2.0), target=(10.0, 20.0), noise_std=0.0, direction_noise_std=0.0, mu=1.0
    )
    assert torch.allclose(t1.adapt(t1.init_model(), 1)["w"], torch.tensor([10.0, 20.0], dtype=torch.float64))


def test_adapt_does_not_mutate_its_input() -> None:
    t = task("a")
    theta = t.init_model()
    before = theta["w"].clone()
    psi = t.adapt(theta, 1)
    assert torch.equal(theta["w"], before)
    assert not torch.equal(psi["w"], before)
    assert psi["w"].dtype == before.dtype and psi["w"].shape == before.shape


def test_losses_of_a_list_equal_per_model_losses_and_the_formula() -> None:
    t = task("a", 3)
    models = [
        t.init_model(),
        {"w": torch.tensor([10.0, 10.0], dtype=torch.float64)},
        t.adapt(t.init_model(), 1),
    ]
    for r in (1, 2, BLOCK + 3):
        together = t.losses(models, r)
        assert together == [t.losses([m], r)[0] for m in models]
        u, d = t.sample(r)
        x = torch.tensor(t.r.position, dtype=torch.float64)
        for m, got in zip(models, together, strict=True):
            expected = float((d - torch.dot(u, m["w"] - x)) ** 2)
            assert got == pytest.approx(expected, rel=1e-12)
        assert all(math.isfinite(v) and v >= 0 for v in together)


def test_a_neighbour_is_scored_with_our_position_not_its_own() -> None:
    """The reference code's slip: the paper scores psi_l with agent k's data (k's position)."""
    k = task("k", 0, position=(0.0, 0.0), target=(10.0, 10.0))
    far = task("l", 0, position=(3.0, 3.0), target=(10.0, 10.0))
    psi_l = {"w": torch.tensor([9.0, 11.0], dtype=torch.float64)}
    u, d = k.sample(1)
    assert k.losses([psi_l], 1)[0] == pytest.approx(float((d - torch.dot(u, psi_l["w"])) ** 2))
    assert k.losses([psi_l], 1) != far.losses([psi_l], 1)


def test_lms_alone_converges_towards_the_target() -> None:
    for agent in ("a", "b", "c"):
        t = task(agent, 11)
        target = torch.tensor(t.r.target, dtype=torch.float64)
        theta = t.init_model()
        start_test = t.evaluate(theta, 0).test_loss
        start_dist = float((theta["w"] - target).norm())
        for i in range(1, 301):
            theta = t.adapt(theta, i)
        end = t.evaluate(theta, 300)
        end_dist = float((theta["w"] - target).norm())
        assert start_test is not None and end.test_loss is not None
        assert end.test_loss < start_test / 100, (agent, start_test, end.test_loss)
        assert end_dist < start_dist / 10, (agent, start_dist, end_dist)
        assert math.isfinite(end.loss)


def test_task_is_a_task() -> None:
    t = make_task(TASK, "a", 0, {})
    assert isinstance(t, Task) and t.name == TASK


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"mu": 2}, "task_params.mu"),
        ({"mu": 0}, "task_params.mu"),
        ({"position": [1.0]}, "task_params.position"),
    ],
)
def test_bad_params(params: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_task(TASK, "a", 0, params)
    assert exc.value.field.startswith(field)
    assert str(exc.value).startswith(exc.value.field + ":")
