"""One torch task's model, loss and metrics for many agents at once (the torch batched engine).

Any task built on ``mtl_node.tasks.torch_task.TorchTask`` batches: HAR, digits, and custom
``module:factory`` tasks (mtl_node/tasks/plugin.py), as long as every agent of the run has the same
model (class, ``repr`` and parameter shapes: the engine calls one module with each agent's
parameters via ``torch.func.functional_call``), the same loss (checked on a probe batch), inputs of
one shape, and nothing random or stateful in the forward pass (no buffers such as batch-norm
statistics, no dropout). :func:`class_reason` and :func:`model_reason` say why not otherwise, and
the callers run the per-agent engine instead.

Two ways to evaluate the models, picked by the model:

- **vmap** (models without convolutions: HAR's linear layer, the custom example's MLP): ``grad`` of
  the loss vmapped over agents for the local steps, the loss vmapped over agents and neighbour slots
  for scoring: one call each, which is what makes small models fast.
- **one call per model** (models with parameters of more than two dimensions, i.e. convolutions such
  as digits' CNN): vmap over different weights turns each convolution into a grouped convolution,
  which torch's CPU kernels run about 3.6x slower than the same work as separate calls in
  channels-last layout (benchmarks/bench_torch_cnn.py; docs/performance.md). So each agent's local
  step is its own forward/backward (the very operations its own ``TorchTask`` runs, hence the same
  gradients bit for bit), and scoring runs each distinct pool model on the scoring batches of the
  rows that received it, stacked along the batch dimension, with its convolution weights in
  channels-last layout.

Test metrics: with the default cross-entropy and accuracy (vmap way) per-sample losses of every
agent's whole test split at once; otherwise each agent's own ``TorchTask.test_metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl_node.batched.torch_pool import Pool
from mtl_node.tasks.plugin import FactoryTask
from mtl_node.tasks.torch_task import TorchTask
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape) or (rows, slots, *shape)

# TorchTask methods the engine replaces with its own batched code: a task class that overrides one
# of them runs on the per-agent engine (overriding build_module, load_data, loss_fn or accuracy is
# the documented interface and batches).
REPLACED = (
    "adapt",
    "adapt_flipped",
    "_train",
    "losses",
    "losses_vectorized",
    "losses_one_by_one",
    "evaluate",
    "scoring_batch",
    "trains_in",
    "_round_batches",
    "_indices",  # the engine lays out batches from _perm (mtl_node/batched/torch_draws.py)
    "_perm",
    "attack_success",  # batched for vmapped models (mtl_node/batched/torch_trigger.py)
    "_make_optimizer",
    "_load",
)


# Samples per forward call when one model is scored on several rows' batches: bounds one call's
# activations (the digits CNN on 320 images: 32 MB after its first convolution). On the digits CNN
# calls of 128 and of 320 images cost the same CPU (benchmarks/bench_torch_cnn.py).
CALL_SAMPLES = 128


class Unbatchable(ValueError):
    """The torch batched engine cannot run these agents; ``reason`` says why (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the torch batched engine cannot run this: {reason}")
        self.reason = reason


def class_reason(cls: type) -> str | None:
    """Why tasks of class ``cls`` cannot be batched (before any is built), or None."""
    if not (isinstance(cls, type) and issubclass(cls, TorchTask)):
        return "not a torch task (the torch batched engine runs mtl_node.tasks.torch_task.TorchTask tasks)"
    for method in REPLACED:
        if getattr(cls, method) is not getattr(TorchTask, method):
            return f"{cls.__name__} overrides TorchTask.{method}"
    return None


def _signature(module: nn.Module) -> tuple[object, ...]:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return (type(module), repr(module), params)


def _shapes(x: torch.Tensor) -> tuple[object, ...]:
    return (tuple(x.shape[1:]), x.dtype)


def model_reason(tasks: Sequence[TorchTask]) -> str | None:
    """Why these built tasks cannot share one functional model, or None."""
    t0 = tasks[0]
    module = t0.module
    if set(t0.names) != {name for name, _ in module.named_parameters()}:
        return f"{t0.ctx.agent_id}: the model has buffers (e.g. batch-norm statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules()):
        return f"{t0.ctx.agent_id}: the model has dropout (a random draw per call)"
    want = _signature(module)
    data = (_shapes(t0.train.x), _shapes(t0.train.y))
    with torch.no_grad():
        probe_x, probe_y = t0.train.x[:4], t0.train.y[:4]
        out = functional_call(module, t0.init_model(), (probe_x,))
        ref = t0.loss_fn(out, probe_y)
        for t in tasks[1:]:
            a = t.ctx.agent_id
            if _signature(t.module) != want:
                return f"{a}: its model differs from {t0.ctx.agent_id}'s (class, layers or shapes)"
            if (_shapes(t.train.x), _shapes(t.train.y)) != data:
                return f"{a}: its inputs or targets differ in shape or dtype from {t0.ctx.agent_id}'s"
            if len(t.test) and (_shapes(t.test.x), _shapes(t.test.y)) != data:
                return f"{a}: its test split differs in shape or dtype from the training data"
            if not torch.equal(t.loss_fn(out, probe_y), ref):
                return f"{a}: its loss function differs from {t0.ctx.agent_id}'s"
    for t in tasks:
        if t.p.scoring == "resample" and len(t.train) < t.p.batch_size * t.p.local_steps:
            return f"{t.ctx.agent_id}: scoring: resample with fewer training samples than a round's batches"
    return None


def _default_metrics(t: TorchTask) -> bool:
    """Whether ``t`` scores test samples with the default cross-entropy and accuracy (per sample)."""
    if type(t).test_metrics is not TorchTask.test_metrics:
        return False
    if isinstance(t, FactoryTask):
        return t.definition.loss in (None, F.cross_entropy) and t.definition.classification
    return type(t).loss_fn is TorchTask.loss_fn and type(t).accuracy is TorchTask.accuracy


def _fast_layout(model: StateDict) -> StateDict:
    """4-D weights (2-D convolutions) in channels-last layout, which makes torch's CPU convolution
    and the max-pooling after it run in that layout: a quarter less CPU for the digits CNN
    (benchmarks/bench_torch_cnn.py). Only where the result is a score: the local steps keep the
    agents' own layout, so their gradients stay bitwise the agents' own."""
    return {
        n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for n, t in model.items()
    }


class BatchedModel:
    """The shared module and loss, evaluated with each agent's parameters (see the module doc)."""

    def __init__(self, tasks: Sequence[TorchTask]) -> None:
        reason = model_reason(tasks)
        if reason is not None:
            raise Unbatchable(reason)
        self.tasks = tasks
        t0 = tasks[0]
        self.module, self.loss_fn = t0.module, t0.loss_fn
        self.per_model = any(p.dim() > 2 for p in self.module.parameters())
        module, loss_fn = self.module, self.loss_fn

        def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(module, params, (x,)), y)

        def sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(out[None], y[None])

        def outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(module, params, (x,))

        self.loss_of = loss_of
        self._grads: Callable[..., Stacked] = vmap(grad(loss_of))
        self._row_loss: Callable[..., torch.Tensor] = vmap(loss_of)
        # For the padded test splits: (rows, samples, ...) outputs, one forward call per row, and
        # from them the (rows, samples) per-sample losses.
        self._outputs: Callable[..., torch.Tensor] = vmap(outputs)
        self._sample_losses: Callable[..., torch.Tensor] = vmap(sample_loss)
        self._loss_rows: Callable[..., torch.Tensor] = vmap(loss_fn)
        self.per_sample_tests = not self.per_model and all(_default_metrics(t) for t in tasks)
        if not self.per_model and not self._traceable(t0):
            self.per_model = True

    def _traceable(self, t0: TorchTask) -> bool:
        """Whether vmap can trace the loss (a custom loss calling ``.item()`` cannot)."""
        params = {name: t[None] for name, t in t0.init_model().items()}
        x, y = t0.train.x[None, :2], t0.train.y[None, :2]
        try:
            self._grads(params, x, y)
            with torch.no_grad():
                self._row_loss(params, x, y)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            log.info("%s: the loss cannot be vmapped (%s); one call per model", t0.name, exc)
            return False
        return True

    def grads(self, params: Stacked, x: torch.Tensor, y: torch.Tensor) -> Stacked:
        """Each row's gradient of its loss on its own batch ``(x[j], y[j])``."""
        self.module.train()
        if not self.per_model:
            return self._grads(params, x, y)
        names = list(params)
        rows: list[tuple[torch.Tensor, ...]] = []
        for j in range(x.shape[0]):
            p = {name: params[name][j].detach().requires_grad_() for name in names}
            loss = self.loss_of(p, x[j], y[j])
            rows.append(torch.autograd.grad(loss, [p[name] for name in names]))
        return {name: torch.stack([g[n] for g in rows]) for n, name in enumerate(names)}

    def outputs(self, params: Stacked, x: torch.Tensor) -> torch.Tensor | None:
        """(rows, samples, ...) outputs of row j's model on ``x[j]`` in one vmapped call; None for
        models scored one call per model (convolutional: ``per_model``)."""
        if self.per_model:
            return None
        self.module.eval()
        with torch.no_grad():
            return self._outputs(params, x)

    def row_losses(self, params: Stacked, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(rows,): row j's model on ``(x[j], y[j])``."""
        self.module.eval()
        with torch.no_grad():
            if not self.per_model:
                return self._row_loss(params, x, y)
            return torch.stack(
                [self.loss_of({n: t[j] for n, t in params.items()}, x[j], y[j]) for j in range(x.shape[0])]
            )

    def pool_losses(self, pool: Pool, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(len(rows), slots): the loss of what each slot of ``rows`` received, on that row's batch
        (x, y: (len(rows), batch, ...)); each distinct pool model in one call over the batches of
        every row that received it (the way for convolutional models, see the module doc)."""
        src = pool.src[rows]
        out = torch.empty(src.shape, dtype=torch.float32, device=x.device)
        users: dict[int, list[tuple[int, int]]] = {}
        for j, line in enumerate(src.tolist()):
            for s, m in enumerate(line):
                users.setdefault(m, []).append((j, s))
        for m, pairs in users.items():
            on = torch.tensor([j for j, _ in pairs], dtype=torch.long, device=x.device)
            at = torch.tensor([s for _, s in pairs], dtype=torch.long, device=x.device)
            out[on, at] = self.losses_on({n: t[m] for n, t in pool.models.items()}, x[on], y[on])
        return out

    def losses_on(self, model: StateDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(rows,): one model on the batches ``(x[j], y[j])`` of several rows, a few rows a call."""
        self.module.eval()
        model = _fast_layout(model)
        step = max(1, CALL_SAMPLES // max(1, x.shape[1]))
        parts = []
        with torch.no_grad():
            for j in range(0, len(x), step):
                xs, ys = x[j : j + step], y[j : j + step]
                out = functional_call(self.module, model, (xs.flatten(0, 1),)).unflatten(0, xs.shape[:2])
                try:
                    parts.append(self._loss_rows(out, ys))
                except (RuntimeError, NotImplementedError, ValueError):
                    parts.append(torch.stack([self.loss_fn(out[k], ys[k]) for k in range(len(ys))]))
        return torch.cat(parts)

    def test_metrics(
        self, theta: Stacked, rows: Sequence[int], split: tuple[torch.Tensor, ...] | None
    ) -> tuple[list[float], list[float | None]]:
        """(mean loss, accuracy) of each row's model on its whole test split. ``split`` is the
        padded (x, y, mask, count) of every agent's test split, for the per-sample way."""
        if not (self.per_sample_tests and split is not None):
            pairs = [self.tasks[k].test_metrics({n: t[k] for n, t in theta.items()}) for k in rows]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        x, y, mask, count = split
        params = theta
        if len(rows) < len(x):  # else every row: no copies of the padded test splits
            r = torch.tensor(list(rows), dtype=torch.long, device=x.device)
            params = {n: t[r] for n, t in theta.items()}
            x, y, mask, count = x[r], y[r], mask[r], count[r]
        self.module.eval()
        with torch.no_grad():
            out = self._outputs(params, x)
            losses = self._sample_losses(out.flatten(0, 1), y.flatten()).view(out.shape[:2]).double()
            loss = (losses * mask).sum(dim=1) / count
            hit = (out.argmax(dim=-1) == y).double()
            acc = (hit * mask).sum(dim=1) / count
        return loss.tolist(), acc.tolist()
