"""Every agent's backdoor attack success rate (``TorchTask.attack_success``) in one forward call.

A classification torch task reports, at every test evaluation, the share of its test samples not of
the trigger's target class that the model puts in the target class once triggered
(``mtl_node.tasks.trigger``). Asked of each agent's task, that is one forward pass per agent and
round (30 for HAR: a third of a batched round). Here each agent's triggered samples are made once,
by the agent's own ``Trigger.apply`` (the same inputs), padded into one (rows, samples, ...) tensor,
and a round's rates are one batched forward call (torch_model.BatchedModel.predict) and a masked
count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from mtl_node.tasks.torch_task import TorchTask

Stacked = dict[str, torch.Tensor]


class TriggerRates:
    def __init__(
        self, tasks: Sequence[TorchTask], layout: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    ) -> None:
        """``layout``: how the predicting model wants the fixed (rows, samples, ...) inputs."""
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
            self.x = layout(self.x)
            self.target = torch.tensor(targets, dtype=torch.long, device=self.x.device)
        self.index = torch.tensor(self.rows, dtype=torch.long)

    def rates(
        self, predict: Callable[[Stacked, torch.Tensor], torch.Tensor | None], theta: Stacked
    ) -> dict[int, float]:
        """Row -> attack success rate of its model in ``theta``, for the rows that have one;
        ``predict(params, x)`` is the model's (rows, samples) classes in one call over rows (None
        where the model is run one call per model: then no rates, and the caller asks each task)."""
        if self.x is None:
            return {}
        params = theta if len(self.rows) == len(next(iter(theta.values()))) else None
        if params is None:
            params = {name: t[self.index] for name, t in theta.items()}
        classes = predict(params, self.x)
        if classes is None:
            return {}
        hits = ((classes == self.target[:, None]) & self.mask).sum(dim=1)
        values = (hits.double() / self.count.double()).tolist()
        return dict(zip(self.rows, values, strict=True))


Shared = tuple[torch.Tensor, float, torch.Tensor]


def shared_trigger(tasks: Sequence[TorchTask]) -> Shared | Literal[False] | None:
    """(feature positions, value, every row's target class) when every task has a trigger with
    the same positions and value; None when no task has one; False otherwise."""
    triggers = [t.trigger for t in tasks]
    if all(tr is None for tr in triggers):
        return None
    first = triggers[0]
    if first is None or any(
        tr is None or tr.value != first.value or not torch.equal(tr.positions, first.positions)
        for tr in triggers
    ):
        return False
    targets = torch.tensor([tr.target for tr in triggers if tr is not None], device=first.positions.device)
    return first.positions, first.value, targets
