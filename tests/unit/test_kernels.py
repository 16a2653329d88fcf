"""The kernels (mtl_node/kernels) work row by row: a row's result does not depend on the other rows
of the batch. That is what lets the daemon call them with its one neighbourhood and the vectorized
engine with all of them, and get the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_node.kernels import attacks as ka
from mtl_node.kernels import robust
from mtl_node.kernels import target_localization as tl
from mtl_node.kernels.combine import accumulate, combine_rows
from mtl_node.kernels.ema import ema_step
from mtl_node.kernels.hardened import cap_weights, clip_pulls

ROWS, SLOTS, DIM = 7, 6, 3


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 3.0, (ROWS, SLOTS, DIM))
    present = rng.random((ROWS, SLOTS)) < 0.7
    present[:, 0] = True
    present[0] = True  # a full row
    return X, present


def each_row(fn, *arrays: np.ndarray):  # type: ignore[no-untyped-def]
    """fn on every row alone (as a batch of one), stacked."""
    outs = [fn(*(a[k : k + 1] for a in arrays)) for k in range(ROWS)]
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate([o[i] for o in outs]) for i in range(len(outs[0])))
    return np.concatenate(outs)


@pytest.mark.parametrize("seed", range(5))
def test_robust_kernels_are_row_independent(seed: int) -> None:
    X, present = batch(seed)
    f = np.full(ROWS, 1)
    iters, eps, tau = np.full(ROWS, 20), np.full(ROWS, 1e-8), np.full(ROWS, 2.0)
    cases = [
        (robust.coordinate_median, (X, present)),
        (robust.trimmed_mean, (X, present, f)),
        (robust.krum_scores, (X, present, f)),
        (robust.geometric_median, (X, present, iters, eps)),
        (robust.self_clip, (X, present, tau)),
    ]
    for fn, args in cases:
        with np.errstate(invalid="ignore", divide="ignore"):  # rows too small for a rule: callers check
            together, alone = fn(*args), each_row(fn, *args)
        for a, b in zip(
            together if isinstance(together, tuple) else (together,),
            alone if isinstance(alone, tuple) else (alone,),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b, err_msg=fn.__name__)


@pytest.mark.parametrize("seed", range(5))
def test_ema_and_hardened_kernels_are_row_independent(seed: int) -> None:
    X, present = batch(seed)
    rng = np.random.default_rng(100 + seed)
    score = rng.exponential(1.0, (ROWS, SLOTS))
    score[rng.random((ROWS, SLOTS)) < 0.1] = np.inf
    ema = rng.exponential(1.0, (ROWS, SLOTS))
    seen = rng.random((ROWS, SLOTS)) < 0.5
    col = np.ones((ROWS, 1))
    kw = {"nu": 0.1 * col, "ema_init": 10.0 * col, "floor": 1e-12 * col, "filtering": col > 0}
    coop = np.ones(ROWS, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        together = ema_step(score, present, ema, seen, cooperating=coop, **kw)
        for k in range(ROWS):
            row = slice(k, k + 1)
            alone = ema_step(
                score[row], present[row], ema[row], seen[row], cooperating=coop[row],
                **{name: v[row] for name, v in kw.items()},
            )  # fmt: skip
            for field in ("ema", "seen", "updated", "worse", "kept", "weights"):
                np.testing.assert_array_equal(getattr(together, field)[row], getattr(alone, field), field)
    capped, hit = cap_weights(together.weights, np.full(ROWS, 0.5))
    capped_alone, hit_alone = each_row(cap_weights, together.weights, np.full(ROWS, 0.5))
    np.testing.assert_array_equal(capped, capped_alone)
    np.testing.assert_array_equal(hit, hit_alone)
    kept = together.kept.copy()
    kept[:, 0] = False
    out = clip_pulls(X, kept, together.weights, np.full(ROWS, 1.0))
    for k in range(ROWS):
        row = slice(k, k + 1)
        one = clip_pulls(X[row], kept[row], together.weights[row], np.full(1, 1.0))
        np.testing.assert_array_equal(out.combined[row], one.combined)
        np.testing.assert_array_equal(out.weights[row], one.weights)


def test_combination_is_the_same_sum_for_a_state_dict_and_a_batch() -> None:
    """The agents combine torch tensors member by member; the engine combines numpy rows the same
    way, absent slots weighing 0: bit-identical."""
    X, present = batch(7)
    rng = np.random.default_rng(7)
    weights = np.where(present, rng.random((ROWS, SLOTS)), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = combine_rows(weights, np.where(present[:, :, None], X, 0.0))
    for k in range(ROWS):
        members = [s for s in range(SLOTS) if weights[k, s] != 0.0]
        one = accumulate(
            [float(weights[k, s]) for s in members], [torch.from_numpy(X[k, s]) for s in members]
        )
        np.testing.assert_array_equal(rows[k], one.numpy())


def test_attack_and_task_kernels_take_numpy_and_torch_alike() -> None:
    rng = np.random.default_rng(3)
    h, g, u = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    x, d = rng.normal(size=(4, 2)), rng.normal(size=4)
    t = torch.from_numpy
    for fn, args in [
        (ka.sign_flip, (h, 2.0)),
        (ka.towards, (h, g, 0.3)),
        (ka.alie, (h, g, -1.0, 1.5)),
        (tl.adapt, (h, x, 0.1, u, d)),
        (tl.residual, (h, x, u, d)),
    ]:
        numpy_out = fn(*args)
        torch_out = fn(*(t(a) if isinstance(a, np.ndarray) else a for a in args))
        np.testing.assert_array_equal(numpy_out, torch_out.numpy(), err_msg=fn.__name__)
    mean, std = ka.pool_moments(h[:1], g[None, 1:], np.ones((1, 3), dtype=bool))
    pool = np.concatenate([h[:1], g[1:]])
    np.testing.assert_allclose(mean[0], pool.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std[0], pool.std(axis=0), rtol=1e-12)


def test_min_max_kernel_on_a_unit_square() -> None:
    """Honest models at the corners of the unit square: mu = (0.5, 0.5), std = (0.5, 0.5). The
    largest pairwise distance is sqrt(2) and x = mu - gamma std reaches it from (1, 1) at gamma = 1;
    min-sum's bound max_i sum_j ||h_i - h_j||^2 = 4 is reached at the same point."""
    H = np.array(
        [[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0], [9.0, 9.0], [9.0, 9.0]]]
    )
    present = np.array([[True] * 4, [True, True, False, False]])  # row 2: only (0,0), (1,0)
    for objective in ("max", "sum"):
        x, gamma = ka.min_max(H, present, "std", objective, np.array([10.0, 10.0]), np.array([60, 60]))
        np.testing.assert_allclose(gamma[0], 1.0, atol=1e-12)
        np.testing.assert_allclose(x[0], [0.0, 0.0], atol=1e-12)
    # row 2: mu (0.5, 0), std (0.5, 0); min-max: |0.5 - 0.5 g - 1| <= 1 -> g = 1; x = (0, 0)
    x, gamma = ka.min_max(H, present, "std", "max", np.array([10.0, 10.0]), np.array([60, 60]))
    np.testing.assert_allclose(gamma[1], 1.0, atol=1e-12)


def test_dissensus_kernel_cancels_the_gossip_step() -> None:
    """With eps = 1 and B = 1, the victim's average over itself, its honest neighbours and the
    attacker's model is the victim's own model times n over n: no consensus step at all."""
    rng = np.random.default_rng(0)
    victim = rng.normal(size=(3, 4))
    X = rng.normal(size=(3, 5, 4))
    present = rng.random((3, 5)) > 0.3
    x = ka.dissensus(victim, X, present, np.ones(3), np.ones(3))
    for r in range(3):
        honest = X[r][present[r]]
        total = victim[r] + honest.sum(axis=0) + x[r]
        np.testing.assert_allclose(total / (len(honest) + 2), victim[r], atol=1e-12)
