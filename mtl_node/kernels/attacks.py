"""What a Byzantine sender serves: the only copy of the attacks' maths.

The attack classes in ``attacks/`` (one sender, one requester, tensor by tensor) and the vectorized
engine (``mtl_node.batched``: every (receiver, slot) pair of a round at once, numpy) both call these.
The element-wise kernels use only arithmetic operators, so they take numpy arrays and torch tensors
alike; the others are numpy over (rows, slots, dim) batches with a ``present`` mask. Docstrings
state each attack's formula; ``attacks/`` says where it comes from and what it is meant to defeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

A = Any  # a numpy array or a torch tensor: these kernels use only arithmetic operators


# -- element-wise -----------------------------------------------------------------------------------


def sign_flip(h: A, scale: float | np.ndarray) -> A:
    """sign-flip: x = -scale * h."""
    return -scale * h


def ipm(mean: A, epsilon: float | np.ndarray) -> A:
    """ipm: x = -epsilon * mean(H)."""
    return -epsilon * mean


def alie(mean: A, std: A, sign: float | np.ndarray, z: float | np.ndarray) -> A:
    """alie: x = mean(H) + sign * z * std(H), per coordinate."""
    return mean + (sign * z) * std


def towards(base: A, goal: A, step: float | np.ndarray) -> A:
    """distance-capture (and loss-budget's candidates): x = base + step * (goal - base)."""
    return base + step * (goal - base)


def perturbed(h: A, noise: A) -> A:
    """small-perturbation: x = h + e."""
    return h + noise


def scaled(h: A, factor: A) -> A:
    """scaled: x = h * u, u ~ U[low, high] per coordinate."""
    return h * factor


# -- schedules --------------------------------------------------------------------------------------


def on_off_attacking(round_: int, honest_rounds: int, attack_rounds: int) -> bool:
    """on-off: round i is an attack round iff attack_rounds = 0 and i > honest_rounds, or
    (i - 1) mod (honest_rounds + attack_rounds) >= honest_rounds."""
    if attack_rounds == 0:
        return round_ > honest_rounds
    return (round_ - 1) % (honest_rounds + attack_rounds) >= honest_rounds


def stale_round(round_: int | np.ndarray, lag: int | np.ndarray) -> np.ndarray:
    """stale: the round whose own honest model is replayed, max(1, i - lag)."""
    return np.maximum(1, np.asarray(round_) - np.asarray(lag))


# -- statistics of what the attacker knows ------------------------------------------------------------


def pool_moments(own: np.ndarray, X: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (ddof 0) per coordinate of H = [own] + the present members of X.

    ``own``: (rows, dim); ``X``: (rows, slots, dim); ``present``: (rows, slots). ipm and alie build
    on these; with nothing present the mean is ``own`` and the std 0."""
    m = present[:, :, None]
    count = 1 + present.sum(axis=1, keepdims=True)
    mean = (own + np.where(m, X, 0.0).sum(axis=1)) / count
    dev = np.where(m, X - mean[:, None, :], 0.0)
    var = ((own - mean) ** 2 + (dev**2).sum(axis=1)) / count
    return mean, np.sqrt(var)


# -- loss-budget --------------------------------------------------------------------------------------


def budget_step(feasible: Callable[[np.ndarray], np.ndarray], iters: np.ndarray) -> np.ndarray:
    """loss-budget's step s* per row: 1 when s = 1 is feasible, else the bisection's feasible end
    after ``iters`` (rows,) halvings of [0, 1] (0: nothing feasible found; the caller serves base).

    ``feasible(steps)`` answers for every row at once; rows stop halving after their own ``iters``.
    Assumes the feasible steps form an interval [0, s*] (true for convex losses)."""
    rows = len(iters)
    one = np.ones(rows)
    full = feasible(one)
    if full.all():
        return one
    lo, hi = np.zeros(rows), np.ones(rows)
    for it in range(int(iters.max(initial=0))):
        mid = (lo + hi) / 2
        good = feasible(mid)
        active = it < iters
        lo = np.where(active & good, mid, lo)
        hi = np.where(active & ~good, mid, hi)
    return np.where(full, one, lo)


# -- dissensus, min-max, min-sum ----------------------------------------------------------------------


def dissensus(
    victim: np.ndarray, X: np.ndarray, present: np.ndarray, eps: np.ndarray, byz: np.ndarray
) -> np.ndarray:
    """dissensus (He et al. 2022) with uniform weights: x = psi_k - eps * sum_{honest j} (psi_j -
    psi_k) / B, per row. ``victim``: (rows, dim) psi_k; ``X``/``present``: the honest neighbours'
    models; ``eps``, ``byz`` (B, the victim's Byzantine neighbours assumed): (rows,). B attackers
    serving this together cancel the victim's gossip step (eps = 1) or reverse it (eps > 1)."""
    pull = np.where(present[:, :, None], X - victim[:, None, :], 0.0).sum(axis=1)
    return victim - (eps / byz)[:, None] * pull


MINMAX_DIRECTIONS = ("std", "unit", "sign")


def minmax_direction(mean: np.ndarray, std: np.ndarray, kind: str) -> np.ndarray:
    """p of min-max / min-sum: the honest std, the unit vector of the mean, or the mean's sign."""
    if kind == "std":
        return std
    if kind == "unit":
        n = np.sqrt((mean * mean).sum(axis=-1, keepdims=True))
        return np.where(n > 0.0, mean / np.where(n > 0.0, n, 1.0), 0.0)
    if kind == "sign":
        return np.sign(mean)
    raise ValueError(f"direction must be one of {', '.join(MINMAX_DIRECTIONS)}, got {kind!r}")


def _sq_dist_to_pool(m: np.ndarray, H: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(rows, slots): ||m - H_s||^2 for the present slots, 0 elsewhere."""
    d = m[:, None, :] - H
    return np.where(present, (d * d).sum(axis=-1), 0.0)


def min_max(
    H: np.ndarray,
    present: np.ndarray,
    kind: str,
    objective: str,
    gamma_init: np.ndarray,
    iters: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """min-max / min-sum (Shejwalkar & Houmansadr 2021): ((rows, dim) x = mu - gamma * p, (rows,)
    gamma). ``H``: (rows, slots, dim) the honest models known, ``present`` their mask; mu and std
    per coordinate over them (ddof 0), p by :func:`minmax_direction`.

    gamma is the paper's search, a fixed ``iters`` steps from ``gamma_init``: feasible gammas step up
    by half the last step, infeasible ones down, the last feasible one is kept (0 if none). Feasible:
    ``objective="max"``: max_i ||x - h_i|| <= max_{i,j} ||h_i - h_j||; ``"sum"``: sum_i ||x - h_i||^2
    <= max_i sum_j ||h_i - h_j||^2."""
    m = present[:, :, None]
    count = present.sum(axis=1, keepdims=True).clip(min=1)
    mean = np.where(m, H, 0.0).sum(axis=1) / count
    std = np.sqrt(np.where(m, (H - mean[:, None, :]) ** 2, 0.0).sum(axis=1) / count)
    p = minmax_direction(mean, std, kind)
    diff = H[:, :, None, :] - H[:, None, :, :]
    pair = np.where(present[:, :, None] & present[:, None, :], (diff * diff).sum(axis=-1), 0.0)
    if objective == "max":
        bound = pair.max(axis=(1, 2))
    elif objective == "sum":
        bound = pair.sum(axis=2).max(axis=1)
    else:
        raise ValueError(f"objective must be 'max' or 'sum', got {objective!r}")

    def feasible(gamma: np.ndarray) -> np.ndarray:
        d2 = _sq_dist_to_pool(mean - gamma[:, None] * p, H, present)
        got = d2.max(axis=1) if objective == "max" else d2.sum(axis=1)
        return got <= bound

    gamma = gamma_init.astype(np.float64).copy()
    step = gamma_init.astype(np.float64).copy()
    best = np.zeros_like(gamma)
    for it in range(int(iters.max(initial=0))):
        active = it < iters
        ok = feasible(gamma)
        best = np.where(active & ok, gamma, best)
        gamma = np.where(active, np.where(ok, gamma + step / 2, gamma - step / 2), gamma)
        step = np.where(active, step / 2, step)
    return mean - best[:, None] * p, best


# -- rop -----------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.sqrt((v * v).sum(axis=-1, keepdims=True))
    return np.where(n > 0.0, v / np.where(n > 0.0, n, 1.0), 0.0)


def rop(
    center: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    lam: np.ndarray,
    angle: np.ndarray,
    z: np.ndarray,
) -> np.ndarray:
    """rop, relocated orthogonal perturbation (Ozfatura et al. 2023), per row:
    x = lam * mu + (1 - lam) * c + z * ||sigma|| * (sin(a) p + cos(a) u),
    c the centre the victim clips around (its own model), mu / sigma the honest mean / std, u the
    unit vector of mu - c, p the unit vector of the all-ones direction with its u component
    removed (orthogonal to u), a = ``angle`` in radians. u = 0 when mu = c; p = 0 when the ones
    direction is parallel to u. ``lam``, ``angle``, ``z``: (rows,)."""
    u = _unit(mean - center)
    ones = np.ones_like(mean)
    p = _unit(ones - (ones * u).sum(axis=-1, keepdims=True) * u)
    d = np.sin(angle)[:, None] * p + np.cos(angle)[:, None] * u
    relocated = lam[:, None] * mean + (1.0 - lam)[:, None] * center
    spread = np.sqrt((std * std).sum(axis=-1, keepdims=True))
    return relocated + z[:, None] * spread * d


# -- adaptive ------------------------------------------------------------------------------------------

ADAPTIVE_DIRECTIONS = ("negative", "goal", "away")
# The rules whose acceptance is a loss comparison on the victim's data, and those with a radius.
ADAPTIVE_LOSS_RULES = frozenset(
    {"loss", "loss-filtered", "loss-filtered-capped", "loss-filtered-clipped", "loss-filtered-median", "ubar"}
)
ADAPTIVE_RADIUS_RULES = frozenset({"self-clipping", "balance", "clipped-gossip"})


def adaptive_test(test: str, rule: str) -> str:
    """The acceptance test the adaptive attack stays within: ``test`` ("loss" or "none") when it is
    not "auto", else by the run's ``rule``: "loss" (a loss comparison), "radius" (a clipping or
    acceptance radius) or "none" (nothing to stay within: max_step)."""
    if test != "auto":
        return test
    return "loss" if rule in ADAPTIVE_LOSS_RULES else "radius" if rule in ADAPTIVE_RADIUS_RULES else "none"


def adaptive_direction(
    victim: np.ndarray, kind: str, goal: np.ndarray | None = None, mean: np.ndarray | None = None
) -> np.ndarray:
    """d of the adaptive attack, per row ((rows, dim) each): ``negative`` -psi_k (lambda = 1 is the
    zero model, 2 the victim's model sign-flipped); ``goal`` g - psi_k (lambda = 1 reaches g);
    ``away`` psi_k - mu, mu the mean of the honest models the attacker knows (away from where the
    victim's neighbours, and a shared target, are)."""
    if kind == "negative":
        return -victim
    if kind == "goal":
        if goal is None:
            raise ValueError("direction goal needs the goal model")
        return goal - victim
    if kind == "away":
        if mean is None:
            raise ValueError("direction away needs the honest mean")
        return victim - mean
    raise ValueError(f"direction must be one of {', '.join(ADAPTIVE_DIRECTIONS)}, got {kind!r}")


def along(base: A, d: A, step: float | np.ndarray) -> A:
    """adaptive's candidates: x = base + step * d."""
    return base + step * d


def radius_step(d: np.ndarray, radius: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """(rows,) lambda = (1 - margin) * radius / ||d||: the step that puts psi_k + lambda d at the
    victim's clipping or acceptance radius (just inside it, by ``margin``, so that the victim's own
    rounding cannot put it outside); 0 when d = 0 or the radius is not positive and finite."""
    n = np.sqrt((d * d).sum(axis=-1))
    ok = (n > 0.0) & np.isfinite(radius) & (radius > 0.0)
    return np.where(ok, (1.0 - margin) * np.where(ok, radius, 0.0) / np.where(ok, n, 1.0), 0.0)
