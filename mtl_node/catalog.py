"""Names of the built-in tasks, rules and attacks, importable without torch.

The orchestrator validates topologies with these (it must plan and render deployments without
torch); tests/unit/test_catalog.py checks they equal the real registries.
"""

TASK_NAMES = ("digits", "har", "target-localization")
RULE_NAMES = (
    "average",
    "distance",
    "geometric-median",
    "krum",
    "loss",
    "loss-filtered",
    "loss-filtered-capped",
    "loss-filtered-clipped",
    "median",
    "none",
    "self-clipping",
    "trimmed-mean",
)
ATTACK_NAMES = (
    "alie",
    "constant",
    "distance-capture",
    "echo",
    "gaussian",
    "ipm",
    "label-flip",
    "loss-budget",
    "low-loss",
    "mimic",
    "nan",
    "omission",
    "on-off",
    "scaled",
    "sign-flip",
    "small-perturbation",
    "stale",
)
