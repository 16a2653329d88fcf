"""Small tensor helpers shared by the attacks.

Attacks change floating-point tensors only; integer tensors (counters such as BatchNorm's
``num_batches_tracked``) are served as they are, since no finite-valued integer attack on them
would say anything about a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from pydantic import ConfigDict

from mtl_node.attack_api import AttackView
from mtl_node.kernels.attacks import pool_moments
from mtl_node.kernels.attacks import towards as kernel_towards
from mtl_node.wire import StateDict

PARAMS_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def per_tensor(state: StateDict, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    """``fn`` applied to every floating tensor, in sorted name order (the order random draws use)."""
    out: StateDict = {}
    for name in sorted(state):
        t = state[name]
        out[name] = fn(name, t) if torch.is_floating_point(t) else t
    return out


def draw(rng: np.random.Generator, t: torch.Tensor, kind: str, a: float, b: float) -> torch.Tensor:
    """One numpy draw of ``t``'s shape (uniform [a, b] or normal(mean a, std b)), cast like ``t``."""
    shape = tuple(t.shape)
    values = rng.uniform(a, b, size=shape) if kind == "uniform" else rng.normal(a, b, size=shape)
    return torch.as_tensor(values, dtype=t.dtype).to(t.device)


def honest_pool(view: AttackView, round_: int, honest: StateDict) -> list[StateDict]:
    """H_i = [psi_self(i)] + [psi_l(i-1) for the neighbours l fetched validly in round i-1, by id].

    The attacker's own honest model is always in it, so statistics over H are always defined.
    """
    neighbors = view.neighbors(round_ - 1)
    return [honest, *(neighbors[a] for a in sorted(neighbors))]


def moments(pool: Sequence[StateDict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of tensor ``name`` over ``pool`` (its first model the attacker's own),
    float64 and shaped like the tensor: ``mtl_node.kernels.attacks.pool_moments`` with one row."""
    flat = [m[name].detach().to("cpu", torch.float64).reshape(-1).numpy() for m in pool]
    own = flat[0][None, :]
    others = np.stack(flat[1:])[None] if len(flat) > 1 else np.zeros((1, 0, own.shape[1]))
    mean, std = pool_moments(own, others, np.ones(others.shape[:2], dtype=bool))
    shape = tuple(pool[0][name].shape)
    return mean[0].reshape(shape), std[0].reshape(shape)


def like(values: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor with ``t``'s dtype and device."""
    return torch.as_tensor(values).to(dtype=t.dtype, device=t.device)


def victim_model(view: AttackView, round_: int, requester: str) -> StateDict | None:
    """The requester's model: its round-i model fetched on demand, else its round i-1 model from
    the node's last complete fetch, else None (the requester is not our neighbour)."""
    got = view.model_of(requester, round_)
    if got is not None:
        return got
    return view.neighbors(round_ - 1).get(requester)


def goal_like(state: StateDict, value: float | Sequence[float]) -> StateDict:
    """The goal model: every floating coordinate equal to ``value``, or ``value`` laid out over the
    floating tensors in sorted name order (then it must have exactly one value per coordinate)."""
    if isinstance(value, int | float):
        v = float(value)
        return per_tensor(state, lambda _, t: torch.full_like(t, v))
    size = sum(t.numel() for t in state.values() if torch.is_floating_point(t))
    if len(value) != size:
        raise ValueError(f"goal has {len(value)} values, the model {size} coordinates")
    flat = torch.as_tensor(list(value), dtype=torch.float64)
    offset = 0

    def take(_: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        part = flat[offset : offset + t.numel()]
        offset += t.numel()
        return part.reshape(t.shape).to(dtype=t.dtype, device=t.device)

    return per_tensor(state, take)


def towards(base: StateDict, goal: StateDict, step: float) -> StateDict:
    """base + step * (goal - base), tensor by tensor."""
    return per_tensor(base, lambda name, t: kernel_towards(t, goal[name], step))


def flat(state: StateDict) -> np.ndarray:
    """Every floating tensor, in sorted name order, as one float64 vector (what a rule compares)."""
    parts = [
        state[n].detach().to("cpu", torch.float64).reshape(-1).numpy()
        for n in sorted(state)
        if torch.is_floating_point(state[n])
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def from_flat(state: StateDict, values: np.ndarray) -> StateDict:
    """``values`` laid out over ``state``'s floating tensors in sorted name order (the inverse of
    :func:`flat`), each cast like the tensor it replaces."""
    offset = 0

    def take(_: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        part = values[offset : offset + t.numel()]
        offset += t.numel()
        return like(part.reshape(tuple(t.shape)), t)

    return per_tensor(state, take)


class Trajectory:
    """x(r) = step(x(r - 1), r) from x(0) = start(): a model trained along its own trajectory
    (label-flip, backdoor), kept for the last ``keep`` rounds and advanced lazily.

    A request for a later round continues from the latest round made; any other (an older round)
    restarts from round 1, so a task optimizer kept for the trajectory (TorchTask.adapt_flipped,
    adapt_backdoor: a fresh one at round 1) only ever steps forward along one trajectory. Either
    way the model of a round is the same whatever order rounds are asked in."""

    def __init__(
        self, start: Callable[[], StateDict], step: Callable[[StateDict, int], StateDict], keep: int = 4
    ) -> None:
        self.start = start
        self.step = step
        self.keep = keep
        self.models: dict[int, StateDict] = {}

    def at(self, round_: int) -> StateDict:
        if round_ in self.models:
            return self.models[round_]
        latest = max(self.models, default=0)
        begin = latest if latest < round_ else 0
        model = self.models[begin] if begin else self.start()
        for r in range(begin + 1, round_ + 1):
            model = self.step(model, r)
        self.models[round_] = model
        self.models = dict(sorted(self.models.items())[-self.keep :])
        return model
