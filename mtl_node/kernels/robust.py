"""Robust statistics over batches of neighbourhoods: the only copy of the robust rules' maths.

X: (rows, slots, dim) float64, present: (rows, slots) bool with slot 0 (the agent) always present.
Absent slots may hold anything finite; they never reach a result. The daemon's rules
(``mtl_node.aggregation.robust``) call these with one row, the vectorized engine with every row of
a rule at once; the rules' table of assumptions and decisions is in that module's docstring.
"""

from __future__ import annotations

import numpy as np


def slot_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 1 (the slots), strictly left to right.

    numpy's own ``sum`` groups terms differently with the length (pairwise, 8 partial sums from 8
    terms on), so one agent's row (its own neighbourhood) and the same row padded to a batch's width
    could differ in the last bit. Summed in slot order, absent slots adding exact zeros, they do not.
    """
    if a.shape[1] == 0:
        return np.zeros(a.shape[:1] + a.shape[2:], dtype=a.dtype)
    acc = a[:, 0].copy()
    for s in range(1, a.shape[1]):
        acc = acc + a[:, s]
    return acc


def norms(v: np.ndarray) -> np.ndarray:
    """Euclidean norms over the last axis, without overflow or underflow for finite vectors: the
    plain sqrt(sum v^2) where the sum is a normal float, rescaled by max |v| where it is not."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        sq = (v * v).sum(axis=-1)
        out = np.sqrt(sq)
        if np.isfinite(sq).all() and sq.min(initial=np.inf) >= 1e-290:
            return out
        bad = ~np.isfinite(sq) | (sq < 1e-290)
        w = v[bad]
        scale = np.abs(w).max(axis=-1)
        safe = np.where(scale > 0.0, scale, 1.0)
        out[bad] = scale * np.sqrt(((w / safe[..., None]) ** 2).sum(axis=-1))
    return out


def _sorted_present(X: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each coordinate's values sorted over the slots, absent slots last (as +inf)."""
    return np.sort(np.where(present[:, :, None], X, np.inf), axis=1)


def _take(sorted_: np.ndarray, rank: np.ndarray) -> np.ndarray:
    return np.take_along_axis(sorted_, rank[:, None, None], axis=1)[:, 0, :]


def coordinate_median(X: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(rows, dim): the median of each coordinate over the present members (mean of the middle two
    for an even count, written so that it cannot overflow)."""
    s = _sorted_present(X, present)
    n = present.sum(axis=1)
    return 0.5 * _take(s, (n - 1) // 2) + 0.5 * _take(s, n // 2)


def trimmed_mean(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows, dim): per coordinate, the mean of the present values less the f smallest and f
    largest (``f`` per row; needs n >= 2f + 1)."""
    s = _sorted_present(X, present)
    n = present.sum(axis=1)
    rank = np.arange(X.shape[1])[None, :]
    keep = (rank >= f[:, None]) & (rank < (n - f)[:, None])
    total = np.where(keep[:, :, None], s, 0.0).sum(axis=1)
    return total / (n - 2 * f)[:, None]


def pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    """(rows, slots, slots): ||X_i - X_j||^2. Small problems at once, large models one slot at a time
    (memory rows*slots*dim); each entry is the same sum over the last axis either way."""
    rows, slots, dim = X.shape
    if rows * slots * slots * dim <= 1 << 24:
        diff = X[:, :, None, :] - X[:, None, :, :]
        return (diff * diff).sum(axis=-1)
    out = np.empty((rows, slots, slots))
    for i in range(slots):
        diff = X - X[:, i : i + 1, :]
        out[:, i, :] = (diff * diff).sum(axis=-1)
    return out


def krum_scores(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows, slots): each present member's sum of squared distances to its n - f - 2 nearest other
    present members (+inf for absent slots). Summed in order with cumsum so that every engine gets
    bit-identical scores, and so the same member, on ties."""
    d2 = pairwise_sq_distances(X)
    slots = X.shape[1]
    other = present[:, None, :] & ~np.eye(slots, dtype=bool)[None, :, :]
    d2 = np.sort(np.where(other, d2, np.inf), axis=2)
    m = present.sum(axis=1) - f - 2  # >= f + 1 >= 1 when n >= 2f + 3
    cums = np.cumsum(d2, axis=2)
    idx = np.clip(m - 1, 0, slots - 1)
    scores = np.take_along_axis(cums, np.broadcast_to(idx[:, None, None], (X.shape[0], slots, 1)), axis=2)
    return np.where(present, scores[:, :, 0], np.inf)


def krum_select(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows,): the slot Krum selects (the first on ties; the agent itself if no score is finite)."""
    scores = krum_scores(X, present, f)
    chosen = np.argmin(scores, axis=1)
    finite_any = np.isfinite(scores).any(axis=1)
    return np.where(finite_any, chosen, 0)


def geometric_median(X: np.ndarray, present: np.ndarray, iters: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(rows, dim): Weiszfeld's iterations z <- sum w_l X_l / sum w_l with w_l = 1/max(||X_l - z||, eps),
    from the coordinate-wise median, ``iters`` times per row (a fixed count, no early stop: every
    engine does exactly the same arithmetic)."""
    z = coordinate_median(X, present)
    for it in range(int(iters.max(initial=0))):
        d = norms(X - z[:, None, :])
        w = np.where(present, 1.0 / np.maximum(d, eps[:, None]), 0.0)
        new = slot_sum(w[:, :, None] * X) / slot_sum(w)[:, None]
        z = np.where((it < iters)[:, None], new, z)
    return z


def self_clip(X: np.ndarray, present: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((rows, dim) new models, (rows, slots) pull scales): psi_k + (1/n) sum_l clip(psi_l - psi_k, tau),
    clip(v, tau) = s v with s = min(1, tau/||v||). The scale is 0 for absent slots and for a pull
    whose length is not finite (left out). Since the result is (1 - sum_l s_l/n) psi_k +
    sum_l (s_l/n) psi_l, the members' effective weights are s_l/n and the agent's own the rest."""
    v = X - X[:, :1, :]
    length = norms(v)
    ok = present & np.isfinite(length)
    clipped = ok & (length > tau[:, None])
    scale = np.where(clipped, tau[:, None] / np.where(clipped, length, 1.0), np.where(ok, 1.0, 0.0))
    pull = slot_sum(scale[:, :, None] * np.where(ok[:, :, None], v, 0.0))
    n = present.sum(axis=1)
    return X[:, 0, :] + pull / n[:, None], scale
