"""The aggregation rules on hand-made numbers: every expected weight is worked out here by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mtl_node.aggregation import RULES, Aggregation, Candidate, RuleParams, make_rule
from mtl_node.combine import squared_distance, weighted_sum
from mtl_node.core.errors import ConfigError, UnknownNameError

# nu = 1 and no initial EMA: each score is exactly this round's value, so weights are easy by hand.
RAW = RuleParams(nu=1.0, ema_init=None)


def decision(agg: Aggregation, agent: str) -> tuple[str, float, str]:
    [d] = [d for d in agg.decisions if d.agent_id == agent]
    return d.decision, d.weight, d.reason


def assert_sums_to_one(agg: Aggregation) -> None:
    assert all(math.isfinite(w) and w >= 0.0 for w in agg.weights.values()), agg.weights
    assert math.fsum(agg.weights.values()) == pytest.approx(1.0, abs=1e-12)


# -- loss-filtered (eq. 10) -------------------------------------------------------------------------


def test_loss_filtered_keeps_neighbours_no_worse_than_self_with_inverse_loss_weights() -> None:
    rule = make_rule("loss-filtered", RAW)
    agg = rule.aggregate(
        [Candidate("k", loss=2.0), Candidate("a", loss=1.0), Candidate("b", loss=4.0), Candidate("c", 2.0)]
    )
    # S = {k (2), a (1), c (2, a tie)}; b (4 > 2) is filtered. Inverses 1/2, 1, 1/2 sum to 2.
    assert agg.weights == pytest.approx({"k": 0.25, "a": 0.5, "c": 0.25})
    assert "b" not in agg.weights
    assert decision(agg, "a")[:2] == ("accepted", pytest.approx(0.5))
    assert decision(agg, "c")[:2] == ("accepted", pytest.approx(0.25))
    filtered = decision(agg, "b")
    assert filtered[0] == "filtered" and filtered[1] == 0.0 and "own" in filtered[2]
    assert (agg.count("accepted"), agg.count("filtered"), agg.count("missing")) == (2, 1, 0)
    assert_sums_to_one(agg)


def test_exact_tie_with_own_loss_is_accepted() -> None:
    agg = make_rule("loss-filtered", RAW).aggregate([Candidate("k", 3.0), Candidate("a", 3.0)])
    assert agg.weights == {"k": 0.5, "a": 0.5}
    assert decision(agg, "a")[0] == "accepted"


def test_all_neighbours_byzantine_agent_keeps_only_itself() -> None:
    rule = make_rule("loss-filtered")  # default nu and ema_init, as an agent runs it
    for _ in range(5):
        agg = rule.aggregate([Candidate("k", 0.5)] + [Candidate(f"b{j}", 1e6 + j) for j in range(9)])
        assert agg.weights == {"k": 1.0}
        assert [d.decision for d in agg.decisions[1:]] == ["filtered"] * 9
        assert all(d.weight == 0.0 for d in agg.decisions[1:])
        assert agg.decisions[0].weight == 1.0


def test_zero_losses_hit_the_floor_and_stay_finite() -> None:
    agg = make_rule("loss-filtered", RAW).aggregate([Candidate("k", 0.0), Candidate("a", 0.0)])
    assert_sums_to_one(agg)
    assert agg.weights["k"] == agg.weights["a"] == 0.5

    # A zero-loss neighbour next to a positive own loss takes (almost) all the weight, finitely.
    agg = make_rule("loss-filtered", RAW).aggregate([Candidate("k", 1.0), Candidate("a", 0.0)])
    assert_sums_to_one(agg)
    assert agg.weights["a"] == pytest.approx(1.0 / (1.0 + 1e-12))


@pytest.mark.parametrize("floor", [1e-12, 1e-300])
def test_tiny_floor_never_gives_nan_weights(floor: float) -> None:
    params = RuleParams(nu=1.0, ema_init=None, floor=floor)
    for name in ("loss-filtered", "loss"):
        agg = make_rule(name, params).aggregate(
            [Candidate("k", 0.0), Candidate("a", 0.0), Candidate("b", 0.0)]
        )
        assert_sums_to_one(agg)
        assert agg.weights == pytest.approx({"k": 1 / 3, "a": 1 / 3, "b": 1 / 3})


def test_nan_neighbour_loss_is_excluded_and_does_not_poison_its_ema() -> None:
    rule = make_rule("loss-filtered", RuleParams(nu=0.5, ema_init=None))
    rule.aggregate([Candidate("k", 4.0), Candidate("a", 3.0)])  # ema a = 3, ema k = 4

    agg = rule.aggregate([Candidate("k", 4.0), Candidate("a", math.nan)])
    assert agg.weights == {"k": 1.0}
    d = agg.decisions[1]
    assert (d.decision, d.weight, d.ema) == ("filtered", 0.0, 3.0)
    assert "not finite" in d.reason

    # Next round continues from the EMA before the NaN: 0.5 * 3 + 0.5 * 5 = 4 (own: 0.5*4 + 0.5*4 = 4).
    agg = rule.aggregate([Candidate("k", 4.0), Candidate("a", 5.0)])
    assert agg.decisions[1].ema == pytest.approx(4.0)
    assert agg.weights == pytest.approx({"k": 0.5, "a": 0.5})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["loss-filtered", "loss"])
def test_non_finite_own_loss_keeps_own_model(name: str, bad: float) -> None:
    agg = make_rule(name).aggregate(
        [Candidate("k", bad), Candidate("a", 1.0), Candidate("b", None, None, "x")]
    )
    assert agg.weights == {"k": 1.0}
    assert [d.decision for d in agg.decisions] == ["accepted", "filtered", "missing"]
    assert agg.decisions[0].weight == 1.0


def test_missing_neighbour_has_decision_missing_with_reason_and_no_weight() -> None:
    rule = make_rule("loss-filtered", RAW)
    agg = rule.aggregate(
        [Candidate("k", 2.0), Candidate("a", missing_reason="timeout: a did not answer"), Candidate("b", 1.0)]
    )
    d, w, reason = decision(agg, "a")
    assert (d, w) == ("missing", 0.0)
    assert reason == "timeout: a did not answer"
    assert "a" not in agg.weights
    assert agg.weights == pytest.approx({"k": 1 / 3, "b": 2 / 3})
    assert agg.count("missing") == 1


def test_ema_update_over_two_rounds_follows_the_paper() -> None:
    nu, phi0 = 0.1, 10.0
    rule = make_rule("loss-filtered", RuleParams(nu=nu, ema_init=phi0))
    losses = [(2.0, 1.0), (4.0, 30.0)]
    own, nb = phi0, phi0
    for own_loss, nb_loss in losses:
        agg = rule.aggregate([Candidate("k", own_loss), Candidate("a", nb_loss)])
        own = (1 - nu) * own + nu * own_loss
        nb = (1 - nu) * nb + nu * nb_loss
        assert agg.decisions[0].ema == pytest.approx(own)
        assert agg.decisions[1].ema == pytest.approx(nb)
    # Round 1: own 9.2, a 9.1 (kept). Round 2: own 8.68, a 8.19 + 3 = 11.19 > 8.68 (filtered).
    assert own == pytest.approx(8.68) and nb == pytest.approx(11.19)
    assert agg.weights == {"k": 1.0}
    assert agg.decisions[1].decision == "filtered"


def test_ema_init_none_starts_at_first_observation() -> None:
    rule = make_rule("loss", RuleParams(nu=0.1, ema_init=None))
    agg = rule.aggregate([Candidate("k", 2.0), Candidate("a", 6.0)])
    assert [d.ema for d in agg.decisions] == [2.0, 6.0]
    agg = rule.aggregate([Candidate("k", 2.0), Candidate("a", 1.0)])
    assert agg.decisions[1].ema == pytest.approx(0.9 * 6.0 + 0.1 * 1.0)


# -- the other rules --------------------------------------------------------------------------------


def test_loss_rule_weighs_by_inverse_loss_without_filtering() -> None:
    agg = make_rule("loss", RAW).aggregate([Candidate("k", 1.0), Candidate("a", 2.0), Candidate("b", 4.0)])
    # Inverses 1, 1/2, 1/4 sum to 7/4.
    assert agg.weights == pytest.approx({"k": 4 / 7, "a": 2 / 7, "b": 1 / 7})
    assert [d.decision for d in agg.decisions] == ["accepted"] * 3
    assert_sums_to_one(agg)


def test_distance_rule_uses_squared_distance_not_loss() -> None:
    rule = make_rule("distance", RAW)
    agg = rule.aggregate(
        [
            Candidate("k", loss=100.0, sq_distance=1.0),
            Candidate("a", loss=0.001, sq_distance=3.0),
            Candidate("b", loss=math.nan, sq_distance=6.0),  # the loss is not looked at
        ]
    )
    # Inverses 1, 1/3, 1/6 sum to 3/2; no filter, so the farther neighbours still count.
    assert agg.weights == pytest.approx({"k": 2 / 3, "a": 2 / 9, "b": 1 / 9})
    assert [d.decision for d in agg.decisions] == ["accepted"] * 3
    assert RULES.get("distance").needs_distance and not RULES.get("distance").needs_loss


def test_average_gives_equal_weights_over_present_members() -> None:
    agg = make_rule("average").aggregate(
        [Candidate("k", 5.0), Candidate("a", 1e9), Candidate("b", missing_reason="timeout"), Candidate("c")]
    )
    assert agg.weights == pytest.approx({"k": 1 / 3, "a": 1 / 3, "c": 1 / 3})
    assert decision(agg, "b") == ("missing", 0.0, "timeout")
    assert_sums_to_one(agg)


def test_none_keeps_self_only() -> None:
    agg = make_rule("none").aggregate(
        [Candidate("k", 5.0), Candidate("a", 0.1), Candidate("b", missing_reason="x")]
    )
    assert agg.weights == {"k": 1.0}
    assert [d.decision for d in agg.decisions] == ["accepted", "filtered", "missing"]


def test_an_agent_without_neighbours_keeps_itself_under_every_rule() -> None:
    for name in RULES.names():
        agg = make_rule(name).aggregate([Candidate("k", 1.0, 1.0, model=np.zeros(2))])
        assert agg.weights == {"k": 1.0}, name


def test_weights_always_sum_to_one_on_random_rounds() -> None:
    """Property: whatever arrives (NaN, inf, zero, huge, missing), weights are finite and sum to 1."""
    rng = random.Random(1234)
    values = [0.0, 1e-300, 0.5, 1.0, 3.0, 1e6, 1e300, math.inf, math.nan]

    def score() -> float:
        return rng.choice(values) if rng.random() < 0.5 else rng.uniform(0.0, 20.0)

    for name in RULES.names():
        if RULES.get(name).needs_models:
            continue  # the robust baselines: tests/unit/test_robust_rules.py
        for trial in range(30):
            params = RuleParams(nu=rng.choice([0.05, 0.1, 0.5, 1.0]), ema_init=rng.choice([None, 0.0, 10.0]))
            rule = make_rule(name, params)
            for _round in range(6):
                own = Candidate("k", rng.uniform(0.0, 5.0), rng.uniform(0.0, 5.0))
                others = [
                    Candidate(f"n{j}", missing_reason="gone")
                    if rng.random() < 0.2
                    else Candidate(f"n{j}", score(), score())
                    for j in range(rng.randint(0, 6))
                ]
                agg = rule.aggregate([own, *others])
                assert_sums_to_one(agg)
                assert agg.weights.get("k", 0.0) > 0.0, (name, trial)
                assert len(agg.decisions) == 1 + len(others)
                for d in agg.decisions:
                    assert d.weight == agg.weights.get(d.agent_id, 0.0)
                    assert (d.decision == "accepted") == (d.agent_id in agg.weights)


# -- parameters and names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"nu": 0.0}, "nu"),
        ({"nu": 1.5}, "nu"),
        ({"nu": -0.1}, "nu"),
        ({"floor": 0.0}, "floor"),
        ({"floor": -1.0}, "floor"),
        ({"floor": 5e-324}, "floor"),  # 1/floor would overflow to inf, and weights to inf/inf = NaN
    ],
)
def test_rule_params_are_validated(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        RuleParams(**kwargs)  # type: ignore[arg-type]
    assert exc.value.errors()[0]["loc"] == (field,)


def test_rule_params_reject_unknown_keys_and_accept_the_boundary() -> None:
    assert RuleParams(nu=1.0).nu == 1.0
    with pytest.raises(ValidationError):
        RuleParams(mu=0.1)  # type: ignore[call-arg]


def test_unknown_rule_lists_the_valid_names() -> None:
    with pytest.raises(UnknownNameError) as exc:
        make_rule("medain")
    err = exc.value
    assert isinstance(err, ConfigError)
    assert err.field == "rule"
    assert err.valid == RULES.names()
    for name in RULES.names():
        assert name in str(err)
    assert "'medain'" in str(err)


# -- combine ----------------------------------------------------------------------------------------


def test_weighted_sum_on_small_tensors() -> None:
    models = {
        "k": {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "n": torch.tensor([7])},
        "a": {"w": torch.tensor([3.0, 4.0], dtype=torch.float64), "n": torch.tensor([8])},
        "b": {"w": torch.tensor([100.0, 100.0], dtype=torch.float64), "n": torch.tensor([9])},
    }
    out = weighted_sum(models, {"k": 0.25, "a": 0.75, "b": 0.0})
    assert out["w"].dtype == torch.float64
    assert torch.allclose(
        out["w"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 4], dtype=torch.float64)
    )
    assert torch.equal(out["n"], torch.tensor([7]))  # integer tensors are not averaged


def test_weighted_sum_with_one_model_is_an_independent_copy() -> None:
    w = torch.tensor([1.0, 2.0])
    out = weighted_sum({"k": {"w": w}, "a": {"w": torch.tensor([9.0, 9.0])}}, {"k": 1.0})
    assert torch.equal(out["w"], w)
    out["w"][0] = 42.0
    assert w[0] == 1.0


def test_weighted_sum_of_matrices() -> None:
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.ones(2, 3)
    out = weighted_sum({"a": {"m": a}, "b": {"m": b}}, {"a": 0.5, "b": 0.5})
    assert out["m"].shape == (2, 3)
    assert torch.allclose(out["m"], (a + b) / 2)


def test_squared_distance_on_small_tensors() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "m": torch.tensor([[0.0, 1.0]]), "i": torch.tensor([5])}
    b = {"w": torch.tensor([4.0, 6.0]), "m": torch.tensor([[2.0, 1.0]]), "i": torch.tensor([500])}
    # (3^2 + 4^2) + (2^2 + 0) = 29; integer tensors do not count.
    assert squared_distance(a, b) == pytest.approx(29.0)
    assert squared_distance(a, a) == 0.0
