"""The combination step theta = sum_l a_l psi_l, once for the agents and the vectorized engine.

Accumulated member by member in neighbourhood order (``acc = a_0 psi_0``, then ``acc + a_l psi_l``):
a fixed sequence of element-wise IEEE operations, so one agent's state dict (torch) and a batch
of rows (numpy, absent or zero-weight slots contributing an exact 0) give bit-identical models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

A = Any  # a numpy array or a torch tensor


def accumulate(weights: Sequence[Any], members: Sequence[A]) -> A:
    """sum_l weights[l] * members[l], left to right. Weights broadcast against the members."""
    acc = weights[0] * members[0]
    for w, x in zip(weights[1:], members[1:], strict=True):
        acc = acc + w * x
    return acc


def combine_rows(weights: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(rows, dim): :func:`accumulate` over the slots of every row; weights (rows, slots), X (rows,
    slots, dim) with absent slots holding finite values (their weight is 0)."""
    slots = X.shape[1]
    return accumulate([weights[:, s, None] for s in range(slots)], [X[:, s, :] for s in range(slots)])
