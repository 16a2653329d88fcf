"""Case study 1's task maths (streaming LMS), once: the task (one agent, torch tensors) and the
vectorized engine (every agent and slot at once, numpy) both call these.

Only arithmetic and indexing, so the same code runs on numpy arrays and torch
tensors. Shapes broadcast: w, x, u are (..., 2), d is (...).
"""

from __future__ import annotations

from typing import Any

import numpy as np

A = Any  # a numpy array or a torch tensor


def adapt(w: A, x: A, mu: A, u: A, d: A) -> A:
    """The LMS step of the reference code: psi = w + mu (q - w), q = x + d u."""
    q = x + d[..., None] * u
    return w + mu * (q - w)


def residual(w: A, x: A, u: A, d: A) -> A:
    """d - u^T (w - x): the measurement's error under model w (the loss is its square).

    The two-term dot product is written out: a reduction over a last axis of length 2 costs numpy
    several times more than these four element-wise operations on (agents x samples) arrays."""
    e = w - x
    return d - (e[..., 0] * u[..., 0] + e[..., 1] * u[..., 1])


def mean_square(residual: np.ndarray) -> np.ndarray:
    """Mean of the squared residuals over the last axis (the held-out test loss); numpy, so that
    one agent's and a batch's means are summed the same way."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge crafted models overflow to inf
        return np.mean(residual**2, axis=-1)
