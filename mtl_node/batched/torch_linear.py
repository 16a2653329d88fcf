"""A bare linear layer with cross-entropy (HAR's softmax classifier) in closed form, for many rows.

For ``nn.Linear`` followed by the default ``F.cross_entropy`` the engine's model calls are a few
batched matrix products, so the torch batched engine computes them directly instead of through
``torch.func`` (``vmap(grad(functional_call(...)))``), whose per-call tracing costs several times
the arithmetic at HAR's size (30 rows x 10 samples x 561 features: the vmapped gradient took
0.6 ms, the closed form 0.13 ms; docs/performance.md). With ``z = x W^T + b`` and ``B`` samples:

- loss: ``mean_j -log_softmax(z_j)[y_j]``, as ``F.cross_entropy`` (log-softmax, then the mean of
  the negated target entries, which is what ``nll_loss`` computes);
- gradient: ``d = (softmax(z) - onehot(y)) / B``, then ``dW = d^T x`` and ``db = sum_j d_j``. This is
  what autograd computes for one agent: ``nll_loss``'s backward puts ``-1/B`` at the targets and
  ``log_softmax``'s backward turns it into ``exp(log_softmax(z)) / B - onehot / B``; the linear
  layer's backward is ``d^T x`` and the column sums of ``d``.

The products sum in another order than one agent's own calls (a batched product instead of one
``addmm`` / ``mm`` per agent): float32 results differ in the last bits, as the vmapped path's do;
tests/unit/test_torch_linear.py checks this path against that one, and
tests/unit/test_torch_batched.py the engine against the per-agent engine (HAR runs this path).
"""

from __future__ import annotations

import torch
from torch import nn

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape)


def applies(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the closed form computes this model: a bare ``nn.Linear`` (bias or not) on flat
    float samples ``x`` (n, features) and class indices ``y``. The caller checks that the loss is
    the default cross-entropy (torch_model's ``per_sample_tests``)."""
    return (
        type(module) is nn.Linear
        and x.dim() == 2
        and x.is_floating_point()
        and y.dim() == 1
        and y.dtype == torch.long
        and {name for name, _ in module.named_parameters()} <= {"weight", "bias"}
    )


def layout(x: torch.Tensor) -> torch.Tensor:
    """Fixed samples ``x`` (rows, samples, features) in the layout :func:`logits` reads fastest:
    (rows, features, samples), contiguous (made once per run for the test splits)."""
    return x.transpose(1, 2).contiguous()


def logits(params: Stacked, xt: torch.Tensor) -> torch.Tensor:
    """(rows, classes, samples): row j's layer on its samples, ``xt`` (rows, features, samples)
    (:func:`layout`, or a transposed view). Classes come before samples because torch's CPU
    log-softmax and gather over a dimension of 6 classes are 10-20x faster when it is not the last
    one (measured: 0.02 ms against 0.47 ms for HAR's pool scores)."""
    w = params["weight"]
    b = params.get("bias")
    if b is None:
        return torch.bmm(w, xt)
    return torch.baddbmm(b[:, :, None], w, xt)


def sample_losses(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., samples): the cross-entropy of each sample's logits ``z`` (..., classes, samples);
    ``y`` (samples,) or with leading dimensions that broadcast to ``z``'s."""
    target = y.expand(z.shape[:-2] + z.shape[-1:])[..., None, :]
    return -torch.log_softmax(z, dim=-2).gather(-2, target).squeeze(-2)


def predictions(z: torch.Tensor) -> torch.Tensor:
    """(..., samples): the class of each sample, ``argmax`` as torch takes it (first of equal
    maxima, NaN the largest); on a contiguous (..., samples, classes) copy, where it is fast."""
    return z.transpose(-1, -2).contiguous().argmax(dim=-1)


def row_losses(params: Stacked, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows,): row j's mean cross-entropy on ``(x[j], y[j])``, x (rows, samples, features)."""
    return sample_losses(logits(params, x.transpose(1, 2)), y).mean(dim=-1)


def grads(params: Stacked, x: torch.Tensor, y: torch.Tensor) -> Stacked:
    """Each row's gradient of its mean cross-entropy on its own batch ``(x[j], y[j])``, x (rows,
    samples, features)."""
    z = logits(params, x.transpose(1, 2))  # (rows, classes, samples)
    scale = 1.0 / x.shape[1]
    d = torch.exp(torch.log_softmax(z, dim=1)) * scale
    at = torch.full((len(y), 1, y.shape[1]), -scale, dtype=d.dtype, device=d.device)
    d.scatter_add_(1, y[:, None, :], at)  # minus onehot(y) / B
    out = {"weight": torch.bmm(d, x)}
    if "bias" in params:
        out["bias"] = d.sum(dim=2)
    return out


def pool_losses(models: Stacked, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(pool, rows): every pool model's mean cross-entropy on every row's batch (x: (rows,
    samples, features)), its logits one matrix product over the stacked samples."""
    w, b = models["weight"], models.get("bias")
    size, classes = w.shape[0], w.shape[1]
    z = w.reshape(-1, w.shape[-1]) @ x.flatten(0, 1).T  # (pool*classes, rows*samples)
    z = z.view(size, classes, -1)
    if b is not None:
        z = z + b[:, :, None]
    return sample_losses(z, y.flatten()).view(size, *y.shape).mean(dim=-1)


def test_metrics(
    params: Stacked, xt: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, accuracy) float64 of each row's model on its padded test split ``xt`` (rows,
    features, samples: :func:`layout`), ``mask`` the real samples, ``count`` their number per row."""
    return _metrics(logits(params, xt), y, mask, count)


def _metrics(
    z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    losses = sample_losses(z, y).double()
    loss = (losses * mask).sum(dim=1) / count
    hit = (predictions(z) == y).double()
    acc = (hit * mask).sum(dim=1) / count
    return loss, acc


class Tests:
    """Every row's test metrics and backdoor attack success rate (mtl_node.tasks.trigger) from one
    matrix product: the triggered copy of a test sample differs from it only at the trigger's
    features T, so its logits are the sample's plus ``W[:, T] (value - x_T)``, a product over |T|
    features (12 of HAR's 561) instead of a second pass over all of them. Equal to the triggered
    samples' own logits up to float32 rounding (a different order of the same sums, as the
    batched products already are); tests/unit/test_torch_linear.py checks the rates against
    torch_trigger.TriggerRates. Used when every agent has the same trigger features and value."""

    def __init__(
        self,
        split: tuple[torch.Tensor, ...],
        trigger: tuple[torch.Tensor, float, torch.Tensor] | None,
    ) -> None:
        """``split``: the padded (xt, y, mask, count) of every row's test split (xt in
        :func:`layout`); ``trigger``: (feature positions, value, each row's target class)."""
        self.xt, self.y, self.mask, self.count = split
        self.trigger = trigger
        if trigger is not None:
            positions, value, targets = trigger
            self.delta = value - self.xt[:, positions, :]  # (rows, |T|, samples)
            self.keep = self.mask.bool() & (self.y != targets[:, None])
            self.keep_count = self.keep.sum(dim=1)
            self.rows = torch.nonzero(self.keep_count).flatten().tolist()

    def __call__(self, params: Stacked) -> tuple[list[float], list[float], dict[int, float]]:
        """(mean loss, accuracy) of every row on its test split, and row -> attack success rate
        for the rows with a test sample not of the target class."""
        z = logits(params, self.xt)
        loss, acc = _metrics(z, self.y, self.mask, self.count)
        rates: dict[int, float] = {}
        if self.trigger is not None and self.rows:
            positions, _, targets = self.trigger
            zt = z + torch.bmm(params["weight"][:, :, positions], self.delta)
            hits = ((predictions(zt) == targets[:, None]) & self.keep).sum(dim=1)
            values = (hits.double() / self.keep_count.double()).tolist()
            rates = {k: values[k] for k in self.rows}
        return loss.tolist(), acc.tolist(), rates
