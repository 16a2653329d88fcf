"""Case study 1 of the paper: target localization by streaming LMS regression.

Agent k sits at ``position`` x_k in [0,3]^2 and estimates the location w* of its ``target``. Each
round it observes a noisy unit direction u (towards the target) and a noisy range
d = u^T (w* - x_k) + v. Its loss for a model w is (d - u^T (w - x_k))^2 and its adaptation is the
LMS step of the reference code, psi = w + mu (q - w) with q = x_k + d u.

Scoring a neighbour's model uses this agent's own position and measurement (the reference code
used the neighbour's position there, a slip the paper does not have).

The stream is generated in blocks of ``BLOCK`` rounds from a generator keyed by (seed, agent id,
block), so the batched engine and a daemon draw identical samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtl_node import seeding
from mtl_node.kernels import target_localization as tl
from mtl_node.tasks.base import TASKS, Metrics, Task, TaskContext
from mtl_node.wire import StateDict

BLOCK = 512
DEFAULT_TARGETS = ((10.0, 10.0), (10.0, 20.0), (20.0, 10.0), (20.0, 20.0))
Point = tuple[float, float]


class TargetLocalizationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    position: Point | None = Field(None, description="agent position; default drawn in [0,3]^2")
    target: Point | None = Field(
        None, description="target location; default one of DEFAULT_TARGETS chosen by agent id"
    )
    mu: float = Field(0.1, gt=0.0, le=1.0, description="LMS step size")
    noise_std: float | None = Field(
        None, ge=0.0, description="std of the range noise; default drawn in [0.1, 0.2]"
    )
    direction_noise_std: float | None = Field(
        None, ge=0.0, description="std of the direction noise; default drawn in [0.01, 0.02]"
    )
    init: Point | None = Field(None, description="initial estimate; default drawn in [0,1]^2")
    test_samples: int = Field(100, ge=1, le=100_000, description="held-out samples for test_loss")


class Resolved:
    """Parameters with every default drawn: what the agent actually runs with."""

    def __init__(self, ctx: TaskContext, p: TargetLocalizationParams) -> None:
        rng = seeding.generator(ctx.seed, ctx.agent_id, seeding.PARAMS)
        draws = rng.uniform(size=8)
        self.position = np.array(p.position if p.position else 3.0 * draws[0:2], dtype=np.float64)
        if p.target is not None:
            self.target = np.array(p.target, dtype=np.float64)
        else:
            self.target = np.array(DEFAULT_TARGETS[int(draws[2] * 4) % 4], dtype=np.float64)
        self.mu = p.mu
        self.noise_std = p.noise_std if p.noise_std is not None else 0.1 + 0.1 * draws[3]
        self.direction_noise_std = (
            p.direction_noise_std if p.direction_noise_std is not None else 0.01 + 0.01 * draws[4]
        )
        self.init = np.array(p.init if p.init else draws[5:7], dtype=np.float64)
        self.test_samples = p.test_samples


def sample_block(
    seed: int,
    agent_id: str,
    block: int,
    r: Resolved,
    size: int = BLOCK,
    purpose: int = seeding.DATA,
) -> tuple[np.ndarray, np.ndarray]:
    """(u, d) for ``size`` rounds: u has shape (size, 2), d shape (size,)."""
    rng = seeding.generator(seed, agent_id, purpose, block)
    direction = r.target - r.position
    unit = direction / np.linalg.norm(direction)
    u = unit + r.direction_noise_std * rng.standard_normal((size, 2))
    d = u @ direction + r.noise_std * rng.standard_normal(size)
    return u, d


@TASKS.register("target-localization")
class TargetLocalization(Task):
    name = "target-localization"
    Params = TargetLocalizationParams

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        assert isinstance(params, TargetLocalizationParams)
        self.r = Resolved(ctx, params)
        self._x = torch.tensor(self.r.position, dtype=torch.float64, device=ctx.device)
        tu, td = sample_block(
            ctx.seed, ctx.agent_id, 0, self.r, size=self.r.test_samples, purpose=seeding.TEST
        )
        self._test_u = torch.tensor(tu, device=ctx.device)
        self._test_d = torch.tensor(td, device=ctx.device)
        self._block = self._make_block_cache()

    def _make_block_cache(self):  # type: ignore[no-untyped-def]
        @lru_cache(maxsize=2)
        def block(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            u, d = sample_block(self.ctx.seed, self.ctx.agent_id, b, self.r)
            return torch.tensor(u, device=self.ctx.device), torch.tensor(d, device=self.ctx.device)

        return block

    def sample(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, d = self._block(round_ // BLOCK)
        return u[round_ % BLOCK], d[round_ % BLOCK]

    def init_model(self) -> StateDict:
        return {"w": torch.tensor(self.r.init, dtype=torch.float64, device=self.ctx.device)}

    def adapt(self, model: StateDict, round_: int) -> StateDict:
        u, d = self.sample(round_)
        return {"w": tl.adapt(model["w"], self._x, self.r.mu, u, d)}

    def losses(self, models: Sequence[StateDict], round_: int) -> list[float]:
        u, d = self.sample(round_)
        w = torch.stack([m["w"] for m in models])  # (n, 2)
        return [float(v) for v in (tl.residual(w, self._x, u, d) ** 2).tolist()]

    def evaluate(self, model: StateDict, round_: int) -> Metrics:
        loss = self.losses([model], round_)[0]
        residual = tl.residual(model["w"], self._x, self._test_u, self._test_d)
        return Metrics(loss=loss, test_loss=float(tl.mean_square(residual.cpu().numpy())))
