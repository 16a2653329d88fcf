"""Attackers fetching from attackers in the batched engine, against the per-agent engine.

An attack built from the requester's model (echo, distance-capture, loss-budget, dissensus, rop)
asks its requester for that model. When the requester is itself an attacker, what it answers is
its own attack: a pool attacker (ipm, alie, mimic, min-max, min-sum) answers everyone alike, so
the result is fixed and the batched engine reproduces it. Two dissensus/rop or requester-model
attackers that fetch from each other need each other's answer to make their own; which asks first
decides what both get, so those networks are refused (and run on the per-agent engine).

The scenario (test_batched.attack_configs): four attackers m01, m04, m06, m10 where m01 and m06
list each other, m04 lists m10 and m01, m10 lists m01; every rule among the normal agents.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_batched import POOL_TOL, TOL, assert_same_runs, attack_configs

from mtl_node.aggregation import RuleParams
from mtl_node.batched import run_batched, supports, unsupported_reason
from mtl_node.config import NodeConfig
from mtl_node.engine import IN_PROCESS, run_agents

# attacker id -> (attack, parameters)
Assign = dict[str, tuple[str, dict[str, Any]]]


def assigned(attacks: Assign, drop: tuple[str, str] | None = None) -> list[NodeConfig]:
    """attack_configs with each attacker's own attack; ``drop`` = (agent, neighbour) unlists one."""
    out = []
    for c in attack_configs("alie", {}):
        if c.id in attacks:
            name, params = attacks[c.id]
            c = c.model_copy(update={"attack": name, "attack_params": params})
        if drop is not None and c.id == drop[0]:
            c = c.model_copy(update={"neighbors": {n: v for n, v in c.neighbors.items() if n != drop[1]}})
        out.append(c)
    return out


CASES: list[tuple[str, Assign, tuple[str, str] | None]] = [
    # a pool attacker (m01) is the requester of a dissensus attacker (m06) that lists it; echo
    # (m04) has no route to its requester m06 and serves it its own model
    (
        "pool requester of dissensus",
        {
            "m01": ("alie", {"z": 1.5}),
            "m06": ("dissensus", {"eps": 1.5}),
            "m04": ("echo", {}),
            "m10": ("rop", {}),
        },
        None,
    ),
    (
        "pool requester of requester-model attacks",
        {
            "m01": ("min-max", {}),
            "m06": ("distance-capture", {"r": 0.3}),
            "m04": ("loss-budget", {}),
            "m10": ("mimic", {}),
        },
        None,
    ),
    (
        "on-off pool requester",
        {
            "m01": ("on-off", {"honest_rounds": 3, "attack_rounds": 2, "then": "ipm"}),
            "m06": ("echo", {}),
            "m04": ("alie", {}),
            "m10": ("rop", {"z": 3.0}),
        },
        None,
    ),
    # dissensus/rop attackers fetching from each other one way only: the fetched one cannot reach
    # its requester and serves it what it serves a stranger
    ("one-way dissensus", {a: ("dissensus", {}) for a in ("m01", "m04", "m06", "m10")}, ("m01", "m06")),
    (
        "one-way rop and echo",
        {"m01": ("echo", {}), "m04": ("rop", {}), "m06": ("rop", {"angle": 45.0}), "m10": ("dissensus", {})},
        ("m01", "m06"),
    ),
]


@pytest.mark.parametrize(("name", "attacks", "drop"), CASES, ids=[c[0] for c in CASES])
def test_attackers_fetching_attackers_same_as_per_agent_engine(
    name: str, attacks: Assign, drop: tuple[str, str] | None
) -> None:
    configs = assigned(attacks, drop)
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), POOL_TOL)


def test_mutual_requester_model_attackers_are_refused() -> None:
    for a, b in [("dissensus", "echo"), ("rop", "dissensus"), ("dissensus", "loss-budget")]:
        configs = assigned({"m01": (a, {}), "m06": (b, {}), "m04": ("alie", {}), "m10": ("alie", {})})
        reason = unsupported_reason(configs) or ""
        assert "m01" in reason and "m06" in reason and "which asks first" in reason, (a, b, reason)
    # a pool attacker and a requester-model attacker fetching from each other are fine
    assert supports(assigned({"m01": ("alie", {}), "m06": ("echo", {})}))


def test_requester_with_a_non_finite_model() -> None:
    """An echo attacker's requester whose model is not finite (it started at inf): the attacker
    cannot use it (the wire rejects it) and serves its own model, in both engines."""
    ids = ["n0", "n1", "n2", "x3"]
    configs = [
        NodeConfig(
            id=agent,
            neighbors={b: IN_PROCESS for b in ids if b != agent},
            rule="average" if k % 2 else "loss-filtered",
            rule_params=RuleParams(f=0),
            rounds=6,
            seed=4,
            task_params={"init": (float("inf"), 0.0)} if agent == "n1" else {},
            attack="echo" if agent == "x3" else None,
        )
        for k, agent in enumerate(ids)
    ]
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the attack's std, on purpose
def test_requester_model_of_the_round_before() -> None:
    """An alie requester r with an on-off constant of 1e200 in its pool serves a non-finite model
    in the rounds after each burst (its std overflows) and a finite one otherwise: echo s, fetching
    r's model for r, then gets nothing valid and falls back to what r served it the round before,
    which r pools in turn; both engines alike."""
    neighbours = {
        "n0": ["n1", "s", "r"],
        "n1": ["n0", "s", "r"],
        "r": ["s", "c", "n0"],
        "s": ["r", "n0", "n1"],
    }
    neighbours["c"] = ["n0"]
    burst = {"low": 1e200, "high": 1e200}
    attacks: Assign = {
        "r": ("alie", {"z": 1.0}),
        "s": ("echo", {}),
        "c": ("on-off", {"honest_rounds": 2, "attack_rounds": 1, "then": "constant", "then_params": burst}),
    }
    configs = [
        NodeConfig(
            id=agent,
            neighbors={b: IN_PROCESS for b in listed},
            rule="average",
            rounds=9,
            seed=3,
            attack=attacks[agent][0] if agent in attacks else None,
            attack_params=attacks[agent][1] if agent in attacks else {},
        )
        for agent, listed in neighbours.items()
    ]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), POOL_TOL)
    # r's model reaches n0 in some rounds and is left out as non-finite in others
    seen = {(d.decision) for r in reference["n0"].records for d in r.decisions if d.agent_id == "r"}
    assert seen == {"accepted", "missing"}, seen
