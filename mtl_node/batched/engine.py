"""The vectorized round: adapt, exchange, score, aggregate (the kernels), combine, evaluate.

One call of :func:`_step` advances every agent of every stacked run by one round; :func:`run_many`
loops over rounds and stores what the rounds produced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtl_node.batched import decentralized
from mtl_node.batched.network import Batch, unsupported_reason
from mtl_node.batched.result import (
    ROW_COMBINED_NOT_FINITE,
    ROW_COOPERATED,
    ROW_NON_COOPERATIVE,
    ROW_OWN_NOT_FINITE,
    ROW_TOO_FEW,
    BatchedResult,
    Decisions,
)
from mtl_node.config import NodeConfig
from mtl_node.kernels import robust as kernel_robust
from mtl_node.kernels import target_localization as tl
from mtl_node.kernels.combine import combine_rows
from mtl_node.kernels.decisions import (
    ACCEPTED,
    ACCEPTED_CODES,
    CAPPED,
    CLIPPED,
    FILTERED,
    KRUM_OTHER,
    LEFT_OUT,
    MISSING,
    MISSING_CODES,
    NOT_FINITE,
    RADIUS_CLIPPED,
    REFUSED,
    UNBOUNDED,
)
from mtl_node.kernels.ema import ema_step
from mtl_node.kernels.hardened import cap_weights, clip_pulls, kept_median, own_step_ema


@dataclass
class _State:
    theta: np.ndarray  # (n, 2) combined models
    ema: np.ndarray  # (n, slots) running scores
    seen: np.ndarray  # (n, slots) the EMA has had an observation
    step: np.ndarray  # (n,) loss-filtered-clipped: EMA of the squared own step (NaN: none yet)
    prev: tuple[np.ndarray, np.ndarray] | None = None  # last round's received models and presence


@dataclass
class _Round:
    """What one round produced, before it is stored."""

    loss: np.ndarray
    test_loss: np.ndarray
    code: np.ndarray
    weights: np.ndarray
    losses: np.ndarray | None
    present: np.ndarray
    cooperating: np.ndarray
    self_only: np.ndarray
    row_reason: np.ndarray
    chosen: np.ndarray
    radius: np.ndarray
    distance: np.ndarray | None


def _step(b: Batch, st: _State, i: int) -> _Round:
    """One round for every agent at once; updates ``st`` in place."""
    u, d = b.sample(i)

    # adapt: psi = w + mu (q - w), q = x + d u
    psi = tl.adapt(st.theta, b.x, b.mu, u, d)

    # exchange: what each agent receives in each slot; a non-finite model is left out as missing
    received = psi[b.nbr]
    withheld = None
    if len(b.attacked_rows):
        values, withheld = b.attackers.crafted(i, psi, st.prev)
        received[b.attacked_rows, b.attacked_slots] = values
    present = b.exists & np.isfinite(received).all(axis=2)
    if withheld is not None and withheld.any():
        present[b.attacked_rows[withheld], b.attacked_slots[withheld]] = False
    present[:, 0] = True
    received = np.where(present[:, :, None], received, 0.0)
    if b.keeps_fetched.any():
        st.prev = (received, present)

    # score each received model on the receiver's own sample / against its previous model
    losses = None
    if b.need_loss:
        losses = tl.residual(received, b.x[:, None, :], u[:, None, :], d[:, None]) ** 2
    distances = ((st.theta[:, None, :] - received) ** 2).sum(axis=2) if b.need_distance else None
    if losses is not None and distances is not None:
        score = np.where(b.by_distance, distances, losses)
    else:
        score = next((m for m in (losses, distances) if m is not None), np.zeros(b.nbr.shape))

    # EMA, filter and inverse-EMA weights, row-wise (rows of the EMA rules only)
    own_ok = np.isfinite(score[:, 0])
    cooperating = b.ema_rows & own_ok
    finite_score = np.isfinite(score)
    ema = ema_step(
        score,
        present,
        st.ema,
        st.seen,
        nu=b.nu,
        ema_init=b.ema_init,
        floor=b.floor,
        filtering=b.filtering,
        cooperating=cooperating,
    )
    st.ema, st.seen = ema.ema, ema.seen
    update, worse, keep, weights = ema.updated, ema.worse, ema.kept, ema.weights
    # hardened loss-filtered rules (mtl_node.kernels.hardened), on rows that cooperate
    capped_code = None
    if len(b.capped_rows):
        rows = b.capped_rows[cooperating[b.capped_rows]]
        weights[rows], hit = cap_weights(weights[rows], b.weight_cap[rows])
        capped_code = (rows, hit)
    radius = np.full(b.n, math.nan)
    clipped_combined: tuple[np.ndarray, np.ndarray] | None = None
    clipped_code = None
    if len(b.clipped_rows):
        # the own-step EMA of every clipped row, then clipping on the rows that cooperate
        rows = b.clipped_rows
        step = ((st.theta[rows] - psi[rows]) ** 2).sum(axis=1)
        st.step[rows] = own_step_ema(st.step[rows], step, b.nu[rows, 0])
        rows = rows[cooperating[rows] & ~np.isnan(st.step[rows])]
        kept = keep[rows] & (weights[rows] > 0.0)
        kept[:, 0] = False
        rows, kept = rows[kept.any(axis=1)], kept[kept.any(axis=1)]
        tau = b.clip_scale[rows] * np.sqrt(st.step[rows])
        out = clip_pulls(received[rows], kept, weights[rows], tau)
        good = out.finite
        rows = rows[good]
        weights[rows] = out.weights[good]
        radius[rows] = tau[good]
        clipped_combined = (rows, out.combined[good])
        clipped_code = (rows, out.clipped[good], out.dropped[good])

    # loss-filtered-median: the coordinate-wise median of the members the filter kept (the agent
    # first among them), each logged with weight 1/m; loss-filtered's combination where it does not run
    median_combined = None
    if len(b.median_rows):
        rows = b.median_rows[cooperating[b.median_rows]]
        members = weights[rows] > 0.0
        use = (members.sum(axis=1) > 1) & members[:, 0]
        rows, members = rows[use], members[use]
        z = kept_median(received[rows], members)
        good = np.isfinite(z).all(axis=1)
        rows, members = rows[good], members[good]
        weights[rows] = members / members.sum(axis=1, keepdims=True)
        median_combined = (rows, z[good])

    # average: equal weights over the present members; self-only rows keep their own model
    avg = b.average_rows
    weights[avg] = present[avg] / present[avg].sum(axis=1, keepdims=True)
    self_only = b.self_only_rows | (b.ema_rows & ~own_ok)
    row_reason = np.where(
        b.self_only_rows, ROW_NON_COOPERATIVE, np.where(self_only, ROW_OWN_NOT_FINITE, ROW_COOPERATED)
    ).astype(np.int8)

    # robust rules: a statistic of the present members' models (mtl_node.aggregation.robust)
    combined: list[tuple[np.ndarray, np.ndarray]] = []
    chosen = np.full(b.n, -1, dtype=np.intp)
    scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rule, all_rows in b.robust_index.items():
        rows, mask = decentralized.enough_members(b, all_rows, present, row_reason)
        if not len(rows):
            continue
        X = received[rows]
        if rule == "krum":
            pick = kernel_robust.krum_select(X, mask, b.f[rows])
            weights[rows] = 0.0
            weights[rows, pick] = 1.0
            chosen[rows] = pick
            continue
        if rule == "median":
            z = kernel_robust.coordinate_median(X, mask)
        elif rule == "trimmed-mean":
            z = kernel_robust.trimmed_mean(X, mask, b.f[rows])
        elif rule == "geometric-median":
            z = kernel_robust.geometric_median(X, mask, b.iters[rows], b.eps[rows])
        else:
            z, scale = kernel_robust.self_clip(X, mask, b.tau[rows])
        bad = ~np.isfinite(z).all(axis=1)
        row_reason[rows[bad]] = ROW_COMBINED_NOT_FINITE
        rows, mask, z = rows[~bad], mask[~bad], z[~bad]
        n = mask.sum(axis=1, keepdims=True)
        if rule == "self-clipping":
            scale = scale[~bad]
            w = scale / n
            w[:, 0] = 1.0 - kernel_robust.slot_sum(w[:, 1:])
            weights[rows] = w
            scales[rule] = (rows, scale)
        else:
            weights[rows] = mask / n
        combined.append((rows, z))
    # the decentralized defenses (ubar, balance, clipped-gossip, ios): mtl_node/batched/decentralized.py
    decentral = None
    if b.decentral_index:
        decentral = decentralized.aggregate(b, i, received, present, losses, weights, row_reason, radius)
        combined.extend(decentral.combined)
    robust_fallback = b.robust_rows & ((row_reason == ROW_TOO_FEW) | (row_reason == ROW_COMBINED_NOT_FINITE))
    self_only |= robust_fallback
    weights[self_only] = 0.0
    weights[self_only, 0] = 1.0

    # combine, then evaluate the combined model on this round's sample and the held-out set
    st.theta = combine_rows(weights, received)
    for rows, z in combined:
        st.theta[rows] = z
    for extra in (clipped_combined, median_combined):
        if extra is not None:
            st.theta[extra[0]] = extra[1]
    loss = tl.residual(st.theta, b.x, u, d) ** 2
    residual = tl.residual(st.theta[:, None, :], b.x[:, None, :], b.test_u, b.test_d)
    if b.equal_tests:
        test_loss = tl.mean_square(residual)
    else:
        test_loss = (residual**2 * b.test_mask).sum(axis=1) / b.test_count

    # decisions, as the rules would write them
    code = np.full(b.nbr.shape, ACCEPTED, dtype=np.int8)
    code[worse & update] = FILTERED
    code[~update & cooperating[:, None] & ~finite_score] = NOT_FINITE
    code[b.uses_fetched[:, None] & ~present] = MISSING
    if withheld is not None and withheld.any():
        refused = np.zeros(b.nbr.shape, dtype=bool)
        refused[b.attacked_rows[withheld], b.attacked_slots[withheld]] = True
        code[refused & b.uses_fetched[:, None]] = REFUSED
    code[self_only[:, None] & present] = LEFT_OUT
    code[b.self_only_rows[:, None] & b.listed] = LEFT_OUT  # they use no fetch: nobody is missing
    code[:, 0] = ACCEPTED
    krum = chosen >= 0
    if krum.any():
        other = present[krum] & (np.arange(b.width)[None, :] != chosen[krum][:, None])
        code[krum] = np.where(other, KRUM_OTHER, code[krum])
    for rows, scale in scales.values():
        clip = present[rows] & (scale < 1.0)
        clip[:, 0] = False
        code[rows] = np.where(clip, np.where(scale > 0.0, CLIPPED, UNBOUNDED), code[rows])
    if capped_code is not None:
        rows, hit = capped_code
        code[rows] = np.where(hit, CAPPED, code[rows])
    if clipped_code is not None:
        rows, clip, dropped = clipped_code
        code[rows] = np.where(clip, RADIUS_CLIPPED, np.where(dropped, UNBOUNDED, code[rows]))
    if decentral is not None:
        for rows, block in decentral.codes:
            code[rows] = np.where(block >= 0, block, code[rows])
    code[~b.listed] = -1
    return _Round(
        loss,
        test_loss,
        code,
        weights,
        losses,
        present,
        cooperating,
        self_only,
        row_reason,
        chosen,
        radius,
        None if decentral is None else decentral.distance,
    )


def run_batched(
    configs: Sequence[NodeConfig], *, record_decisions: bool = False, keep_models: bool = False
) -> BatchedResult:
    """Run every agent to its last round, all at once; see the module docstring for semantics.

    ``record_decisions`` keeps per-neighbour decisions (rounds x agents x slots arrays, turned into
    rows only on demand); ``keep_models`` keeps every round's combined models.
    """
    return run_many([configs], record_decisions=record_decisions, keep_models=keep_models)[0]


def run_many(
    runs: Sequence[Sequence[NodeConfig]], *, record_decisions: bool = False, keep_models: bool = False
) -> list[BatchedResult]:
    """Several independent runs (each as :func:`run_batched` would run it) in one vectorized pass.

    Each run is its own network: agent ids need only be unique within a run, and the same id
    (with the same seed and task parameters) in several runs sees the same data, so runs that
    differ only in rule or attack are paired comparisons. All runs must have the same rounds.
    Sweeps use this to pay numpy's per-call overhead once for many small networks.
    """
    if not runs:
        return []
    for j, configs in enumerate(runs):
        reason = unsupported_reason(configs)
        if reason is not None:
            where = f"run {j}: " if len(runs) > 1 else ""
            raise ValueError(f"the batched engine cannot run this: {where}{reason}")
    if len({configs[0].rounds for configs in runs}) != 1:
        raise ValueError("the batched engine cannot run this: runs have different numbers of rounds")
    started = time.perf_counter()
    b = Batch(runs)
    n, width, rounds = b.n, b.width, runs[0][0].rounds
    loss = np.empty((rounds, n))
    test_loss = np.empty((rounds, n))
    counts = np.empty((3, rounds, n), dtype=np.int64)
    models = np.empty((rounds, n, 2)) if keep_models else None
    round_seconds = np.empty(rounds)
    dec = (
        Decisions(
            code=np.empty((rounds, n, width), dtype=np.int8),
            weight=np.empty((rounds, n, width)),
            ema=np.empty((rounds, n, width)),
            loss=np.empty((rounds, n, width)),
            row_reason=np.empty((rounds, n), dtype=np.int8),
            chosen=np.empty((rounds, n), dtype=np.intp),
            radius=np.empty((rounds, n)),
            distance=np.full((rounds, n, width), math.nan) if "balance" in b.decentral_index else None,
        )
        if record_decisions
        else None
    )
    st = _State(b.init.copy(), np.zeros((n, width)), np.zeros((n, width), dtype=bool), np.full(n, math.nan))

    # Overflow and NaN are legitimate inputs (a crafted 1e200 model): the rules handle them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i in range(1, rounds + 1):
            t0 = time.perf_counter()
            out = _step(b, st, i)
            r = i - 1
            loss[r], test_loss[r] = out.loss, out.test_loss
            if models is not None:
                models[r] = st.theta
            accepted = np.isin(out.code, ACCEPTED_CODES) & b.neighbours
            missing = np.isin(out.code, MISSING_CODES) & b.neighbours
            counts[0, r] = accepted.sum(axis=1)
            counts[1, r] = (b.neighbours & ~accepted & ~missing).sum(axis=1)
            counts[2, r] = missing.sum(axis=1)
            if dec is not None:
                dec.code[r] = out.code
                dec.weight[r] = out.weights
                dec.ema[r] = np.where(out.cooperating[:, None] & st.seen, st.ema, math.nan)
                dec.loss[r] = math.nan
                if out.losses is not None:
                    dec.loss[r] = np.where(b.reports_loss[:, None] & out.present, out.losses, math.nan)
                dec.row_reason[r] = out.row_reason
                dec.chosen[r] = out.chosen
                dec.radius[r] = out.radius
                if dec.distance is not None and out.distance is not None:
                    dec.distance[r] = out.distance
            round_seconds[r] = time.perf_counter() - t0

    seconds = time.perf_counter() - started
    roles = tuple("byzantine" if z else "normal" for z in b.byzantine.tolist())
    results = []
    for rows in b.run_rows:
        sl = slice(rows.start, rows.stop)
        results.append(
            BatchedResult(
                agents=tuple(b.ids[sl]),
                roles=roles[sl],
                rules=tuple(c.rule for c in b.configs[sl]),
                slots=tuple(tuple(x) for x in b.slot_ids[sl]),
                loss=loss[:, sl],
                test_loss=test_loss[:, sl],
                accepted=counts[0][:, sl],
                filtered=counts[1][:, sl],
                missing=counts[2][:, sl],
                final_models=st.theta[sl],
                models=None if models is None else models[:, sl],
                decisions=None
                if dec is None
                else Decisions(
                    code=dec.code[:, sl],
                    weight=dec.weight[:, sl],
                    ema=dec.ema[:, sl],
                    loss=dec.loss[:, sl],
                    row_reason=dec.row_reason[:, sl],
                    chosen=dec.chosen[:, sl],
                    radius=dec.radius[:, sl],
                    distance=None if dec.distance is None else dec.distance[:, sl],
                ),
                round_seconds=round_seconds,
                seconds=seconds,
                rule_params=tuple(b.params[sl]),
            )
        )
    return results
