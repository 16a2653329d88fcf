"""Names of the built-in tasks, rules and attacks, importable without torch.

The orchestrator validates topologies with these (it must plan and render deployments without
torch); tests/unit/test_catalog.py checks they equal the real registries.
"""

TASK_NAMES = ("target-localization",)
RULE_NAMES = ("average", "distance", "loss", "loss-filtered", "none")
ATTACK_NAMES = ("constant",)
