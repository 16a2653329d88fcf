"""What the torch batched engine (mtl_node.batched.torch_engine) can run, from the configs alone.

:func:`unsupported_reason` answers before any task is built (cheap: the orchestrator asks it for
every rule of a plan); what only the built tasks tell (their models and losses) is
mtl_node.batched.torch_model's ``model_reason``, raised as ``Unbatchable`` when the engine starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl_node.attack_api import make_attack
from mtl_node.batched.torch_model import class_reason
from mtl_node.config import NodeConfig
from mtl_node.core import names
from mtl_node.tasks.base import TASKS, parse_params
from mtl_node.tasks.torch_task import TorchTaskParams

# Every rule: each agent's own rule object aggregates its row, given the losses, distances and
# flattened models it asks for (needs_loss / needs_distance / needs_models).
RULES = names.RULE_NAMES
# Attacks whose ``craft`` depends only on (seed, attacker, round, requester, honest model, last
# round's fetched pool): what the attack node serves does not depend on request order.
ATTACKS = ("constant", "gaussian", "small-perturbation", "scaled", "sign-flip", "ipm", "alie", "mimic")
POOL_ATTACKS = ("ipm", "alie", "mimic")


def unsupported_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Why the torch batched engine cannot run these configs, or None when it can."""
    if not configs:
        return "no agents"
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        return "agent ids are not unique"
    if len({c.rounds for c in configs}) != 1:
        return "agents run different numbers of rounds"
    known = set(ids)
    params: list[TorchTaskParams] = []
    if len({c.task for c in configs}) != 1:
        return "agents run different tasks"
    if len({c.device for c in configs}) != 1:
        return "agents run on different devices"
    for c in configs:
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            return f"{c.id}: device {c.device!r}, but torch sees no CUDA device"
        if c.state_path is not None:
            return f"{c.id}: a state directory (crash-only state is per-agent)"
        if c.rule not in RULES:
            return f"{c.id}: rule {c.rule!r} (the torch batched engine runs {', '.join(RULES)})"
        missing = [n for n in c.neighbors if n not in known]
        if missing:
            return f"{c.id}: neighbour {missing[0]!r} is not an agent of this run"
        try:
            cls = TASKS.get(c.task)
            p = parse_params(cls, c.task_params)
        except Exception as exc:  # the per-agent engine reports invalid parameters
            return f"{c.id}: {exc}"
        why = class_reason(cls)
        if why is not None:
            return f"{c.id}: task {c.task!r}: {why}"
        assert isinstance(p, TorchTaskParams)
        params.append(p)
        if c.attack is not None:
            if c.attack not in ATTACKS:
                return f"{c.id}: attack {c.attack!r} (the torch batched engine runs {', '.join(ATTACKS)})"
            try:
                make_attack(c.attack, c.id, c.seed, c.attack_params, task=c.task)
            except Exception as exc:
                return f"{c.id}: attack {c.attack!r}: {exc}"
    optimizers = {p.optimizer for p in params}
    if len(optimizers) != 1:
        return f"agents use different optimizers ({sorted(optimizers)})"
    sizes = {(p.batch_size, p.local_steps) for p in params}
    if len(sizes) != 1:
        return f"agents differ in batch_size/local_steps ({sorted(sizes)})"
    return None
