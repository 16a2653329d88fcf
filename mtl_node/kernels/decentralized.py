"""The decentralized defenses since 2021 over batches of neighbourhoods: UBAR, BALANCE, clipped
gossip with the adaptive radius (CS+) and IOS. The only copy of their maths.

X: (rows, slots, dim) float64, present: (rows, slots) bool, slot 0 the agent itself (always
present). Absent slots may hold anything finite; they never reach a result. Neighbours are weighed
uniformly (every present member 1/n): a daemon knows no gossip matrix beyond its neighbour list.
The rule classes (``mtl_node.aggregation.decentralized``) call these with one row (the present
members alone), the vectorized engine (``mtl_node.batched.decentralized``) with every row of a rule
at once (padded, a presence mask); each kernel returns the new models and the per-slot masks the
decision log needs. Sums over the slots are taken in slot order (``slot_sum``) so that both give
bit-identical models: absent slots add exact zeros.
"""

from __future__ import annotations

import numpy as np

from mtl_node.kernels.robust import norms, self_clip, slot_sum


def _pulls(X: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the agent's own model, usable neighbour mask): absent slots, the agent's own
    slot and non-finite distances are not usable."""
    d = norms(X - X[:, :1, :])
    usable = present & np.isfinite(d)
    usable[:, 0] = False
    return np.where(usable, d, np.inf), usable


def _own_plus_mean(X: np.ndarray, keep: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha * own + (1 - alpha) * mean(kept) per row; the own model where nothing is kept."""
    count = keep.sum(axis=1)
    total = slot_sum(np.where(keep[:, :, None], X, 0.0))
    mean = total / np.maximum(count, 1)[:, None]
    mixed = alpha[:, None] * X[:, 0, :] + (1.0 - alpha)[:, None] * mean
    return np.where((count > 0)[:, None], mixed, X[:, 0, :])


def distances_to_own(X: np.ndarray) -> np.ndarray:
    """(rows, slots): ||psi_l - psi_own|| as BALANCE's decision log quotes it."""
    return np.linalg.norm(X - X[:, :1, :], axis=2)


def ubar(
    X: np.ndarray, present: np.ndarray, loss: np.ndarray, rho: np.ndarray, alpha: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UBAR (Guo et al. 2021): ((rows, dim) new models, (rows, slots) stage-1 selection, (rows,
    slots) kept).

    Stage 1 selects the ceil(rho * m) neighbours closest in L2 to the agent's own model (m the
    present neighbours with a finite distance; ties: the lower slot). Stage 2 keeps those whose loss
    on the agent's batch (``loss``, (rows, slots), slot 0 the agent's own) is at most the agent's,
    and at least the selected one with the smallest finite loss (ties: the lower slot); a neighbour
    with a non-finite loss is kept only by the first test, never as the best one.
    theta = alpha * psi_own + (1 - alpha) * mean(kept); psi_own when nothing is kept."""
    rows, slots = present.shape
    d, usable = _pulls(X, present)
    m = usable.sum(axis=1)
    k = np.ceil(rho * m - 1e-12).astype(np.int64)  # rho * m = 2.0000000001 must not select 3
    order = np.argsort(d, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(slots)[None, :].repeat(rows, axis=0), axis=1)
    selected = usable & (rank < k[:, None])
    finite_loss = np.isfinite(loss)
    own = loss[:, :1]
    good = selected & finite_loss & (loss <= own)
    best_val = np.where(selected & finite_loss, loss, np.inf)
    best = np.argmin(best_val, axis=1)
    has_best = np.isfinite(best_val.min(axis=1, initial=np.inf))
    keep = good.copy()
    keep[np.arange(rows), best] |= has_best
    return _own_plus_mean(X, keep, alpha), selected, keep


def balance_radius(
    own_norm: np.ndarray, gamma: np.ndarray, kappa: np.ndarray, round_: np.ndarray, horizon: np.ndarray
) -> np.ndarray:
    """BALANCE's acceptance radius gamma * exp(-kappa * i / T) * ||psi_own|| per row (the adaptive
    attack serves at it: mtl_node.kernels.attacks)."""
    return gamma * np.exp(-kappa * round_ / horizon) * own_norm


def balance(
    X: np.ndarray,
    present: np.ndarray,
    gamma: np.ndarray,
    kappa: np.ndarray,
    round_: np.ndarray,
    horizon: np.ndarray,
    alpha: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BALANCE (Fang et al. 2024): ((rows, dim) new models, (rows, slots) accepted, (rows,) radius).

    A neighbour is accepted iff ||psi_own - psi_l|| <= gamma * exp(-kappa * i / T) * ||psi_own||
    (i = ``round_``, T = ``horizon``); theta = alpha * psi_own + (1 - alpha) * mean(accepted),
    psi_own when none is."""
    d, usable = _pulls(X, present)
    radius = balance_radius(norms(X[:, 0, :]), gamma, kappa, round_, horizon)
    accepted = usable & (d <= radius[:, None])
    return _own_plus_mean(X, accepted, alpha), accepted, radius


def adaptive_radius(X: np.ndarray, present: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(rows,): the CS+ clipping radius (Gaucher et al. 2025) with uniform weights: the distance to
    the agent of its (2b+1)-th farthest neighbour, so that the 2b farthest (the weight 2b the
    Byzantine neighbours could carry, and as much again) are clipped to it. 0 when there are no more
    than 2b neighbours (every pull is clipped away: the agent keeps its own model)."""
    d, usable = _pulls(X, present)
    far_first = -np.sort(-np.where(usable, d, -np.inf), axis=1)  # descending, unusable last
    m = usable.sum(axis=1)
    idx = np.clip(2 * b, 0, X.shape[1] - 1)
    tau = np.take_along_axis(far_first, idx[:, None], axis=1)[:, 0]
    return np.where(m > 2 * b, tau, 0.0)


def clipped_gossip(
    X: np.ndarray, present: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clipped gossip (He, Karimireddy & Jaggi 2022) with the CS+ radius: ((rows, dim) new models,
    (rows, slots) pull scales, (rows,) radius). theta = psi_own + (1/n) sum_l clip(psi_l - psi_own,
    tau), tau = :func:`adaptive_radius`, n the present members (the agent included); the scale is 0
    for absent slots and pulls whose length is not finite."""
    tau = adaptive_radius(X, present, b)
    z, scale = self_clip(X, present, tau)
    return z, scale, tau


def ios(X: np.ndarray, present: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IOS, iterative outlier scissor (Wu, Chen & Ling 2023): ((rows, dim) new models, (rows, slots)
    kept). b times per row (fewer if the neighbours run out): the mean of the members still in
    (the agent included, uniform weights), then the neighbour farthest from it is dropped (ties:
    the lower slot). A neighbour whose model is not finite is left out before the maths (it is no
    drop). The result is the mean of the members left."""
    rows = X.shape[0]
    finite = np.isfinite(X).all(axis=2)
    keep = present & finite
    keep[:, 0] = True
    Xs = np.where(keep[:, :, None], X, 0.0)
    for it in range(int(b.max(initial=0))):
        count = keep.sum(axis=1)
        mean = slot_sum(np.where(keep[:, :, None], Xs, 0.0)) / count[:, None]
        d = norms(Xs - mean[:, None, :])
        candidates = keep.copy()
        candidates[:, 0] = False
        score = np.where(candidates, d, -1.0)
        drop = np.argmax(score, axis=1)
        active = (it < b) & candidates.any(axis=1)
        keep[np.arange(rows), drop] &= ~active
    count = keep.sum(axis=1)
    return slot_sum(np.where(keep[:, :, None], Xs, 0.0)) / count[:, None], keep


# -- the weights the decision log reports (the new model comes from the kernels above) ------------


def mixed_weights(keep: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(rows, slots) for ubar and balance: the agent's own alpha (1 when nothing is kept), each kept
    neighbour (1 - alpha) / (number kept), the others 0."""
    count = keep.sum(axis=1)
    share = (1.0 - alpha) / np.maximum(count, 1)
    w = np.where(keep, share[:, None], 0.0)
    w[:, 0] = np.where(count > 0, alpha, 1.0)
    return w


def clipped_weights(scale: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(rows, slots) for clipped gossip: each neighbour s_l / n (its pull's scale over the present
    members), the agent's own the rest (summed in slot order)."""
    w = scale / present.sum(axis=1)[:, None]
    w[:, 0] = 1.0 - slot_sum(w[:, 1:])
    return w


def ios_weights(keep: np.ndarray) -> np.ndarray:
    """(rows, slots) for IOS: 1 / (members left) for each member left, the agent included."""
    return keep / keep.sum(axis=1)[:, None]
