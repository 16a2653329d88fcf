"""theta_k = sum_l a_lk psi_l over state dicts (the combination step, eq. 3), and the flat-vector
view of a model that rules needing the models themselves (median, Krum, ...) work on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mtl_node.kernels.combine import accumulate
from mtl_node.wire import StateDict


def weighted_sum(models: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]) -> StateDict:
    """Weighted sum of the models named in ``weights`` (weights are assumed to sum to 1)."""
    ids: Sequence[str] = [agent for agent, w in weights.items() if w != 0.0]
    if len(ids) == 1:
        return {name: t.clone() for name, t in models[ids[0]].items()}
    first = models[ids[0]]
    out: StateDict = {}
    for name, ref in first.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        # The kernel the vectorized engine runs on all rows: the same sum in the same order.
        out[name] = accumulate([weights[agent] for agent in ids], [models[agent][name] for agent in ids])
    return out


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    total = 0.0
    for name, t in a.items():
        if t.is_floating_point():
            total += float(torch.sum((t - b[name]) ** 2))
    return total


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Every floating tensor, in name order, as one float64 vector (what robust rules see)."""
    parts = [
        state[name].detach().to("cpu", torch.float64).reshape(-1)
        for name in sorted(state)
        if state[name].is_floating_point()
    ]
    if not parts:
        return np.zeros(0)
    return torch.cat(parts).numpy()


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of ``flatten``, shaped, typed and placed like ``like`` (non-float tensors copied)."""
    out: StateDict = {}
    offset = 0
    for name in sorted(like):
        ref = like[name]
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        n = ref.numel()
        chunk = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + n]))
        out[name] = chunk.reshape(ref.shape).to(dtype=ref.dtype, device=ref.device)
        offset += n
    if offset != len(vector):
        raise ValueError(f"vector has {len(vector)} values, the model {offset}")
    return {name: out[name] for name in like}
