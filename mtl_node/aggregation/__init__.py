"""Aggregation rules: how a normal agent weighs itself and its neighbours each round.

Pure code (floats in, weights out; no grpc, no torch): the round loop hands a rule one
``Candidate`` per neighbourhood member (the agent itself first) and gets back weights and a
per-neighbour decision for the filter log. ``combine`` applies the weights to the models.
"""

from mtl_node.aggregation import decentralized as _decentralized  # noqa: F401  (registers issue 13's rules)
from mtl_node.aggregation import hardened as _hardened  # noqa: F401  (registers the hardened rules)
from mtl_node.aggregation import robust as _robust  # noqa: F401  (registers the robust baselines)
from mtl_node.aggregation import rules as _rules  # noqa: F401  (registers the built-in rules)
from mtl_node.aggregation.base import (
    RULES,
    Aggregation,
    Candidate,
    NeighborDecision,
    Rule,
    RuleParams,
    make_rule,
)

__all__ = [
    "RULES",
    "Aggregation",
    "Candidate",
    "NeighborDecision",
    "Rule",
    "RuleParams",
    "make_rule",
]
