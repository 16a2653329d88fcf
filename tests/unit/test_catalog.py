"""The torch-free names (mtl_node.core.names) (used by the orchestrator) must equal the real registries."""

from __future__ import annotations

from mtl_node.aggregation import RULES
from mtl_node.attack_api import ATTACKS, load_plugins
from mtl_node.core import names as catalog
from mtl_node.tasks import TASKS

FIX = "update mtl_node/core/names.py to match the registries"


def test_task_names() -> None:
    assert sorted(catalog.TASK_NAMES) == TASKS.names(), FIX


def test_rule_names() -> None:
    assert sorted(catalog.RULE_NAMES) == RULES.names(), FIX


def test_attack_names() -> None:
    load_plugins()
    assert sorted(catalog.ATTACK_NAMES) == ATTACKS.names(), FIX
