"""The torch batched engine's exchange: one pool of distinct models, scored and combined once.

In a round every agent receives its neighbours' adapted models, and the Byzantine ones' crafted
models. Gathering them per (receiver, slot) copies every model as many times as it has receivers
(30 x 30 HAR models are 12 MB a round) and scores each copy on its own. Here a round's models are
held once, in a *pool* (the agents' adapted models, then each crafted model once: once per attacker,
or once per requester for attacks drawn per request), and ``src[k, s]`` says which pool model slot s
of agent k receives. Then:

- **scoring**: the loss of every pool model on every scoring row's batch, vmapped over the pool
  with the rows' batches in one forward call per model (an honest model is scored once per
  receiver, as before, but without copies, and a linear model becomes one matrix product); when
  the pool is much wider than a neighbourhood (sparse graphs, attacks drawn per request) the
  models are gathered per slot instead, so neither path does more than twice the work needed;
- **distances** ``||theta_k(i-1) - psi_l||^2`` with ``torch.cdist`` over the pool, per tensor;
- **combination** ``theta_k = sum_s w_ks psi_src(k,s)`` as one (rows x pool) matrix product.

These sum in a different order from one agent's own calls (matmul blocks instead of slot order),
the same float32 rounding difference the vmapped local steps already have (1e-7 relative a round;
tests/unit/test_torch_batched.py checks 1e-5 against the per-agent engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from mtl_node.batched import torch_linear
from mtl_node.kernels.combine import accumulate

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Pool:
    models: Stacked  # name -> (pool, *shape): rows 0..n-1 the agents' adapted models, then crafted
    src: torch.Tensor  # (rows, slots) long: the pool model each slot receives
    present: np.ndarray  # (rows, slots) bool: a valid model arrived (slot 0: always)
    missing: dict[tuple[int, int], str]  # why a listed slot received nothing valid

    def slot(self, k: int, s: int) -> dict[str, torch.Tensor]:
        j = int(self.src[k, s])
        return {name: t[j] for name, t in self.models.items()}


Spec = dict[str, tuple[torch.dtype, torch.Size]]  # name -> (dtype, shape) of one model


def spec_of(model: Mapping[str, torch.Tensor]) -> Spec:
    return {name: (t.dtype, t.shape) for name, t in model.items()}


def surely_valid(model: Mapping[str, torch.Tensor], spec: Spec) -> bool:
    """True only when ``wire.validate_state`` would accept ``model`` for a manifest of ``spec``:
    the same names, dtypes and shapes, and every floating tensor's sum finite (a NaN or infinity
    makes the sum NaN or infinite). False when unsure (an overflowing sum of finite values too):
    then the caller asks validate_state, which also says why. One sum per tensor instead of
    validate_state's min/max and finiteness tests: a third of crafting a HAR model."""
    if model.keys() != spec.keys():
        return False
    for name, t in model.items():
        dtype, shape = spec[name]
        if t.dtype != dtype or t.shape != shape:
            return False
        if t.is_floating_point() and not math.isfinite(float(t.sum())):
            return False
    return True


def finite_rows(models: Stacked) -> torch.Tensor:
    """(pool,) bool: every value of the model is finite (what ``wire.validate_state`` checks)."""
    ok: torch.Tensor | None = None
    for t in models.values():
        if not t.is_floating_point():
            continue
        flat = t.reshape(len(t), -1)
        row = torch.isfinite(flat.amin(dim=1)) & torch.isfinite(flat.amax(dim=1))
        ok = row if ok is None else ok & row
    assert ok is not None
    return ok


class PoolScorer:
    """Losses of pool models on the receivers' batches, for one module and loss function."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, closed_form: bool = False) -> None:
        def on_rows(params: Stacked, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(module, params, (x.flatten(0, 1),))
            return vmap(loss_fn)(out.unflatten(0, x.shape[:2]), y)

        def loss_of(params: Stacked, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(module, params, (x,)), y)

        # (pool, rows): every pool model on every row's batch; (rows, slots): per gathered slot.
        self.all_pairs: Callable[..., torch.Tensor] = vmap(on_rows, in_dims=(0, None, None))
        self.per_slot: Callable[..., torch.Tensor] = vmap(vmap(loss_of, in_dims=(0, None, None)))
        # A bare linear layer (HAR): every pool model's outputs on the stacked batches as one matrix
        # product; vmap turns it into one small product per model, 3x slower for HAR's 6 outputs.
        self.linear = type(module) is nn.Linear
        # ... and with the default cross-entropy (torch_linear), its losses in closed form too.
        self.closed_form = closed_form
        self.pair_losses: Callable[..., torch.Tensor] = vmap(vmap(loss_fn), in_dims=(0, None))

    def losses(self, pool: Pool, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(len(rows), slots) float32: the loss of what each slot of ``rows`` received, on that
        row's batch (x, y: (len(rows), batch, ...))."""
        src = pool.src[rows]
        size = len(next(iter(pool.models.values())))
        if size <= 2 * src.shape[1]:
            if self.closed_form:  # only the models these rows receive (not the attackers' own)
                used, inverse = torch.unique(src, return_inverse=True)
                models = {name: t.index_select(0, used) for name, t in pool.models.items()}
                return torch_linear.pool_losses(models, x, y).T.gather(1, inverse)
            elif self.linear and x.dim() == 3:
                w, b = pool.models["weight"], pool.models.get("bias")
                out = x.flatten(0, 1) @ w.reshape(-1, w.shape[-1]).T  # (rows*batch, pool*outputs)
                out = out.view(*x.shape[:2], size, w.shape[1]).permute(2, 0, 1, 3)
                pairs = self.pair_losses(out if b is None else out + b[:, None, None, :], y)
            else:
                pairs = self.all_pairs(pool.models, x, y)  # (pool, rows)
            return pairs.T.gather(1, src)
        return self.per_slot({name: t[src] for name, t in pool.models.items()}, x, y)


# Elements of one (rows x models x parameters) difference in distances(): bounds its memory (16 MB).
DIFF_ELEMENTS = 1 << 22


def distances(theta_prev: Stacked, pool: Pool, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), slots) float64: ||theta_prev_k - psi_src(k,s)||^2, each tensor's sum of squared
    differences in float32 and the tensors added in float64, as ``mtl_node.combine.squared_distance``
    does (the same element operations; torch.cdist, which takes a square root, was 2x slower here).
    Only the pool models the rows receive, a few rows at a time."""
    total: torch.Tensor | None = None
    used, inverse = torch.unique(pool.src[rows], return_inverse=True)  # the models they receive
    for name, t in pool.models.items():
        if not t.is_floating_point():
            continue
        models = t.index_select(0, used).reshape(len(used), -1)
        prev = theta_prev[name].index_select(0, rows.to(t.device)).reshape(len(rows), -1)
        step = max(1, DIFF_ELEMENTS // max(1, models.numel()))
        sq = torch.cat(
            [
                (models[None] - prev[j : j + step, None]).square_().sum(dim=-1)
                for j in range(0, len(rows), step)
            ]
        ).double()
        total = sq if total is None else total + sq
    assert total is not None
    return total.gather(1, inverse)


def combine(pool: Pool, weights: np.ndarray, keep_own: np.ndarray, psi: Stacked) -> Stacked:
    """theta_k = sum_s weights[k, s] psi_src(k,s) for every row (rows that keep their own model get
    a copy of it). Slots with weight 0 add an exact 0: non-finite pool models (never present but
    in the own slot) are zeroed first, and a row whose own non-finite model is weighted sums slot by
    slot as the agent does, so it gets the agent's NaN."""
    if keep_own.all():  # nobody combines (rule none): every row keeps its own adapted model
        return dict(psi)
    n, width = weights.shape
    size = len(next(iter(pool.models.values())))
    device = pool.src.device
    w = torch.from_numpy(weights).to(device, torch.float32)
    dense = torch.zeros((n, size), dtype=torch.float32, device=device)
    dense.index_put_((torch.arange(n, device=device)[:, None].expand(n, width), pool.src), w, accumulate=True)
    ok = finite_rows(pool.models)
    models = pool.models
    bad_rows: list[int] = []
    if not bool(ok.all()):
        models = {name: torch.where(_col(ok, t), t, torch.zeros_like(t)) for name, t in models.items()}
        own_bad = (~ok[:n]).cpu().numpy() & (weights[:, 0] != 0.0) & ~keep_own
        bad_rows = np.flatnonzero(own_bad).tolist()
    keep = torch.from_numpy(keep_own).to(device)
    theta: Stacked = {}
    for name, t in models.items():
        out = (dense @ t.reshape(size, -1)).reshape(n, *t.shape[1:])
        out[keep] = psi[name][keep]
        for k in bad_rows:
            out[k] = accumulate(
                [w[k, s] for s in range(width)],
                [pool.models[name][int(pool.src[k, s])] for s in range(width)],
            )
        theta[name] = out
    return theta


def _col(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def vectors(pool: Pool, k: int) -> np.ndarray:
    """(slots, dim) float64: row k's received models flattened as ``mtl_node.combine.flatten``
    does (floating tensors in name order)."""
    src = pool.src[k]
    names = sorted(name for name, t in pool.models.items() if t.is_floating_point())
    flat = torch.cat([pool.models[name][src].reshape(len(src), -1) for name in names], dim=1)
    return flat.double().cpu().numpy()
