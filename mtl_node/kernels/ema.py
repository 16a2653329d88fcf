"""The paper's running-score rules (eqs. 4, 9, 10) over batches of neighbourhoods.

The only copy of the maths of ``loss``, ``loss-filtered`` and ``distance`` (and the first step of the
hardened loss-filtered rules): an exponential moving average per (agent, neighbour) of a per-round
score, an optional filter dropping neighbours whose average is above the agent's own, and weights
proportional to the inverse averages of the members kept. Arrays are (rows, slots): slot 0 is the
agent itself, the others its neighbours; the daemon's rule calls :func:`ema_step` with one row, the
vectorized engine with all rows.

Semantics (written down in ``mtl_node.aggregation.rules`` and docs/rules.md): a missing member, or
one whose score is NaN/inf, is left out without touching its average; the first observation moves
the average from ``ema_init`` (or becomes it when ``ema_init`` is NaN, i.e. ``null``); ties with the
agent's own average are accepted; scores below ``floor`` count as ``floor`` when inverted. A row
whose own score is not finite does not cooperate (the caller keeps the own model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtl_node.kernels.robust import slot_sum


@dataclass(frozen=True)
class EmaStep:
    ema: np.ndarray  # (rows, slots) running scores after this round
    seen: np.ndarray  # (rows, slots) bool: the average has had an observation
    updated: np.ndarray  # (rows, slots) bool: present with a finite score, in a cooperating row
    worse: np.ndarray  # (rows, slots) bool: dropped by the filter (only where updated)
    kept: np.ndarray  # (rows, slots) bool: updated and not dropped
    weights: np.ndarray  # (rows, slots): inverse averages of the kept members, normalised per row


def ema_step(
    score: np.ndarray,
    present: np.ndarray,
    ema: np.ndarray,
    seen: np.ndarray,
    *,
    nu: np.ndarray,
    ema_init: np.ndarray,
    floor: np.ndarray,
    filtering: np.ndarray,
    cooperating: np.ndarray,
) -> EmaStep:
    """One round of the running-score rules.

    ``score``, ``present``, ``ema``, ``seen``: (rows, slots); ``nu``, ``ema_init`` (NaN: start at the
    first observation), ``floor``, ``filtering`` (bool): (rows, 1); ``cooperating``: (rows,) bool.
    Overflow and NaN are legitimate inputs (crafted models): call it under
    ``np.errstate(over="ignore", invalid="ignore", divide="ignore")`` to keep numpy quiet.
    """
    finite = np.isfinite(score)
    updated = present & finite & cooperating[:, None]
    prev = np.where(seen, ema, ema_init)
    first = np.isnan(ema_init) & ~seen
    new = np.where(first, score, (1.0 - nu) * prev + nu * score)
    ema = np.where(updated, new, ema)
    seen = seen | updated
    worse = filtering & (ema > ema[:, :1])  # ties are accepted
    kept = updated & ~worse
    # Scaled by the row's smallest kept average so that no inverse overflows.
    scale = np.maximum(np.where(kept, ema, np.inf).min(axis=1, keepdims=True), floor)
    inverse = np.where(kept, scale / np.maximum(ema, floor), 0.0)
    weights = inverse / slot_sum(inverse)[:, None].clip(min=np.finfo(float).tiny)
    return EmaStep(ema, seen, updated, worse & updated, kept, weights)
