"""The robust baselines on hand-made numbers: every expected model is worked out here by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_node.aggregation import RULES, Aggregation, Candidate, RuleParams, make_rule
from mtl_node.aggregation.robust import (
    ROBUST_RULES,
    check_neighbourhood,
    check_topology,
    max_f,
    required_members,
)
from mtl_node.config import build_config
from mtl_node.core import names as catalog
from mtl_node.core.errors import ConfigError
from orchestrator.planner import plan_topology
from orchestrator.spec import parse_spec


def members(*points: tuple[float, ...], missing: tuple[int, ...] = ()) -> list[Candidate]:
    """Candidates k (the agent), a, b, c, ... at ``points``; indices in ``missing`` did not arrive."""
    names = ["k", *"abcdefghij"]
    return [
        Candidate(names[i], missing_reason="timeout: slow")
        if i in missing
        else Candidate(names[i], model=np.array(p, dtype=np.float64))
        for i, p in enumerate(points)
    ]


def decisions(agg: Aggregation) -> dict[str, tuple[str, float, str]]:
    return {d.agent_id: (d.decision, d.weight, d.reason) for d in agg.decisions}


def combined(agg: Aggregation) -> np.ndarray:
    assert agg.combined is not None
    return agg.combined


# x: 1, 2, 4, 7, 100 (one outlier); y: 5, -1, 0, 3, -50 (one outlier).
FIVE = members((1, 5), (2, -1), (4, 0), (7, 3), (100, -50))


# -- median ---------------------------------------------------------------------------------------------


def test_median_of_five_with_an_outlier() -> None:
    agg = make_rule("median").aggregate(FIVE)
    # sorted x: 1 2 [4] 7 100; sorted y: -50 -1 [0] 3 5
    np.testing.assert_array_equal(combined(agg), [4.0, 0.0])
    # every member took part in the statistic: accepted, weight 1/n
    assert decisions(agg) == {a: ("accepted", 0.2, "") for a in "kabcd"}
    assert agg.weights == dict.fromkeys("kabcd", 0.2)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    agg = make_rule("median").aggregate(members((1, 5), (2, -1), (4, 0), (7, 3)))
    # x: 1 [2 4] 7 -> 3; y: -1 [0 3] 5 -> 1.5
    np.testing.assert_array_equal(combined(agg), [3.0, 1.5])


def test_median_leaves_missing_members_out_before_the_maths() -> None:
    agg = make_rule("median").aggregate(members((1, 5), (2, -1), (1000, 1000), (7, 3), missing=(2,)))
    # present x: 1 [2] 7, y: -1 [3] 5
    np.testing.assert_array_equal(combined(agg), [2.0, 3.0])
    assert decisions(agg)["b"] == ("missing", 0.0, "timeout: slow")
    assert decisions(agg)["a"] == ("accepted", pytest.approx(1 / 3), "")
    assert (agg.count("accepted"), agg.count("filtered"), agg.count("missing")) == (2, 0, 1)


# -- trimmed mean ---------------------------------------------------------------------------------------


def test_trimmed_mean_drops_f_per_side_and_averages_the_rest() -> None:
    agg = make_rule("trimmed-mean", RuleParams(f=1)).aggregate(FIVE)
    # x: drop 1 and 100 -> (2 + 4 + 7) / 3; y: drop -50 and 5 -> (-1 + 0 + 3) / 3
    np.testing.assert_allclose(combined(agg), [13 / 3, 2 / 3], rtol=0, atol=1e-15)
    assert {d.decision for d in agg.decisions} == {"accepted"}


def test_trimmed_mean_with_f_0_is_the_mean_and_with_f_2_the_median() -> None:
    mean = make_rule("trimmed-mean", RuleParams(f=0)).aggregate(FIVE)
    np.testing.assert_allclose(combined(mean), [114 / 5, -43 / 5], rtol=0, atol=1e-12)
    two = make_rule("trimmed-mean", RuleParams(f=2)).aggregate(FIVE)
    np.testing.assert_array_equal(combined(two), [4.0, 0.0])


# -- krum -----------------------------------------------------------------------------------------------


def test_krum_selects_the_member_closest_to_its_nearest_others() -> None:
    # On a line at 0, 1, 2, 4, 50 with f = 1: n - f - 2 = 2 nearest others each. Squared distances:
    # k: 1 + 4 = 5; a: 1 + 1 = 2; b: 1 + 4 = 5; c: 4 + 9 = 13; d: 46^2 + 48^2.
    agg = make_rule("krum", RuleParams(f=1)).aggregate(members((0, 0), (1, 0), (2, 0), (4, 0), (50, 0)))
    assert agg.weights == {"a": 1.0}
    assert agg.combined is None  # the selected model itself
    got = decisions(agg)
    assert got["a"] == ("accepted", 1.0, "")
    for other in "kbcd":
        assert got[other] == ("filtered", 0.0, "krum selected a")
    assert (agg.count("accepted"), agg.count("filtered")) == (1, 3)  # the agent itself is not counted


def test_krum_takes_the_first_member_on_a_tie() -> None:
    # 0, 1, 3, 4, 50: k 1+9, a 1+4, b 1+4, c 1+9 -> a and b tie at 5; a comes first.
    agg = make_rule("krum", RuleParams(f=1)).aggregate(members((0, 0), (1, 0), (3, 0), (4, 0), (50, 0)))
    assert agg.weights == {"a": 1.0}


def test_krum_with_larger_f_scores_on_fewer_neighbours() -> None:
    # 7 members, f = 2: each scored on its n - f - 2 = 3 nearest others. Cluster 0..4, two attackers
    # at 100 and 105: k 1+4+9 = 14, a 1+1+4 = 6, b 1+1+4 = 6, c 1+1+4 = 6, d 14, attackers > 5000.
    pts = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (100, 0), (105, 0)]
    agg = make_rule("krum", RuleParams(f=2)).aggregate(members(*pts))
    assert agg.weights == {"a": 1.0}  # a, b and c tie; a comes first


# -- geometric median ---------------------------------------------------------------------------------


def test_geometric_median_of_symmetric_points_is_the_centre() -> None:
    # Four points symmetric about (1, 1), with the agent on one of them.
    agg = make_rule("geometric-median").aggregate(members((2, 1), (0, 1), (1, 2), (1, 0)))
    np.testing.assert_allclose(combined(agg), [1.0, 1.0], rtol=0, atol=1e-12)
    assert decisions(agg)["c"] == ("accepted", 0.25, "")


def test_geometric_median_of_an_equilateral_triangle_is_its_centroid() -> None:
    # Weiszfeld starts at the coordinate-wise median (1, 0), away from the answer (1, sqrt(3)/3).
    h = math.sqrt(3.0)
    agg = make_rule("geometric-median", RuleParams(weiszfeld_iters=200)).aggregate(
        members((0, 0), (2, 0), (1, h))
    )
    np.testing.assert_allclose(combined(agg), [1.0, h / 3], rtol=0, atol=1e-9)


def test_geometric_median_is_barely_moved_by_a_far_outlier() -> None:
    square = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    agg = make_rule("geometric-median").aggregate(members(*square, (1e6, 1e6)))
    # The mean would sit at 2e5; one outlier among 5 moves the geometric median by less than 1.
    assert float(np.linalg.norm(combined(agg))) < 1.0


# -- self-clipping ---------------------------------------------------------------------------------------


def test_self_clipping_clips_far_pulls_to_tau() -> None:
    # Own model at the origin, tau = 1: a's pull (0.5, 0) is kept; b's (10, 0) becomes (1, 0);
    # c's (0, -3) becomes (0, -1). n = 4: (0, 0) + ((0.5, 0) + (1, 0) + (0, -1)) / 4.
    agg = make_rule("self-clipping", RuleParams(clip_tau=1.0)).aggregate(
        members((0, 0), (0.5, 0), (10, 0), (0, -3))
    )
    np.testing.assert_allclose(combined(agg), [0.375, -0.25], rtol=0, atol=1e-15)
    # effective weights: a 1/4, b (1/10)/4, c (1/3)/4, the agent the rest
    want = {"a": 0.25, "b": 0.025, "c": 1 / 12}
    want["k"] = 1.0 - sum(want.values())
    assert agg.weights == pytest.approx(want, abs=1e-15)
    got = decisions(agg)
    assert got["a"] == ("accepted", 0.25, "")
    assert got["b"][0] == "accepted" and got["b"][2] == "pull clipped to tau=1"
    # the weights reproduce the combined model as a weighted sum
    pts = {"k": (0, 0), "a": (0.5, 0), "b": (10, 0), "c": (0, -3)}
    linear = sum(w * np.array(pts[a], dtype=float) for a, w in agg.weights.items())
    np.testing.assert_allclose(linear, combined(agg), atol=1e-15)


def test_self_clipping_moves_at_most_tau_over_n_per_attacker() -> None:
    tau = 0.5
    agg = make_rule("self-clipping", RuleParams(clip_tau=tau)).aggregate(
        members((3, 4), (1e9, -1e9), (-1e9, 5e8), (2e9, 2e9))
    )
    assert float(np.linalg.norm(combined(agg) - np.array([3.0, 4.0]))) <= 3 * tau / 4 + 1e-12


def test_self_clipping_leaves_out_a_pull_whose_length_overflows() -> None:
    agg = make_rule("self-clipping").aggregate(members((-1e308, 0), (1e308, 0), (-1e308, 1)))
    got = decisions(agg)
    assert got["a"] == ("filtered", 0.0, "pull not finite")
    assert got["b"][0] == "accepted"
    assert np.isfinite(combined(agg)).all()


# -- assumptions: at run time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "f", "present", "need"),
    [
        ("median", 1, 2, 3),
        ("trimmed-mean", 2, 4, 5),
        ("geometric-median", 1, 2, 3),
        ("krum", 1, 4, 5),
    ],
)
def test_too_few_present_members_keep_the_own_model(rule: str, f: int, present: int, need: int) -> None:
    # One neighbour more than needed is listed, but one is missing this round.
    pts = [(float(i), float(-i)) for i in range(present + 1)]
    agg = make_rule(rule, RuleParams(f=f)).aggregate(members(*pts, missing=(1,)))
    assert agg.weights == {"k": 1.0}
    assert agg.combined is None
    got = decisions(agg)
    assert got["a"] == ("missing", 0.0, "timeout: slow")
    reason = got["k"][2]
    assert f"{rule} needs {need} members" in reason and f"{present} present" in reason
    assert "keeping own model" in reason
    assert all(got[x][0] == "filtered" for x in got if x not in ("k", "a"))


def test_a_combined_model_that_overflows_falls_back_to_the_own_model() -> None:
    agg = make_rule("trimmed-mean", RuleParams(f=0)).aggregate(members((1e308, 0), (1e308, 0)))
    assert agg.weights == {"k": 1.0}
    assert decisions(agg)["a"] == ("filtered", 0.0, "combined model not finite; keeping own model")


def test_self_clipping_has_no_size_assumption() -> None:
    agg = make_rule("self-clipping").aggregate(members((1, 2)))
    np.testing.assert_array_equal(combined(agg), [1.0, 2.0])


def test_a_present_member_without_a_model_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no model"):
        make_rule("median").aggregate([Candidate("k", model=np.zeros(2)), Candidate("a"), Candidate("b")])


# -- assumptions: when a topology is planned ---------------------------------------------------------


def test_requirements_and_largest_f() -> None:
    assert [required_members(r, 1) for r in ROBUST_RULES] == [3, 3, 3, 5, 1]
    assert required_members("loss-filtered", 1) is None
    assert max_f("krum", 5) == 1 and max_f("krum", 4) == 0 and max_f("krum", 2) == -1
    assert max_f("median", 7) == 3 and max_f("self-clipping", 3) is None


def test_krum_on_too_small_a_neighbourhood_names_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        check_neighbourhood("krum", RuleParams(f=1), degree=3, agent="a7")
    e = err.value
    assert e.field == "rule"
    assert "krum with f=1 needs 5" in e.problem and "2f+3" in e.problem and "a7 has 3 neighbours" in e.problem
    assert e.fix is not None and "at least 4 neighbours" in e.fix and "rule_params.f <= 0" in e.fix
    check_neighbourhood("krum", RuleParams(f=1), degree=4)  # exactly enough
    check_neighbourhood("krum", RuleParams(f=0), degree=2)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "geometric-median"])
def test_two_f_plus_one_rules(rule: str) -> None:
    with pytest.raises(ConfigError, match=rf"{rule} with f=2 needs 5 .*2f\+1.*has 3 neighbours"):
        check_neighbourhood(rule, RuleParams(f=2), degree=3)
    check_neighbourhood(rule, RuleParams(f=2), degree=4)


def test_rules_without_assumptions_pass_any_degree() -> None:
    for rule in ("self-clipping", "loss-filtered", "average", "none"):
        check_neighbourhood(rule, RuleParams(f=5), degree=0)


def test_check_topology_names_the_rule_list_entry() -> None:
    with pytest.raises(ConfigError) as err:
        check_topology(["loss-filtered", "median"], RuleParams(), {"a0": 5, "a1": 1}, field="rules")
    assert err.value.field == "rules.1" and "agent a1 has 1 neighbour " in str(err.value)


def test_the_planner_refuses_a_ring_too_sparse_for_krum() -> None:
    spec = {"name": "t", "agents": 8, "graph": {"kind": "ring", "k": 1}, "rules": ["loss-filtered", "krum"]}
    with pytest.raises(ConfigError) as err:
        plan_topology(parse_spec(spec))
    assert err.value.field == "rules.1" and "2 neighbours" in err.value.problem
    # a ring with two neighbours per side is enough for f = 1
    plan = plan_topology(parse_spec({**spec, "graph": {"kind": "ring", "k": 2}}))
    assert plan.rules == ("loss-filtered", "krum")


def test_the_planner_checks_normal_agents_only() -> None:
    # a5 has a single neighbour, but it is Byzantine: it never aggregates.
    spec = {
        "name": "t",
        "agents": 6,
        "graph": {
            "kind": "adjacency",
            "adjacency": {f"a{i}": [f"a{j}" for j in range(5) if j != i] for i in range(5)} | {"a5": ["a0"]},
            "directed": True,
        },
        "rule": "median",
        "byzantine": {"ids": ["a5"]},
    }
    plan_topology(parse_spec(spec))
    with pytest.raises(ConfigError, match="a5 has 1 neighbour"):
        plan_topology(parse_spec({**spec, "byzantine": {"ids": ["a4"]}}))


def test_bad_robust_parameters_name_the_field() -> None:
    for field, value in (("f", -1), ("clip_tau", 0.0), ("weiszfeld_iters", 0), ("clip_tau", math.inf)):
        with pytest.raises(ConfigError) as err:
            build_config({"id": "a", "rule": "median", "rule_params": {field: value}})
        assert err.value.field == f"rule_params.{field}"


# -- registry ------------------------------------------------------------------------------------------


def test_registered_and_in_the_catalog() -> None:
    for rule in ROBUST_RULES:
        assert rule in RULES and rule in catalog.RULE_NAMES
        assert make_rule(rule).needs_models, rule
        assert not make_rule(rule).needs_loss, rule


def test_random_rounds_give_finite_models_and_consistent_decisions() -> None:
    """Property: whatever arrives (huge, tiny, duplicated, missing), the new model is finite, the
    weights are finite and sum to 1, and decisions agree with the weights."""
    rng = np.random.default_rng(7)
    scales = [1e-300, 1e-3, 1.0, 1e6, 1e300, 1.5e308]
    for rule in ROBUST_RULES:
        for trial in range(40):
            f = int(rng.integers(0, 3))
            agg_rule = make_rule(rule, RuleParams(f=f, clip_tau=float(rng.choice([0.1, 1.0, 1e3]))))
            n = int(rng.integers(1, 9))
            pts = rng.uniform(-1.0, 1.0, (n, 3)) * rng.choice(scales, size=(n, 1))
            if n > 2 and trial % 3 == 0:
                pts[2] = pts[1]  # an exact duplicate (ties)
            missing = tuple(i for i in range(1, n) if rng.random() < 0.2)
            agg = agg_rule.aggregate(members(*map(tuple, pts), missing=missing))
            assert len(agg.decisions) == n
            assert all(math.isfinite(w) and w >= 0.0 for w in agg.weights.values()), (rule, agg.weights)
            assert math.fsum(agg.weights.values()) == pytest.approx(1.0, abs=1e-12), (rule, trial)
            if agg.combined is not None:
                assert np.isfinite(agg.combined).all()
            for d in agg.decisions:
                assert d.weight == agg.weights.get(d.agent_id, 0.0), (rule, d)
                assert (d.decision == "accepted") == (d.agent_id in agg.weights), (rule, d)
                assert (d.decision == "missing") == (
                    d.agent_id in [agg.decisions[i].agent_id for i in missing]
                )


# -- hardened loss-filtered variants -------------------------------------------------------------------

# nu = 1, no initial EMA: the EMA is this round's loss. Losses k 2, a 1, b 0.5, e 2 (a tie with self):
# all kept; inverse losses 1/2, 1, 2, 1/2 sum to 4, so loss-filtered weighs k 1/8, a 1/4, b 1/2, e 1/8.
RAW = RuleParams(nu=1.0, ema_init=None)
LOSSES = {"k": 2.0, "a": 1.0, "b": 0.5, "e": 2.0}
MODELS = {"k": (0.0, 0.0), "a": (0.1, 0.0), "b": (0.0, 0.2), "e": (5.0, 0.0)}


def scored(own_step: float = 0.1) -> list[Candidate]:
    """The agent's own candidate carries its squared adaptation step ||theta(i-1) - psi||^2."""
    return [
        Candidate(a, loss=LOSSES[a], sq_distance=own_step**2 if a == "k" else None, model=np.array(MODELS[a]))
        for a in LOSSES
    ]


def test_capped_limits_each_neighbour_to_weight_cap_times_own() -> None:
    base = make_rule("loss-filtered", RAW).aggregate(scored())
    assert base.weights == {"k": 0.125, "a": 0.25, "b": 0.5, "e": 0.125}
    # cap 1 x own (1/8): a and b drop to 1/8, the excess 1/2 goes to k: 5/8
    agg = make_rule("loss-filtered-capped", RAW.model_copy(update={"weight_cap": 1.0})).aggregate(scored())
    assert agg.weights == {"k": 0.625, "a": 0.125, "b": 0.125, "e": 0.125}
    got = decisions(agg)
    assert got["a"] == ("accepted", 0.125, "weight capped at 1 x own")
    assert got["e"] == ("accepted", 0.125, "")  # at the cap, not above it
    # cap 2 x own (1/4): only b is above it
    agg2 = make_rule("loss-filtered-capped", RAW.model_copy(update={"weight_cap": 2.0})).aggregate(scored())
    assert agg2.weights == {"k": 0.375, "a": 0.25, "b": 0.25, "e": 0.125}


def test_capped_equals_loss_filtered_when_no_cap_binds() -> None:
    cands = [Candidate("k", loss=1.0), Candidate("a", loss=2.0), Candidate("b", loss=1.0)]
    plain = make_rule("loss-filtered", RAW).aggregate(cands)
    capped = make_rule("loss-filtered-capped", RAW).aggregate(cands)
    assert capped.weights == plain.weights and capped.decisions == plain.decisions


def test_clipped_clips_pulls_beyond_scale_times_the_own_step() -> None:
    # own step 0.1, clip_scale 2: tau = 0.2. a (0.1 away) and b (0.2) pass; e's pull (5, 0) becomes
    # (0.2, 0): effective weight 1/8 x 0.2/5 = 0.005; k keeps the rest.
    agg = make_rule("loss-filtered-clipped", RAW).aggregate(scored())
    np.testing.assert_allclose(combined(agg), [0.25 * 0.1 + 0.005 * 5.0, 0.5 * 0.2], rtol=0, atol=1e-15)
    assert agg.weights == pytest.approx({"k": 0.245, "a": 0.25, "b": 0.5, "e": 0.005}, abs=1e-15)
    got = decisions(agg)
    assert got["e"][0] == "accepted" and got["e"][2] == "pull clipped to tau=0.2"
    assert got["a"][2] == "" and got["b"][2] == ""


def test_clipped_radius_follows_an_ema_of_the_own_step() -> None:
    # nu = 0.5: squared steps 0.04 then 0.16 give an EMA of 0.04, then 0.1: tau = 2 sqrt(0.1)
    rule = make_rule("loss-filtered-clipped", RuleParams(nu=0.5, ema_init=None))
    rule.aggregate(scored(own_step=0.2))
    agg = rule.aggregate(scored(own_step=0.4))
    tau = 2 * math.sqrt(0.1)
    assert decisions(agg)["e"][2] == f"pull clipped to tau={tau:.4g}"
    assert decisions(agg)["b"][2] == ""  # 0.2 < tau


def test_clipped_with_a_zero_own_step_keeps_the_own_model() -> None:
    # An agent that has not adapted yet (HAR with train_share < 1: no local step this round) has
    # tau = 0: every kept pull is clipped to nothing, the agent keeps its model and all the weight.
    agg = make_rule("loss-filtered-clipped", RAW).aggregate(scored(own_step=0.0))
    np.testing.assert_array_equal(combined(agg), [0.0, 0.0])
    assert agg.weights == {"k": 1.0}
    got = decisions(agg)
    for a in ("a", "b", "e"):
        assert got[a] == ("accepted", 0.0, "pull clipped to tau=0")


def test_clipped_equals_loss_filtered_when_nothing_is_far() -> None:
    cands = scored(own_step=10.0)  # tau = 20: nobody is clipped
    plain = make_rule("loss-filtered", RAW).aggregate(cands)
    agg = make_rule("loss-filtered-clipped", RAW).aggregate(cands)
    assert agg.weights == pytest.approx(plain.weights, abs=1e-15)
    assert [d.reason for d in agg.decisions] == [d.reason for d in plain.decisions]


def test_hardened_rules_are_registered() -> None:
    for rule in ("loss-filtered-capped", "loss-filtered-clipped"):
        assert rule in RULES and rule in catalog.RULE_NAMES
        assert make_rule(rule).needs_loss
    assert make_rule("loss-filtered-clipped").needs_models
