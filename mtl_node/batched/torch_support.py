"""What the torch batched engine (mtl_node.batched.torch_engine) can run, from the configs alone.

:func:`unsupported_reason` answers before any task is built (cheap: the orchestrator asks it for
every rule of a plan); what only the built tasks tell (their models and losses) is
mtl_node.batched.torch_model's ``model_reason``, raised as ``Unbatchable`` when the engine starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl_node.attack_api import make_attack
from mtl_node.batched.network import run_shape_reason
from mtl_node.batched.torch_model import class_reason
from mtl_node.config import NodeConfig
from mtl_node.core import names
from mtl_node.kernels.attacks import adaptive_test
from mtl_node.tasks.base import TASKS, parse_params
from mtl_node.tasks.torch_task import TorchTaskParams

# Every rule: each agent's own rule object aggregates its row, given the losses, distances and
# flattened models it asks for (needs_loss / needs_distance / needs_models).
RULES = names.RULE_NAMES
# Attacks whose ``craft`` depends only on (seed, attacker, round, requester, honest model, last
# round's fetched pool, the requester's model of the round, the attacker's own data and trajectory):
# what the attack node serves does not depend on request order. backdoor's trajectory is advanced by
# its own optimizer on its own batches of each round (attacks._common.Trajectory: the same model of
# a round whatever order rounds are asked in); with ``base: victim`` it blends with the requester's
# model. adaptive reads the requester's model, the run's rule and (omniscient) a private copy of
# the requester's task. Two attackers that both craft from the requester's model and list each
# other are refused (requester_reason): what each serves the other depends on which asks first.
ATTACKS = (
    "constant",
    "gaussian",
    "small-perturbation",
    "scaled",
    "sign-flip",
    "ipm",
    "alie",
    "mimic",
    "backdoor",
    "adaptive",
)
POOL_ATTACKS = ("ipm", "alie", "mimic")
# Why adaptive's loss test stays on the per-agent engine. Its step is where the attacker's loss
# along d crosses the victim model's own loss (a bisection); where that crossing is shallow, the
# last-bit float32 differences of the batched local steps (1e-7 relative) move it by far more: on
# HAR under loss-filtered the served model differed by 7e-5 relative in round 2 and the victims'
# losses by 2e-3 by round 5 (tests/unit/test_torch_batched.py), beyond the engine's 1e-5 contract.
LOSS_TEST_WHY = (
    "its bisection on a loss amplifies the batched engine's float32 rounding differences beyond "
    "1e-5 (runs on the per-agent engine)"
)


def crafts_from_requester(c: NodeConfig) -> bool:
    """The attack reads the requester's model (attack_api: ``needs_requester_model``): adaptive,
    and backdoor blending with its victims' models (``base: victim``)."""
    if c.attack == "adaptive":
        return True
    return c.attack == "backdoor" and c.attack_params.get("base") == "victim"


def keeps_fetch(c: NodeConfig) -> bool:
    """The attacker reads what it fetched in earlier rounds: pool attacks, and attacks crafting
    from the requester's model (their fallback is the requester's model of the round before;
    adaptive's ``away`` direction and clipped-gossip radius read the whole fetch)."""
    return c.attack in POOL_ATTACKS or crafts_from_requester(c)


def requester_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Two attackers crafting from each other's model (both listing the other): refused."""
    by_id = {c.id: c for c in configs}
    for c in configs:
        if not crafts_from_requester(c):
            continue
        for n in c.neighbors:
            other = by_id.get(n)
            if other is not None and crafts_from_requester(other) and c.id in other.neighbors:
                return (
                    f"{c.id} ({c.attack}) fetches from {n} ({other.attack}) and {n} from {c.id}: what "
                    "each serves the other depends on which asks first"
                )
    return None


def unsupported_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Why the torch batched engine cannot run these configs, or None when it can."""
    shape = run_shape_reason(configs)
    if shape is not None:
        return shape
    known = {c.id for c in configs}
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
                attack = make_attack(c.attack, c.id, c.seed, c.attack_params, task=c.task, rule=c.rule)
            except Exception as exc:
                return f"{c.id}: attack {c.attack!r}: {exc}"
            if (
                c.attack == "adaptive"
                and adaptive_test(getattr(attack.params, "test", "auto"), c.rule) == "loss"
            ):
                return f"{c.id}: attack 'adaptive' with its loss test (rule {c.rule}): {LOSS_TEST_WHY}"
    mutual = requester_reason(configs)
    if mutual is not None:
        return mutual
    optimizers = {p.optimizer for p in params}
    if len(optimizers) != 1:
        return f"agents use different optimizers ({sorted(optimizers)})"
    sizes = {(p.batch_size, p.local_steps) for p in params}
    if len(sizes) != 1:
        return f"agents differ in batch_size/local_steps ({sorted(sizes)})"
    return None
