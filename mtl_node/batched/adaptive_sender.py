"""The adaptive attack (attacks/adaptive.py) for every (receiver, slot) pair of a vectorized round.

Per pair: the victim is the receiver (the requester), psi_k its model as ``senders.Attackers.
_victims`` finds it; the direction d and the step lambda are those the attack node computes, by the
same kernels (``mtl_node.kernels.attacks``: adaptive_test, adaptive_direction, radius_step,
budget_step, along; ``mtl_node.kernels.decentralized``: the balance and CS+ radii), all pairs at
once: the loss test's bisection on the attacker's own samples (or, omniscient, the victim's), the
radius at the victim's clipping or acceptance radius, max_step elsewhere. The proxy loss of the
loss-budget attack is here too (:func:`proxy_losses`), since both attacks sum it the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mtl_node.kernels import attacks as ka
from mtl_node.kernels import target_localization as tl
from mtl_node.kernels.decentralized import adaptive_radius, balance_radius
from mtl_node.kernels.robust import norms

if TYPE_CHECKING:
    from mtl_node.batched.senders import Attackers


def proxy_losses(
    samples: list[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    rows: np.ndarray,
    w: np.ndarray,
    round_: int,
    window: np.ndarray,
) -> np.ndarray:
    """(len(rows),): ``attacks.capture.proxy_loss`` per row: the mean squared residual of model
    ``w[j]`` on the samples of row ``rows[j]`` (position ``x[rows[j]]``) of rounds max(1, i -
    window[j] + 1) .. i, summed oldest first as the attack sums them. ``samples``: every row's (u, d)
    of the last rounds, the latest last."""
    total = np.zeros(len(w))
    count = np.zeros(len(w))
    pos = x[rows]
    for back in range(len(samples) - 1, -1, -1):  # oldest first
        r = round_ - back
        use = (back < window) & (r >= 1)
        u, d = samples[len(samples) - 1 - back]
        res = tl.residual(w, pos, u[rows], d[rows])
        total = np.where(use, total + res**2, total)
        count = count + use
    return total / count


def adaptive(
    att: Attackers,
    idx: np.ndarray,
    psi: np.ndarray,
    victim: np.ndarray,
    known: np.ndarray,
    prev: tuple[np.ndarray, np.ndarray] | None,
    round_: int,
) -> np.ndarray:
    """(len(idx), dim): psi_k + lambda d for the adaptive pairs ``idx`` (the sender's honest model
    where the victim's is not ``known``; psi_k itself where lambda is 0)."""
    b = att.b
    a, r = att.senders[idx], att.rows[idx]
    own = psi[a]
    params = [att.spec[s].params for s in a.tolist()]

    d = np.zeros_like(victim)
    direction = np.array([p.direction for p in params], dtype=object)
    for kind in sorted(set(direction.tolist())):
        sel = direction == kind
        goal = att._goal(a[sel]) if kind == "goal" else None
        mean = _pool_mean(att, a[sel], psi, prev) if kind == "away" else None
        d[sel] = ka.adaptive_direction(victim[sel], kind, goal=goal, mean=mean)

    test = np.array(
        [ka.adaptive_test(p.test, b.configs[s].rule) for p, s in zip(params, a.tolist(), strict=True)],
        dtype=object,
    )
    step = np.zeros(len(a))
    none = test == "none"
    step[none] = att._param(a[none], "max_step")
    radius = test == "radius"
    if radius.any():
        rad = _radius(att, a[radius], r[radius], victim[radius], psi, prev, round_)
        step[radius] = ka.radius_step(d[radius], rad, att._param(a[radius], "margin"))
    loss = test == "loss"
    if loss.any():
        omniscient = np.array([bool(p.omniscient) for p in params], dtype=bool)
        data_rows = np.where(omniscient, r, a)[loss]
        step[loss] = _loss_step(att, a[loss], data_rows, victim[loss], d[loss], round_)

    x = np.where((step > 0)[:, None], ka.along(victim, d, step[:, None]), victim)
    return np.where(known[:, None], x, own)


def _pool_mean(
    att: Attackers, senders: np.ndarray, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """mu of H = [h] + the models each sender fetched last round (``attacks._common.honest_pool``),
    the slots taken in neighbour-id order as the attack sums them (absent ones add exact zeros), so
    the mean is the attack's to the last bit."""
    b = att.b
    own = psi[senders]
    if prev is None:
        return own
    received, present = prev
    order = np.zeros((len(senders), b.width), dtype=np.intp)
    for j, a in enumerate(senders.tolist()):
        ids = b.slot_ids[a]
        by_id = sorted(range(1, len(ids)), key=lambda s: ids[s])
        order[j] = [0, *by_id, *range(len(ids), b.width)]
    X = np.take_along_axis(received[senders], order[:, :, None], axis=1)
    mask = np.take_along_axis(present[senders] & b.neighbours[senders], order, axis=1)
    return ka.pool_moments(own, X, mask)[0]


def _radius(
    att: Attackers,
    senders: np.ndarray,
    requesters: np.ndarray,
    victim: np.ndarray,
    psi: np.ndarray,
    prev: tuple[np.ndarray, np.ndarray] | None,
    round_: int,
) -> np.ndarray:
    """Each pair's victim radius under the run's rule (the sender's config: what ``ctx.rule`` and
    ``ctx.rule_params`` are to the attack node): clip_tau, balance's radius around psi_k, or the
    CS+ radius over psi_k, the sender's honest model and its fetch of last round less the victim."""
    b = att.b
    out = np.zeros(len(senders))
    rule = np.array([b.configs[s].rule for s in senders.tolist()], dtype=object)
    sel = rule == "self-clipping"
    out[sel] = b.tau[senders[sel]]
    sel = rule == "balance"
    if sel.any():
        s = senders[sel]
        out[sel] = balance_radius(
            norms(victim[sel]), b.gamma[s], b.kappa[s], np.full(len(s), float(round_)), b.horizon[s]
        )
    sel = rule == "clipped-gossip"
    if sel.any():
        s, k = senders[sel], requesters[sel]
        X = np.stack([victim[sel], psi[s]], axis=1)
        mask = np.ones(X.shape[:2], dtype=bool)
        if prev is not None:
            received, present = prev
            X = np.concatenate([X, received[s]], axis=1)
            fetched = present[s] & b.neighbours[s] & (b.nbr[s] != k[:, None])
            mask = np.concatenate([mask, fetched], axis=1)
        out[sel] = adaptive_radius(X, mask, b.f[s])
    return out


def _loss_step(
    att: Attackers, senders: np.ndarray, data_rows: np.ndarray, base: np.ndarray, d: np.ndarray, round_: int
) -> np.ndarray:
    """lambda = s* x max_step, s* the largest s in [0, 1] with L(psi_k + s max_step d) <= slack x
    L(psi_k) (``attacks.capture.largest_within``: ``kernels.attacks.budget_step``), L the proxy
    loss on ``data_rows``' samples; 0 when the budget is not finite."""
    b = att.b
    slack = att._param(senders, "slack")
    iters = att._param(senders, "iters").astype(np.intp)
    window = att._param(senders, "window").astype(np.intp)
    max_step = att._param(senders, "max_step")

    def proxy(w: np.ndarray) -> np.ndarray:
        return proxy_losses(att.samples, b.x, data_rows, w, round_, window)

    budget = slack * proxy(base)

    def feasible(s: np.ndarray) -> np.ndarray:
        loss = proxy(ka.along(base, d, (s * max_step)[:, None]))
        return np.isfinite(loss) & (loss <= budget)

    s = ka.budget_step(feasible, iters)
    return np.where(np.isfinite(budget), s * max_step, 0.0)
