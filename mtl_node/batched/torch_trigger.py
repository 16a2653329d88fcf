"""Every agent's backdoor attack success rate (``TorchTask.attack_success``) in one forward call.

A classification torch task reports, at every test evaluation, the share of its test samples not of
the trigger's target class that the model puts in the target class once triggered
(``mtl_node.tasks.trigger``). Asked of each agent's task, that is one forward pass per agent and
round (30 for HAR: a third of a batched round). Here each agent's triggered samples are made once,
by the agent's own ``Trigger.apply`` (the same inputs), padded into one (rows, samples, ...) tensor,
and a round's rates are one vmapped forward call and a masked count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mtl_node.tasks.torch_task import TorchTask

Stacked = dict[str, torch.Tensor]


class TriggerRates:
    def __init__(self, tasks: Sequence[TorchTask]) -> None:
        parts, targets = [], []
        self.rows: list[int] = []  # agents with a trigger and a test sample not of its target
        for k, t in enumerate(tasks):
            if t.trigger is None or len(t.test) == 0:
                continue
            keep = t.test.y != t.trigger.target
            if not bool(keep.any()):
                continue
            self.rows.append(k)
            parts.append(t.trigger.apply(t.test.x[keep]))
            targets.append(t.trigger.target)
        self.x: torch.Tensor | None = None
        if parts:
            longest = max(len(p) for p in parts)
            self.x = parts[0].new_zeros((len(parts), longest, *parts[0].shape[1:]))
            self.mask = torch.zeros((len(parts), longest), dtype=torch.bool)
            for j, p in enumerate(parts):
                self.x[j, : len(p)] = p
                self.mask[j, : len(p)] = True
            self.count = self.mask.sum(dim=1)
            self.target = torch.tensor(targets, dtype=torch.long, device=self.x.device)
        self.index = torch.tensor(self.rows, dtype=torch.long)

    def rates(
        self, outputs: Callable[[Stacked, torch.Tensor], torch.Tensor | None], theta: Stacked
    ) -> dict[int, float]:
        """Row -> attack success rate of its model in ``theta``, for the rows that have one;
        ``outputs(params, x)`` is the model's forward call vmapped over rows (None where the model
        is run one call per model: then no rates, and the caller asks each task)."""
        if self.x is None:
            return {}
        out = outputs({name: t[self.index] for name, t in theta.items()}, self.x)
        if out is None:
            return {}
        hits = ((out.argmax(dim=-1) == self.target[:, None]) & self.mask).sum(dim=1)
        values = (hits.double() / self.count.double()).tolist()
        return dict(zip(self.rows, values, strict=True))
