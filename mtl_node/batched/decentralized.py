"""The decentralized defenses (ubar, balance, clipped-gossip, ios) on every row of a rule at once.

The maths is ``mtl_node.kernels.decentralized``: the daemon's rules (``mtl_node.aggregation.
decentralized``) call the same kernels with one row of present members, this module with all the
rows of a rule, padded to the batch's width with a presence mask. Here the rows are gathered, the
run-time assumption checked (clipped-gossip and ios need 2f+2 and 2f+1 present members), and what
the rules' decisions say turned into per-slot codes (``mtl_node.kernels.decisions``) with the
numbers their reasons quote (``radius`` per row, ``distance`` per slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mtl_node.batched.result import ROW_COMBINED_NOT_FINITE, ROW_TOO_FEW
from mtl_node.kernels import decentralized as kernels
from mtl_node.kernels.decisions import (
    CLIPPED_AWAY,
    IOS_OUT,
    OUTSIDE_RADIUS,
    RADIUS_CLIPPED,
    UBAR_FAR,
    UBAR_LOSS,
    UNBOUNDED,
)

if TYPE_CHECKING:
    from mtl_node.batched.network import Batch

KEEP = -1  # in a code block: the slot keeps the code the engine gave it


@dataclass
class Outcome:
    """What the decentralized rows produced this round (the engine writes it into its arrays)."""

    combined: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, new models)
    codes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, (rows, slots))
    distance: np.ndarray | None = None  # (n, slots): balance's distances to the own model


def enough_members(
    b: Batch, rows: np.ndarray, present: np.ndarray, row_reason: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a rule that needs ``b.need`` present members (robust and decentralized rules)
    and their presence masks; the others get ROW_TOO_FEW (they keep their own model, as the
    daemon's rule does when too few members answered)."""
    mask = present[rows]
    few = mask.sum(axis=1) < b.need[rows]
    row_reason[rows[few]] = ROW_TOO_FEW
    return rows[~few], mask[~few]


def aggregate(
    b: Batch,
    i: int,
    received: np.ndarray,
    present: np.ndarray,
    losses: np.ndarray | None,
    weights: np.ndarray,
    row_reason: np.ndarray,
    radius: np.ndarray,
) -> Outcome:
    """Round ``i`` of every decentralized row; writes ``weights``, ``row_reason`` and ``radius``
    in place (rows that keep their own model get ROW_TOO_FEW / ROW_COMBINED_NOT_FINITE, as the
    robust rows do)."""
    out = Outcome()
    for rule, all_rows in b.decentral_index.items():
        rows, mask = enough_members(b, all_rows, present, row_reason)
        if not len(rows):
            continue
        X = received[rows]
        neighbour = mask.copy()
        neighbour[:, 0] = False
        if rule == "ubar":
            assert losses is not None  # the engine scores every row when a ubar row exists
            z, selected, keep = kernels.ubar(X, mask, losses[rows], b.ubar_rho[rows], b.alpha[rows])
            w = kernels.mixed_weights(keep, b.alpha[rows])
            code = np.where(neighbour & ~keep, np.where(selected, UBAR_LOSS, UBAR_FAR), KEEP)
            number = selected.sum(axis=1).astype(np.float64)  # ubar_far's k
        elif rule == "balance":
            round_ = np.full(len(rows), float(i))
            z, keep, number = kernels.balance(
                X, mask, b.gamma[rows], b.kappa[rows], round_, b.horizon[rows], b.alpha[rows]
            )
            w = kernels.mixed_weights(keep, b.alpha[rows])
            code = np.where(neighbour & ~keep, OUTSIDE_RADIUS, KEEP)
            if out.distance is None:
                out.distance = np.full(present.shape, np.nan)
            out.distance[rows] = kernels.distances_to_own(X)
        elif rule == "clipped-gossip":
            z, scale, number = kernels.clipped_gossip(X, mask, b.f[rows])
            w = kernels.clipped_weights(scale, mask)
            away = np.where(number[:, None] > 0.0, UNBOUNDED, CLIPPED_AWAY)
            code = np.where(neighbour & (scale < 1.0), np.where(scale > 0.0, RADIUS_CLIPPED, away), KEEP)
        else:  # ios
            z, keep = kernels.ios(X, mask, b.f[rows])
            w = kernels.ios_weights(keep)
            code = np.where(neighbour & ~keep, IOS_OUT, KEEP)
            number = np.full(len(rows), np.nan)
        good = np.isfinite(z).all(axis=1)
        row_reason[rows[~good]] = ROW_COMBINED_NOT_FINITE
        rows = rows[good]
        weights[rows] = w[good]
        radius[rows] = number[good]
        out.combined.append((rows, z[good]))
        out.codes.append((rows, code[good].astype(np.int8)))
    return out
