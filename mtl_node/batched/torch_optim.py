"""Every agent's own local optimizer, for rows of stacked parameters (the torch batched engine).

The per-agent engine gives each agent a ``torch.optim.SGD`` or ``torch.optim.Adam`` (defaults) that
keeps its state across rounds (mtl_node/tasks/torch_task.py). Here each row is one agent: SGD is
``p - lr * g`` per row; Adam keeps per-row first and second moments and a per-row step count, and
repeats torch.optim.Adam's single-tensor algorithm (what it runs on CPU) operation by operation, with
the same float64 scalars cast to float32 where its kernels cast them, so that given equal gradients
a row's update is bitwise the agent's own. An agent that does not train in a round (``train_share``)
is not stepped, so its step count stays where its own optimizer's would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


def _view(p: torch.Tensor) -> tuple[int, ...]:
    return (-1, *([1] * (p.dim() - 1)))


class RowOptimizers:
    """SGD or Adam for every row; ``step`` takes the rows that train and their gradients."""

    def __init__(self, kind: str, lrs: Sequence[float], like: Stacked) -> None:
        self.adam = kind == "adam"
        device = next(iter(like.values())).device
        self.lr = lrs[0] if len(set(lrs)) == 1 else None
        self.lr_rows = torch.tensor(list(lrs), dtype=torch.float32, device=device)
        self.lr64 = torch.tensor(list(lrs), dtype=torch.float64, device=device)
        self.exp_avg = {name: torch.zeros_like(t) for name, t in like.items()} if self.adam else {}
        self.exp_avg_sq = {name: torch.zeros_like(t) for name, t in like.items()} if self.adam else {}
        self.steps = [0] * len(lrs)

    def step(self, rows: Sequence[int], r: torch.Tensor, params: Stacked, g: Stacked) -> Stacked:
        """The stepped parameters of ``rows`` (``params`` and ``g`` hold those rows, in order)."""
        if self.adam:
            return self._adam(rows, r, params, g)
        if self.lr is not None:  # torch.optim.SGD: p.add_(g, alpha=-lr)
            return {name: p.add(g[name], alpha=-self.lr) for name, p in params.items()}
        lr = self.lr_rows[r]
        return {name: p.add(-lr.view(_view(p)) * g[name]) for name, p in params.items()}

    def _adam(self, rows: Sequence[int], r: torch.Tensor, params: Stacked, g: Stacked) -> Stacked:
        """One torch.optim.Adam step of every training row, each with its own moments and step
        count; the scalars are float64 as Adam's, cast like its kernels."""
        for k in rows:
            self.steps[k] += 1
        step = torch.tensor([self.steps[k] for k in rows], dtype=torch.float64, device=r.device)
        step_size = (self.lr64[r] / (1 - BETA1**step)).to(torch.float32)
        bc2_sqrt = ((1 - BETA2**step) ** 0.5).to(torch.float32)
        out = {}
        for name, p in params.items():
            view = _view(p)
            m = self.exp_avg[name][r].lerp(g[name], 1 - BETA1)
            v = torch.addcmul(self.exp_avg_sq[name][r] * BETA2, g[name], g[name], value=1 - BETA2)
            self.exp_avg[name][r], self.exp_avg_sq[name][r] = m, v
            denom = (v.sqrt() / bc2_sqrt.view(view)).add(EPS)
            out[name] = p + (-step_size).view(view) * (m / denom)
        return out
