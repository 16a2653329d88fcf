"""The hardened loss-filtered rules' second step, over batches of neighbourhoods.

All start from the loss-filtered weights (``mtl_node.kernels.ema``); docs and the reasons for the
choices are in ``mtl_node.aggregation.hardened``. Arrays are (rows, slots[, dim]), slot 0 the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtl_node.kernels.robust import coordinate_median, norms, slot_sum


def cap_weights(weights: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``loss-filtered-capped``: a'_l = min(a_l, c a_k) for every neighbour, a'_k = 1 - sum_l a'_l.

    ``cap`` (rows,) is weight_cap; returns (new weights, (rows, slots) bool: the weight was capped).
    Rows where nothing binds keep their weights exactly."""
    limited = np.minimum(weights[:, 1:], (cap * weights[:, 0])[:, None])
    hit = np.zeros(weights.shape, dtype=bool)
    hit[:, 1:] = limited < weights[:, 1:]
    some = hit.any(axis=1)
    out = weights.copy()
    out[some, 1:] = limited[some]
    out[some, 0] = 1.0 - slot_sum(limited[some])
    return out, hit


def own_step_ema(prev: np.ndarray, step: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """``loss-filtered-clipped``'s EMA of the squared own step ||psi_k - theta_k(i-1)||^2 (NaN: none
    yet); a step that is not finite leaves it unchanged."""
    with np.errstate(over="ignore", invalid="ignore"):
        new = np.where(np.isnan(prev), step, (1.0 - nu) * prev + nu * step)
    return np.where(np.isfinite(step), new, prev)


@dataclass(frozen=True)
class Clipped:
    combined: np.ndarray  # (rows, dim) psi_k + sum_l a_l s_l (psi_l - psi_k)
    weights: np.ndarray  # (rows, slots) effective weights a_l s_l, the agent's own the rest
    clipped: np.ndarray  # (rows, slots) bool: the pull was clipped to tau
    dropped: np.ndarray  # (rows, slots) bool: kept, but its pull is not finite (left out)
    finite: np.ndarray  # (rows,) bool: the combined model is finite (else the caller keeps agg)


def clip_pulls(X: np.ndarray, kept: np.ndarray, weights: np.ndarray, tau: np.ndarray) -> Clipped:
    """``loss-filtered-clipped``: the kept neighbours' pulls psi_l - psi_k clipped to radius ``tau``
    (rows,), s_l = min(1, tau / ||psi_l - psi_k||); ``kept`` excludes slot 0."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pulls = np.where(kept[:, :, None], X - X[:, :1, :], 0.0)
        dist = norms(pulls)
        ok = kept & np.isfinite(dist)
        clip = ok & (dist > tau[:, None])
        scale = np.where(clip, tau[:, None] / np.where(clip, dist, 1.0), np.where(ok, 1.0, 0.0))
        eff = weights * scale
        combined = X[:, 0, :] + slot_sum(eff[:, :, None] * np.where(ok[:, :, None], pulls, 0.0))
        eff[:, 0] = 1.0 - slot_sum(eff[:, 1:])
    return Clipped(combined, eff, clip, kept & ~ok, np.isfinite(combined).all(axis=1))


def kept_median(X: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``loss-filtered-median``: (rows, dim) the coordinate-wise median of the members the loss filter
    kept, the agent itself (slot 0) always among them; a member whose model is not finite is left
    out (the agent's own model is finite: the round loop never scores a non-finite one)."""
    members = kept.copy()
    members[:, 0] = True
    members &= np.isfinite(X).all(axis=2)
    members[:, 0] = True
    return coordinate_median(np.where(members[:, :, None], X, 0.0), members)
