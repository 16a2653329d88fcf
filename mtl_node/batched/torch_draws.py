"""Every agent's mini-batch indices, a block of rounds at a time, as one (rows, steps, batch) tensor.

A torch task walks its training split in epochs, each a permutation drawn from (seed, agent,
epoch) (``TorchTask._perm``); the batch of local step g is positions [g*B, (g+1)*B) of the
endless sequence of those permutations (``TorchTask._indices``). Asking every agent's task for
its round's batches costs ~30 us per agent and round in Python; here each agent's sequence is laid
out once per block of rounds from the task's own permutations (the same draws, so the same batches
as the per-agent engine), and a round's batches of all agents are one slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtl_node.tasks.torch_task import TorchTask

BLOCK = 64  # rounds laid out at once (memory: rows x BLOCK x steps x batch indices)


class Draws:
    def __init__(self, tasks: Sequence[TorchTask], steps: int, batch: int) -> None:
        self.tasks = list(tasks)
        self.steps, self.batch = steps, batch
        self._first = 0  # first round of the block held
        self._block: torch.Tensor | None = None  # (rows, BLOCK, steps, batch)

    def batches(self, round_: int) -> torch.Tensor:
        """(rows, steps, batch) long: every agent's local-step batches of ``round_``."""
        if self._block is None or not self._first <= round_ < self._first + BLOCK:
            self._lay_out(round_)
        assert self._block is not None
        return self._block[:, round_ - self._first]

    def _lay_out(self, first: int) -> None:
        per_round = self.steps * self.batch
        start, stop = (first - 1) * per_round, (first - 1 + BLOCK) * per_round
        rows = []
        for t in self.tasks:
            n = len(t.train)
            epochs = range(start // n, (stop - 1) // n + 1)
            seq = np.concatenate([t._perm(e) for e in epochs])
            offset = start - epochs[0] * n
            rows.append(seq[offset : offset + stop - start])
        block = torch.from_numpy(np.stack(rows)).reshape(len(rows), BLOCK, self.steps, self.batch)
        self._first, self._block = first, block.to(self.tasks[0].ctx.device)
