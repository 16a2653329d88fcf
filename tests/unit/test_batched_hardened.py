"""loss-filtered-median in the batched engine against the per-agent engine: the loss filter's
members (the agent first) combined by their coordinate-wise median (mtl_node.kernels.hardened.
kept_median, called with one row by the rule and with every row by the engine), bit for bit."""

from __future__ import annotations

import pytest
from test_batched import POOL_TOL, TOL, assert_same_runs, attack_configs, edge_configs

from mtl_node.aggregation import RuleParams
from mtl_node.batched import run_batched, supports, unsupported_reason
from mtl_node.engine import run_agents

RULE = "loss-filtered-median"


@pytest.mark.parametrize("attack", ["distance-capture", "loss-budget", "echo", "alie", "nan"])
def test_loss_filtered_median_same_as_per_agent_engine(attack: str) -> None:
    configs = [
        c.model_copy(update={"rule": RULE if k % 2 else c.rule, "rule_params": RuleParams(nu=0.2)})
        for k, c in enumerate(attack_configs(attack, {}))
    ]
    assert supports(configs), unsupported_reason(configs)
    reference = run_agents(configs, keep_models=True)
    tol = POOL_TOL if attack == "alie" else TOL
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), tol)
    # the median ran: rounds where more than one member took part with equal weights 1/m
    ran = 0
    for c in configs:
        if c.rule != RULE or c.attack:
            continue
        for r in reference[c.id].records:
            w = [d.weight for d in r.decisions if d.weight > 0.0]
            ran += len(w) > 1 and all(x == 1.0 / len(w) for x in w)
    assert ran > 0


def test_loss_filtered_median_on_non_finite_and_huge_models() -> None:
    configs = edge_configs(RULE)
    reference = run_agents(configs, keep_models=True)
    assert_same_runs(configs, reference, run_batched(configs, record_decisions=True), TOL)
