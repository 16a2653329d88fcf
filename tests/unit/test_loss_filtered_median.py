"""loss-filtered-median on hand-made numbers: the loss filter picks the members (the agent always
among them), their coordinate-wise median is the new model; filtered, missing and non-finite
members never reach it; with nobody kept the agent keeps its own model."""

from __future__ import annotations

import math

import numpy as np

from mtl_node.aggregation import RULES, Aggregation, Candidate, RuleParams, make_rule
from mtl_node.core import names as catalog
from mtl_node.kernels.hardened import kept_median

# nu = 1, no initial EMA: a member's EMA is this round's loss; the filter keeps loss <= own (2).
RAW = RuleParams(nu=1.0, ema_init=None)


def cand(agent: str, loss: float | None, model: tuple[float, ...] | None) -> Candidate:
    if loss is None:
        return Candidate(agent, missing_reason="timeout: slow")
    return Candidate(agent, loss=loss, model=None if model is None else np.array(model, dtype=np.float64))


def run(*cands: Candidate) -> Aggregation:
    return make_rule("loss-filtered-median", RAW).aggregate(list(cands))


def got(agg: Aggregation) -> dict[str, tuple[str, float]]:
    return {d.agent_id: (d.decision, d.weight) for d in agg.decisions}


def test_median_of_the_kept_members_not_their_weighted_mean() -> None:
    # k (own, loss 2) at (0, 0); a (1) at (0.1, 0); b (0.5) at (0, 0.2); e (2, a tie: kept) at (5, 0);
    # f (3, worse than k: filtered) at (-9, 9). Kept: k, a, b, e.
    # x: 0, 0.1, 0, 5 -> sorted 0, 0, 0.1, 5 -> (0 + 0.1) / 2 = 0.05; y: 0, 0, 0.2, 0 -> 0.
    agg = run(
        cand("k", 2.0, (0.0, 0.0)),
        cand("a", 1.0, (0.1, 0.0)),
        cand("b", 0.5, (0.0, 0.2)),
        cand("e", 2.0, (5.0, 0.0)),
        cand("f", 3.0, (-9.0, 9.0)),
    )
    assert agg.combined is not None
    np.testing.assert_allclose(agg.combined, [0.05, 0.0], rtol=0, atol=1e-15)
    assert agg.weights == {"k": 0.25, "a": 0.25, "b": 0.25, "e": 0.25}
    assert got(agg)["f"] == ("filtered", 0.0)
    assert got(agg)["e"] == ("accepted", 0.25)
    # loss-filtered would have taken e's pull with weight 1/8: x = 0.1/4 + 5/8 = 0.65.
    plain = make_rule("loss-filtered", RAW).aggregate(
        [
            cand("k", 2.0, (0.0, 0.0)),
            cand("a", 1.0, (0.1, 0.0)),
            cand("b", 0.5, (0.0, 0.2)),
            cand("e", 2.0, (5.0, 0.0)),
        ]
    )
    assert plain.weights["e"] == 0.125


def test_a_kept_minority_with_an_extreme_coordinate_is_ignored() -> None:
    # A backdoor-like member: clean-loss low enough to be kept, one coordinate (the trigger's
    # weight) at 100. Three other members hold 1, 2, 3 there: the median is 2.5, not near 100.
    agg = run(
        cand("k", 1.0, (1.0, 0.0)),
        cand("a", 0.9, (2.0, 0.1)),
        cand("b", 0.8, (3.0, 0.2)),
        cand("z", 0.1, (100.0, 0.1)),
    )
    assert agg.combined is not None
    np.testing.assert_allclose(agg.combined, [2.5, 0.1], rtol=0, atol=1e-15)


def test_odd_count_takes_the_middle_member() -> None:
    agg = run(cand("k", 1.0, (0.0, 4.0)), cand("a", 1.0, (2.0, 1.0)), cand("b", 0.5, (1.0, -3.0)))
    assert agg.combined is not None
    np.testing.assert_array_equal(agg.combined, [1.0, 1.0])
    assert all(math.isclose(w, 1 / 3) for w in agg.weights.values())


def test_all_neighbours_byzantine_and_worse_keeps_the_own_model() -> None:
    agg = run(cand("k", 1.0, (1.0, 1.0)), cand("x", 5.0, (9.0, 9.0)), cand("y", 7.0, (-9.0, 9.0)))
    assert agg.weights == {"k": 1.0}
    assert agg.combined is None  # the round loop keeps psi_k
    assert got(agg)["x"] == ("filtered", 0.0) and got(agg)["y"] == ("filtered", 0.0)


def test_one_kept_neighbour_gives_the_mean_of_the_two() -> None:
    agg = run(cand("k", 1.0, (0.0, 2.0)), cand("a", 0.5, (4.0, 0.0)), cand("x", 3.0, (50.0, 50.0)))
    assert agg.combined is not None
    np.testing.assert_array_equal(agg.combined, [2.0, 1.0])
    assert agg.weights == {"k": 0.5, "a": 0.5}


def test_missing_members_are_left_out() -> None:
    agg = run(
        cand("k", 1.0, (0.0, 0.0)),
        cand("m", None, None),
        cand("a", 0.5, (3.0, 3.0)),
        cand("b", 0.5, (6.0, -3.0)),
    )
    assert agg.combined is not None
    np.testing.assert_array_equal(agg.combined, [3.0, 0.0])
    assert got(agg)["m"] == ("missing", 0.0)
    assert "m" not in agg.weights


def test_kernel_forces_the_agent_in_and_drops_non_finite_members() -> None:
    # Two rows: row 0 keeps nobody (the agent's own model comes back); row 1 keeps slots 1 and 2, but
    # slot 2 is not finite: the median of (0, 10) and (2, 20) is (1, 15).
    X = np.array(
        [
            [[1.0, 2.0], [5.0, 5.0], [7.0, 7.0]],
            [[0.0, 10.0], [2.0, 20.0], [math.inf, 0.0]],
        ]
    )
    kept = np.array([[False, False, False], [False, True, True]])
    np.testing.assert_array_equal(kept_median(X, kept), [[1.0, 2.0], [1.0, 15.0]])


def test_registered_with_its_description() -> None:
    assert "loss-filtered-median" in RULES and "loss-filtered-median" in catalog.RULE_NAMES
    rule = make_rule("loss-filtered-median")
    assert rule.needs_loss and rule.needs_models
