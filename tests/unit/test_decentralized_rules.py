"""The decentralized defenses of issue 13 (ubar, balance, clipped-gossip, ios) on hand-made numbers:
every expected model is worked out here by hand, including all-Byzantine neighbourhoods, missing
members and ties; then the one-row rule against the batched kernel on random neighbourhoods."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_node.aggregation import RULES, Aggregation, Candidate, RuleParams, make_rule
from mtl_node.aggregation.robust import check_neighbourhood
from mtl_node.config import build_config
from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError
from mtl_node.kernels import decentralized as kernels
from orchestrator.planner import plan_topology
from orchestrator.spec import parse_spec

NEW = ("ubar", "balance", "clipped-gossip", "ios")


def members(
    *points: tuple[float, ...], losses: tuple[float, ...] = (), missing: tuple[int, ...] = ()
) -> list[Candidate]:
    """Candidates k (the agent), a, b, c, ... at ``points`` with ``losses`` (if given)."""
    names = ["k", *"abcdefghij"]
    out = []
    for i, p in enumerate(points):
        if i in missing:
            out.append(Candidate(names[i], missing_reason="timeout: slow"))
        else:
            loss = losses[i] if losses else None
            out.append(Candidate(names[i], loss=loss, model=np.array(p, dtype=np.float64)))
    return out


def combined(agg: Aggregation) -> np.ndarray:
    assert agg.combined is not None
    return agg.combined


def verdicts(agg: Aggregation) -> dict[str, str]:
    return {d.agent_id: d.decision for d in agg.decisions}


def check_weights(agg: Aggregation, cands: list[Candidate]) -> None:
    """The weights sum to 1 over present members and the combined model is their weighted sum
    (true for every one of these rules: each is linear in the members once its choices are made)."""
    assert math.isclose(math.fsum(agg.weights.values()), 1.0, rel_tol=1e-12)
    models = {c.agent_id: c.model for c in cands if c.present}
    total = sum(w * models[a] for a, w in agg.weights.items())
    np.testing.assert_allclose(combined(agg), total, rtol=1e-12, atol=1e-12)


# -- ubar ------------------------------------------------------------------------------------------------


def test_ubar_keeps_the_closest_then_those_no_worse_than_self() -> None:
    # distances to k=(0,0): a 1, b 2, c 3, d 10; rho=0.5 of 4 -> 2 closest: a, b (both loss <= 1)
    cands = members((0, 0), (1, 0), (0, 2), (3, 0), (0, -10), losses=(1.0, 0.5, 0.8, 0.1, 5.0))
    agg = make_rule("ubar", RuleParams(ubar_rho=0.5, alpha=0.5)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [0.25, 0.5])  # 0.5*(0,0) + 0.5*mean((1,0),(0,2))
    assert verdicts(agg) == {
        "k": "accepted",
        "a": "accepted",
        "b": "accepted",
        "c": "filtered",
        "d": "filtered",
    }
    assert agg.weights == {"k": 0.5, "a": 0.25, "b": 0.25}
    reasons = {d.agent_id: d.reason for d in agg.decisions}
    assert reasons["c"] == "not among the 2 closest to own model"
    check_weights(agg, cands)


def test_ubar_keeps_the_best_selected_one_when_all_are_worse_than_self() -> None:
    cands = members((0, 0), (1, 0), (0, 2), (9, 9), losses=(1.0, 3.0, 2.0, 0.0))
    agg = make_rule("ubar", RuleParams(ubar_rho=0.6, alpha=0.5)).aggregate(cands)
    # ceil(0.6*3)=2 closest: a, b; neither has loss <= 1, the best of them (b, loss 2) is kept
    np.testing.assert_allclose(combined(agg), [0.0, 1.0])
    assert verdicts(agg)["a"] == "filtered" and verdicts(agg)["b"] == "accepted"
    assert next(d.reason for d in agg.decisions if d.agent_id == "a") == "loss 3 > own 1"


def test_ubar_all_byzantine_neighbourhood_moves_at_most_one_minus_alpha() -> None:
    # both neighbours are attackers far away with huge losses: the best selected one still gets 1-alpha
    cands = members((0, 0), (5, 5), (6, 6), losses=(1.0, 100.0, 200.0))
    agg = make_rule("ubar", RuleParams(ubar_rho=0.5, alpha=0.75)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [1.25, 1.25])  # 0.75*0 + 0.25*(5,5)
    assert agg.weights == {"k": 0.75, "a": 0.25}


def test_ubar_counts_only_present_neighbours_and_rho_exact() -> None:
    # 4 neighbours, b missing: m = 3, ceil(0.5*3) = 2 -> a and c; all losses <= own
    cands = members((0, 0), (1, 0), (0, 0.5), (0, 2), (4, 0), losses=(1.0, 0.1, 0.1, 0.1, 0.1), missing=(2,))
    agg = make_rule("ubar", RuleParams(ubar_rho=0.5, alpha=0.0)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [0.5, 1.0])
    assert verdicts(agg) == {
        "k": "accepted",
        "a": "accepted",
        "b": "missing",
        "c": "accepted",
        "d": "filtered",
    }
    # rho * m exactly an integer: 0.5 * 4 selects 2, not 3
    four = members((0, 0), (1, 0), (0, 2), (3, 0), (0, 4), losses=(1.0,) * 5)
    assert set(make_rule("ubar", RuleParams(ubar_rho=0.5)).aggregate(four).weights) == {"k", "a", "b"}


def test_ubar_ties_go_to_the_lower_slot_and_no_neighbour_means_own() -> None:
    cands = members((0, 0), (1, 0), (0, 1), losses=(1.0, 2.0, 2.0))
    agg = make_rule("ubar", RuleParams(ubar_rho=0.5, alpha=0.5)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [0.5, 0.0])  # a and b tie in distance and loss: a
    alone = make_rule("ubar").aggregate(members((2, 3), (9, 9), losses=(1.0, 0.0), missing=(1,)))
    np.testing.assert_array_equal(combined(alone), [2.0, 3.0])
    assert alone.weights == {"k": 1.0}
    # a NaN loss is never the best one: the other selected neighbour is
    nan = make_rule("ubar", RuleParams(ubar_rho=1.0)).aggregate(
        members((0, 0), (1, 0), (0, 2), losses=(1.0, math.nan, 3.0))
    )
    assert set(nan.weights) == {"k", "b"}


# -- balance ---------------------------------------------------------------------------------------------


def test_balance_accepts_within_the_radius_relative_to_own_norm() -> None:
    # own (3,4), ||own|| = 5, gamma 0.3, kappa 0: radius 1.5; a at 1.4, b at 1.5 (tie: accepted), c at 1.6
    cands = members((3, 4), (3, 5.4), (4.5, 4), (3, 5.6), (3, 4))
    agg = make_rule("balance", RuleParams(balance_gamma=0.3, balance_kappa=0.0, alpha=0.5)).aggregate(cands)
    # 0.5*(3,4) + 0.5*mean((3,5.4),(4.5,4),(3,4))
    np.testing.assert_allclose(combined(agg), [0.5 * 3 + 0.5 * 3.5, 0.5 * 4 + 0.5 * 13.4 / 3])
    assert verdicts(agg) == {
        "k": "accepted",
        "a": "accepted",
        "b": "accepted",
        "c": "filtered",
        "d": "accepted",
    }
    check_weights(agg, cands)


def test_balance_radius_decays_with_the_rounds() -> None:
    # radius = 0.3 * exp(-kappa * i / T) * 5: round 1 (T=10, kappa=1) 1.357; round 2 1.228
    rule = make_rule("balance", RuleParams(balance_gamma=0.3, balance_kappa=1.0, balance_rounds=10))
    cands = members((3, 4), (3, 5.3))  # distance 1.3
    assert verdicts(rule.aggregate(cands))["a"] == "accepted"
    second = rule.aggregate(cands)
    assert verdicts(second)["a"] == "filtered"
    assert "radius 1.228" in second.decisions[1].reason
    # the round count is state: a resumed rule continues the schedule
    resumed = make_rule("balance", RuleParams(balance_gamma=0.3, balance_kappa=1.0, balance_rounds=10))
    resumed.load_state(rule.state())
    assert resumed.state() == {"rounds": 2}


def test_balance_all_byzantine_outside_keeps_own_and_missing_left_out() -> None:
    cands = members((3, 4), (30, 40), (-3, -4), (1e6, 0), missing=(3,))
    agg = make_rule("balance").aggregate(cands)
    np.testing.assert_array_equal(combined(agg), [3.0, 4.0])
    assert agg.weights == {"k": 1.0}
    assert verdicts(agg) == {"k": "accepted", "a": "filtered", "b": "filtered", "c": "missing"}


def test_balance_all_byzantine_inside_moves_at_most_the_radius_times_one_minus_alpha() -> None:
    # attackers sit exactly on the radius (1.5) on both sides of x: the mean moves by 1.5 in y only
    cands = members((3, 4), (3, 5.5), (3, 5.5))
    agg = make_rule("balance", RuleParams(balance_kappa=0.0, alpha=0.5)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [3.0, 4.75])


# -- clipped gossip --------------------------------------------------------------------------------------


def test_clipped_gossip_clips_the_two_f_farthest_to_the_next_distance() -> None:
    # distances 1, 2, 3, 4; f=1: the 2 farthest (c, d) clipped to tau = 2 (b's distance)
    cands = members((0, 0), (1, 0), (0, 2), (3, 0), (0, -4))
    agg = make_rule("clipped-gossip", RuleParams(f=1)).aggregate(cands)
    # pulls (1,0) + (0,2) + (2,0) + (0,-2) = (3, 0), over n = 5
    np.testing.assert_allclose(combined(agg), [0.6, 0.0])
    assert agg.weights == pytest.approx(
        {"k": 1 - 0.2 - 0.2 - 2 / 15 - 0.1, "a": 0.2, "b": 0.2, "c": 2 / 15, "d": 0.1}
    )
    reasons = {d.agent_id: d.reason for d in agg.decisions}
    assert reasons["b"] == "" and reasons["d"] == "pull clipped to tau=2"
    check_weights(agg, cands)


def test_clipped_gossip_all_byzantine_moves_a_bounded_step() -> None:
    cands = members((0, 0), (10, 0), (0, 20), (0, -30))
    agg = make_rule("clipped-gossip", RuleParams(f=1)).aggregate(cands)
    np.testing.assert_allclose(combined(agg), [2.5, 0.0])  # tau 10: (10,0)+(0,10)+(0,-10) over 4


def test_clipped_gossip_ties_and_missing_members() -> None:
    # every neighbour at distance 1: tau = 1, nothing is clipped: plain average
    square = members((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))
    agg = make_rule("clipped-gossip", RuleParams(f=1)).aggregate(square)
    np.testing.assert_allclose(combined(agg), [0.0, 0.0], atol=1e-15)
    assert agg.weights == pytest.approx(dict.fromkeys("kabcd", 0.2))
    # a missing member leaves 3 present, fewer than 2f+2 = 4: own model, said why
    short = make_rule("clipped-gossip", RuleParams(f=1)).aggregate(
        members((0, 0), (1, 0), (0, 1), (5, 5), missing=(3,))
    )
    assert short.weights == {"k": 1.0}
    assert "clipped-gossip needs 4 members (2f+2, f=1), 3 present" in short.decisions[0].reason


# -- ios -------------------------------------------------------------------------------------------------


def test_ios_drops_the_farthest_from_the_mean_f_times() -> None:
    cands = members((0, 0), (1, 0), (-1, 0), (0, 9), (0, 0.5))
    one = make_rule("ios", RuleParams(f=1)).aggregate(cands)
    # mean (0, 1.9): c is farthest; the rest average to (0, 0.125)
    np.testing.assert_allclose(combined(one), [0.0, 0.125])
    assert verdicts(one) == {
        "k": "accepted",
        "a": "accepted",
        "b": "accepted",
        "c": "filtered",
        "d": "accepted",
    }
    two = make_rule("ios", RuleParams(f=2)).aggregate(cands)
    # then mean (0, 0.125): a and b tie (1.0078), a (the lower slot) goes; left k, b, d
    np.testing.assert_allclose(combined(two), [-1 / 3, 0.5 / 3])
    assert verdicts(two)["a"] == "filtered" and verdicts(two)["b"] == "accepted"
    check_weights(two, cands)


def test_ios_never_drops_the_agent_itself() -> None:
    agg = make_rule("ios", RuleParams(f=1)).aggregate(members((100, 0), (0, 0), (1, 0)))
    np.testing.assert_allclose(combined(agg), [50.5, 0.0])  # own is farthest, a is dropped


def test_ios_all_byzantine_and_missing() -> None:
    agg = make_rule("ios", RuleParams(f=1)).aggregate(members((0, 0), (10, 0), (0, 10)))
    np.testing.assert_allclose(combined(agg), [0.0, 5.0])  # tie: a dropped, own and b averaged
    short = make_rule("ios", RuleParams(f=1)).aggregate(members((0, 0), (10, 0), (0, 10), missing=(2,)))
    assert short.weights == {"k": 1.0} and verdicts(short)["b"] == "missing"


# -- shared ----------------------------------------------------------------------------------------------


def test_registered_in_the_catalog_with_their_assumptions() -> None:
    for rule in NEW:
        assert rule in RULES and rule in catalog.RULE_NAMES
        assert make_rule(rule).needs_models
    assert make_rule("ubar").needs_loss
    with pytest.raises(ConfigError, match=r"clipped-gossip with f=1 needs 4 .*2f\+2.*has 2 neighbours"):
        check_neighbourhood("clipped-gossip", RuleParams(f=1), 2)
    with pytest.raises(ConfigError, match=r"ios with f=2 needs 5 .*has 3 neighbours"):
        check_neighbourhood("ios", RuleParams(f=2), 3)
    check_neighbourhood("ubar", RuleParams(f=5), 1)  # no assumption on f
    check_neighbourhood("balance", RuleParams(f=5), 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 1.5),
        ("ubar_rho", 0.0),
        ("balance_gamma", -1.0),
        ("balance_kappa", math.inf),
        ("balance_rounds", 0),
    ],
)
def test_bad_parameters_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"id": "a", "rule": "ubar", "rule_params": {field: value}})
    assert err.value.field == f"rule_params.{field}"


def test_non_finite_models_never_reach_the_result() -> None:
    for rule in NEW:
        agg = make_rule(rule, RuleParams(f=1, balance_gamma=10.0)).aggregate(
            members((1, 1), (1, 2), (math.nan, 0), (math.inf, 1), (2, 1), losses=(1.0, 0.5, 0.1, 0.1, 0.5))
        )
        assert np.isfinite(combined(agg) if agg.combined is not None else 0.0).all(), rule
        assert agg.weights.get("b", 0.0) == 0.0 and agg.weights.get("c", 0.0) == 0.0, (rule, agg.weights)


def test_one_row_rule_equals_the_batched_kernel() -> None:
    """Random neighbourhoods with missing slots: each row through the rule class (one row) and all
    rows through the kernel at once give bit-identical models."""
    rng = np.random.default_rng(3)
    rows, slots, dim = 30, 7, 4
    X = rng.normal(size=(rows, slots, dim)) * rng.choice([0.1, 1.0, 10.0], size=(rows, slots, 1))
    X[::5, 2] = X[::5, 1]  # exact duplicates: ties
    present = rng.random((rows, slots)) > 0.2
    present[:, 0] = True
    present[:, 1:5] = True  # at least 5 members: clipped-gossip and ios with f=1 always run
    loss = rng.uniform(0.0, 2.0, size=(rows, slots))
    p = RuleParams(f=1, ubar_rho=0.6, alpha=0.3, balance_gamma=1.0, balance_kappa=0.5, balance_rounds=10)
    one = np.ones(rows)
    batched = {
        "ubar": kernels.ubar(X, present, loss, p.ubar_rho * one, p.alpha * one)[0],
        "balance": kernels.balance(
            X, present, p.balance_gamma * one, p.balance_kappa * one, one, 10 * one, p.alpha * one
        )[0],
        "clipped-gossip": kernels.clipped_gossip(X, present, np.ones(rows, dtype=np.int64))[0],
        "ios": kernels.ios(X, present, np.ones(rows, dtype=np.int64))[0],
    }
    for rule, expected in batched.items():
        for r in range(rows):
            missing = tuple(s for s in range(slots) if not present[r, s])
            cands = members(*map(tuple, X[r]), losses=tuple(loss[r]), missing=missing)
            got = combined(make_rule(rule, p).aggregate(cands))
            np.testing.assert_array_equal(got, expected[r], err_msg=f"{rule} row {r}")


def test_random_rounds_give_finite_models_and_consistent_decisions() -> None:
    """Property: whatever arrives (huge, tiny, duplicated, missing), the new model is finite, the
    weights are finite, non-negative and sum to 1, and the decisions agree with the weights."""
    rng = np.random.default_rng(11)
    scales = [1e-300, 1e-3, 1.0, 1e6, 1e300, 1.5e308]
    for rule in NEW:
        for trial in range(60):
            f = int(rng.integers(0, 3))
            params = RuleParams(
                f=f, ubar_rho=float(rng.uniform(0.1, 1.0)), balance_gamma=float(rng.choice([0.1, 1.0, 1e3]))
            )
            n = int(rng.integers(1, 9))
            pts = rng.uniform(-1.0, 1.0, (n, 3)) * rng.choice(scales, size=(n, 1))
            if n > 2 and trial % 3 == 0:
                pts[2] = pts[1]  # an exact duplicate (ties)
            losses = tuple(rng.choice([0.1, 1.0, 10.0, math.inf, math.nan], size=n).tolist())
            missing = tuple(i for i in range(1, n) if rng.random() < 0.2)
            cands = members(*map(tuple, pts), losses=losses, missing=missing)
            agg = make_rule(rule, params).aggregate(cands)
            assert len(agg.decisions) == n
            assert all(math.isfinite(v) and v >= 0.0 for v in agg.weights.values()), (rule, agg.weights)
            assert math.isclose(math.fsum(agg.weights.values()), 1.0, rel_tol=1e-9), (rule, agg.weights)
            model = agg.combined if agg.combined is not None else cands[0].model
            assert model is not None and np.isfinite(model).all(), (rule, trial)
            for d in agg.decisions:
                if d.decision == "accepted":
                    assert d.agent_id in agg.weights, (rule, d)
                else:
                    assert d.agent_id not in agg.weights or agg.weights[d.agent_id] == 0.0, (rule, d)


def test_the_planner_refuses_a_ring_too_sparse_for_clipped_gossip_and_ios() -> None:
    # ring k=1: 2 neighbours; clipped-gossip with f=1 needs 3, ios with f=1 needs 2
    spec = {"name": "t", "agents": 8, "graph": {"kind": "ring", "k": 1}, "rules": ["ubar", "clipped-gossip"]}
    with pytest.raises(ConfigError) as err:
        plan_topology(parse_spec(spec))
    assert (
        err.value.field == "rules.1" and "2 neighbours" in err.value.problem and "2f+2" in err.value.problem
    )
    plan = plan_topology(parse_spec({**spec, "rules": ["ubar", "balance", "ios"]}))
    assert plan.rules == ("ubar", "balance", "ios")
    with pytest.raises(ConfigError, match="ios with f=2 needs 5"):
        plan_topology(parse_spec({**spec, "rules": ["ios"], "rule_params": {"f": 2}}))
