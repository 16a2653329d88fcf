"""Shared base of tasks whose model is a torch ``nn.Module`` (HAR, digits, custom tasks).

What it settles once for every such task:

- **Local steps.** A round's adaptation is ``local_steps`` optimizer steps (Adam by default; SGD on
  request) on mini-batches of the agent's training split. The optimizer keeps its state across
  rounds, like the reference code's per-agent optimizer whose network weights are overwritten by
  the combination step each round. With ``train_share`` below 1 an agent trains only in that share
  of rounds (drawn from (seed, agent id, round)) and otherwise passes its model on unchanged, while
  still drawing the round's batch and scoring on it: the reference code's way of giving some agents
  less data, which is what lets them gain from better-trained neighbours.
- **Batches.** The training split is walked in epochs, each a fresh permutation drawn from
  (seed, agent id, epoch), like a shuffling DataLoader but deterministic: a daemon and the
  in-process engine see the same batches.
- **Scoring.** A neighbour's model is scored by its loss on the batch(es) this agent has just
  trained on in the same round, as the reference code does (it evaluates every received network on
  the agent's current batch). That is the agent's own *training* data, which the paper's rule asks
  for (loss on the agent's data); the held-out test split is never used for decisions, so test
  metrics stay an unbiased measure. All received models are evaluated together: parameters are
  stacked and ``torch.func.functional_call`` is vmapped over them, one batched call instead of one
  forward pass per neighbour. ``vectorized_scoring: false`` switches to the one-by-one loop (and a
  loss function vmap cannot trace falls back to it automatically).
  ``scoring: resample`` scores on as many other samples of the training split instead, drawn per
  round, which removes the edge the agent's own model has on the batch it has just stepped on.
- **Test metrics.** Every ``eval_every`` rounds the combined model is evaluated on the agent's own
  held-out test split (test_loss, test_accuracy, and for classification the backdoor's
  attack_success under ``trigger``: mtl_node.tasks.trigger); other rounds leave them empty.
- **Initial weights.** ``init: shared`` (default) draws the initial weights from the run seed only,
  so every agent starts from the same network (as in federated and distributed training, where a
  common initialisation is what makes weight averaging meaningful); ``init: agent`` draws them per
  agent. Either way the draw happens under ``torch.random.fork_rng``, so no global RNG is touched.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from mtl_node import seeding
from mtl_node.tasks.base import Metrics, Task, TaskContext
from mtl_node.tasks.trigger import Trigger, TriggerParams
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

EVAL_CHUNK = 1024  # test samples per forward pass
# Counter that keeps the train/skip draws apart from the per-epoch permutations (same purpose).
SKIP_STREAM = 2**32 - 1
SCORE_STREAM = 2**32 - 2


class TorchTaskParams(BaseModel):
    """Training knobs shared by every torch task (``learning_rate`` in a topology sets ``lr``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-3, gt=0.0, description="learning rate of the local optimizer")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="local optimizer (adam as the paper)")
    batch_size: int = Field(32, ge=1, le=1 << 16, description="samples per local step")
    local_steps: int = Field(1, ge=1, le=10_000, description="optimizer steps per round")
    init: Literal["shared", "agent"] = Field(
        "shared", description="initial weights: shared by all agents (from the seed) or per agent"
    )
    vectorized_scoring: bool = Field(
        True, description="score all received models in one vmapped call (false: one by one)"
    )
    eval_every: int = Field(1, ge=1, description="test metrics every N rounds (empty in between)")
    train_share: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of rounds the agent trains in (others: psi = theta, batch still scored); "
        "below 1 models an agent with less data, as the reference code's uneven agents",
    )
    scoring: Literal["batch", "resample"] = Field(
        "batch",
        description="data that scores models: the round's training batch (reference code) or "
        "another batch drawn from the training split (without the just-trained-on edge)",
    )
    trigger: TriggerParams | None = Field(
        default_factory=TriggerParams,
        description="classification only: the backdoor trigger whose attack_success the test "
        "metrics report (target, features, value); null: no attack_success",
    )


@dataclass(frozen=True)
class Split:
    """Samples and targets of one split, on the task's device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def as_split(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, device: torch.device) -> Split:
    tx = torch.as_tensor(x)
    ty = torch.as_tensor(y)
    if tx.is_floating_point():
        tx = tx.to(torch.float32)
    return Split(tx.to(device), ty.to(device))


class TorchTask(Task):
    """A task defined by a module, a train split and a test split; see the module docstring."""

    Params = TorchTaskParams
    classifies: ClassVar[bool] = True  # targets are class indices (adapt_flipped, test accuracy)

    def __init__(self, ctx: TaskContext, params: BaseModel) -> None:
        super().__init__(ctx, params)
        assert isinstance(params, TorchTaskParams)
        self.p: TorchTaskParams = params
        self.train, self.test = self.load_data()
        if len(self.train) == 0:
            raise ValueError(f"{self.name}: agent {ctx.agent_id} has no training samples")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed())
            module = self.build_module()
        self.module: nn.Module = module.to(ctx.device)
        self._live = dict(self.module.state_dict())  # aliases of the module's tensors
        self.names = list(self._live)
        # The initial weights, kept: the live module's tensors change with every adapt, and
        # init_model() is also asked later (label-flip starts its own trajectory from it).
        self._init = {name: t.detach().clone() for name, t in self._live.items()}
        self.optimizer = self._make_optimizer()
        self._flip_optimizer: torch.optim.Optimizer | None = None  # label-flip's own trajectory
        self._backdoor_optimizer: torch.optim.Optimizer | None = None  # the backdoor attack's
        self.trigger: Trigger | None = self._resolve_trigger()
        self._perms: dict[int, np.ndarray] = {}
        self._batches: tuple[int, list[torch.Tensor]] | None = None
        self._scoring: tuple[int, torch.Tensor] | None = None
        self._vmap_ok = True

    # -- what subclasses provide -----------------------------------------------------------------

    @abstractmethod
    def build_module(self) -> nn.Module:
        """A freshly initialised network (called under a seeded, forked RNG)."""

    @abstractmethod
    def load_data(self) -> tuple[Split, Split]:
        """(train, test) splits of this agent, on ``self.ctx.device``."""

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; must be traceable by vmap for vectorized scoring."""
        return F.cross_entropy(outputs, targets)

    def accuracy(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Share of correct predictions; None for tasks that are not classification."""
        return (outputs.argmax(dim=-1) == targets).float().mean()

    # -- Task interface --------------------------------------------------------------------------

    def init_model(self) -> StateDict:
        return {name: t.clone() for name, t in self._init.items()}

    def adapt(self, model: StateDict, round_: int) -> StateDict:
        return self._train(model, round_, self.optimizer, flip=False)

    def adapt_flipped(self, model: StateDict, round_: int) -> StateDict:
        """``adapt`` on the same batches with every label y replaced by C - 1 - y (C = the model's
        output width), for the label-flip attack. Its trajectory has its own optimizer (its own Adam
        moments), so it never disturbs the agent's honest training."""
        if not self.classifies:
            raise ValueError(f"{self.name}: adapt_flipped needs a classification task")
        if self._flip_optimizer is None or round_ == 1:  # round 1: the trajectory starts (again)
            self._flip_optimizer = self._make_optimizer()
        return self._train(model, round_, self._flip_optimizer, flip=True)

    def adapt_backdoor(self, model: StateDict, round_: int, share: float) -> StateDict:
        """``adapt`` on the same batches with the first ceil(share * n) samples of each batch
        triggered and relabelled to the trigger's target (Trigger.poison), for the backdoor attack;
        like ``adapt_flipped`` its trajectory has an optimizer of its own (a fresh one at round 1)."""
        if self.trigger is None:
            raise ValueError(f"{self.name}: adapt_backdoor needs a classification task with a trigger")
        if self._backdoor_optimizer is None or round_ == 1:
            self._backdoor_optimizer = self._make_optimizer()
        return self._train(model, round_, self._backdoor_optimizer, flip=False, poison=share)

    def attack_success(self, model: StateDict) -> float | None:
        """The trigger's attack success rate of ``model`` on the test split (None: no trigger)."""
        if self.trigger is None or len(self.test) == 0:
            return None
        self.module.eval()
        return self.trigger.success(
            lambda x: functional_call(self.module, model, (x,)), self.test.x, self.test.y
        )

    @contextmanager
    def detached(self) -> Iterator[None]:
        """Training inside leaves the optimizer's state (Adam moments, step counts) as it was."""
        saved = copy.deepcopy(self.optimizer.state_dict())
        try:
            yield
        finally:
            self.optimizer.load_state_dict(saved)

    def _train(
        self, model: StateDict, round_: int, optimizer: torch.optim.Optimizer, flip: bool, poison: float = 0.0
    ) -> StateDict:
        if not self.trains_in(round_):
            return {name: t.detach().clone() for name, t in model.items()}
        self._load(model)
        self.module.train()
        for idx in self._round_batches(round_):
            x, y = self.train.x[idx], self.train.y[idx]
            if poison > 0.0 and self.trigger is not None:
                x, y = self.trigger.poison(x, y, poison)
            optimizer.zero_grad(set_to_none=True)
            outputs = self.module(x)
            if flip:
                y = outputs.shape[-1] - 1 - y
            loss = self.loss_fn(outputs, y)
            loss.backward()
            optimizer.step()
        return {name: t.detach().clone() for name, t in self._live.items()}

    def losses(self, models: Sequence[StateDict], round_: int) -> list[float]:
        x, y = self.scoring_batch(round_)
        self.module.eval()
        with torch.no_grad():
            if self.p.vectorized_scoring and self._vmap_ok and len(models) > 1:
                try:
                    values = self.losses_vectorized(models, x, y)
                except (RuntimeError, NotImplementedError, ValueError) as exc:
                    # e.g. a custom loss calling .item(): correct but not traceable by vmap.
                    log.warning("%s: vectorized scoring unavailable (%s); scoring one by one", self.name, exc)
                    self._vmap_ok = False
                    values = self.losses_one_by_one(models, x, y)
            else:
                values = self.losses_one_by_one(models, x, y)
        return [float(v) for v in values.tolist()]

    def evaluate(self, model: StateDict, round_: int) -> Metrics:
        x, y = self.scoring_batch(round_)
        self.module.eval()
        with torch.no_grad():
            loss = float(self.loss_fn(functional_call(self.module, model, (x,)), y))
            if round_ % self.p.eval_every or len(self.test) == 0:
                return Metrics(loss=loss)
            test_loss, test_acc = self.test_metrics(model)
        return Metrics(
            loss=loss, test_loss=test_loss, test_accuracy=test_acc, attack_success=self.attack_success(model)
        )

    def trains_in(self, round_: int) -> bool:
        """Whether the agent takes its local steps in ``round_`` (see ``train_share``)."""
        if self.p.train_share >= 1.0:
            return True
        rng = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.DATA, SKIP_STREAM, round_)
        return bool(rng.random() < self.p.train_share)

    # -- scoring ---------------------------------------------------------------------------------

    def losses_vectorized(
        self, models: Sequence[StateDict], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Loss of every model on (x, y) in one call: vmap over the stacked parameters."""
        stacked = {name: torch.stack([m[name] for m in models]) for name in self.names}

        def one(state: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_fn(functional_call(self.module, state, (x,)), y)

        return torch.vmap(one)(stacked)

    def losses_one_by_one(
        self, models: Sequence[StateDict], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return torch.stack([self.loss_fn(functional_call(self.module, m, (x,)), y) for m in models])

    def scoring_batch(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples that score models in ``round_``: by default those the agent trained on in
        the round (all its local steps' batches); with ``scoring: resample`` as many others drawn
        from its training split, so its own fresh step gives it no edge."""
        if self.p.scoring == "resample":
            if self._scoring is None or self._scoring[0] != round_:
                n = len(self.train)
                size = min(self.p.batch_size * self.p.local_steps, n)
                rng = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.DATA, SCORE_STREAM, round_)
                used = torch.cat(self._round_batches(round_)).cpu().numpy()
                free = np.setdiff1d(np.arange(n), used)
                pool = free if len(free) >= size else np.arange(n)
                pick = torch.from_numpy(rng.choice(pool, size=size, replace=False)).to(self.ctx.device)
                self._scoring = (round_, pick)
            idx = self._scoring[1]
        else:
            idx = torch.cat(self._round_batches(round_))
        return self.train.x[idx], self.train.y[idx]

    def test_metrics(self, model: StateDict) -> tuple[float, float | None]:
        """(mean loss, accuracy or None) of ``model`` on the whole test split, in chunks."""
        total_loss = 0.0
        correct: float | None = 0.0
        n = len(self.test)
        with torch.no_grad():
            for start in range(0, n, EVAL_CHUNK):
                x = self.test.x[start : start + EVAL_CHUNK]
                y = self.test.y[start : start + EVAL_CHUNK]
                out = functional_call(self.module, model, (x,))
                total_loss += float(self.loss_fn(out, y)) * len(y)
                acc = self.accuracy(out, y)
                correct = None if acc is None or correct is None else correct + float(acc) * len(y)
        return total_loss / n, None if correct is None else correct / n

    # -- crash-only state: the optimizer's moments and step counts -------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sd = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in sd["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        meta = {"param_groups": sd["param_groups"], "scalars": scalars, "vmap_ok": self._vmap_ok}
        return meta, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        entries: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            _, index, key = name.split("/", 2)
            entries.setdefault(int(index), {})[key] = value
        for index, values in meta.get("scalars", {}).items():
            entries.setdefault(int(index), {}).update(values)
        if "param_groups" in meta:
            self.optimizer.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})
        self._vmap_ok = bool(meta.get("vmap_ok", True))

    # -- internals -------------------------------------------------------------------------------

    def _resolve_trigger(self) -> Trigger | None:
        """The task's trigger, checked against its samples and its model's outputs (classes)."""
        if not self.classifies or self.p.trigger is None:
            return None
        sample = self.train.x[:1]
        self.module.eval()  # a forward pass that updates no BatchNorm statistics
        with torch.no_grad():
            classes = int(functional_call(self.module, self._init, (sample,)).shape[-1])
        return Trigger.resolve(self.p.trigger, tuple(sample.shape[1:]), classes, self.ctx.device)

    def _init_seed(self) -> int:
        key = self.ctx.agent_id if self.p.init == "agent" else f"shared-init:{self.name}"
        return int(seeding.generator(self.ctx.seed, key, seeding.INIT).integers(2**62))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.module.parameters())
        if self.p.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.p.lr)
        return torch.optim.Adam(params, lr=self.p.lr)

    def _load(self, model: StateDict) -> None:
        with torch.no_grad():
            for name, t in self._live.items():
                t.copy_(model[name])

    def _round_batches(self, round_: int) -> list[torch.Tensor]:
        """Index tensors of the ``local_steps`` batches of ``round_`` (cached for the round)."""
        if self._batches is not None and self._batches[0] == round_:
            return self._batches[1]
        steps = self.p.local_steps
        batches = [self._indices((round_ - 1) * steps + s) for s in range(steps)]
        self._batches = (round_, batches)
        return batches

    def _indices(self, step: int) -> torch.Tensor:
        """Positions [step*B, (step+1)*B) of the endless sequence of per-epoch permutations."""
        n = len(self.train)
        b = self.p.batch_size
        start = max(step, 0) * b
        parts = []
        pos = start
        while pos < start + b:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + b - pos)
            parts.append(self._perm(epoch)[offset : offset + take])
            pos += take
        idx = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return torch.from_numpy(idx).to(self.ctx.device)

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = seeding.generator(self.ctx.seed, self.ctx.agent_id, seeding.DATA, epoch).permutation(
                len(self.train)
            )
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = perm
        return perm
