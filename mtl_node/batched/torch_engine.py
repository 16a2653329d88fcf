"""The vectorized in-process engine for torch tasks (HAR): every agent's round as stacked tensors.

The per-agent engine steps each agent in its own asyncio task with its own small torch calls; for a
linear classifier nearly all of that time is interpreter and dispatch overhead. Here every agent's
model is one row of stacked parameters (``name -> (agents, *shape)``) and a round is:

- **local steps**: ``torch.func.grad`` of the task's loss, vmapped over agents, on each agent's own
  batch (the batches come from each agent's own task object, ``TorchTask._round_batches``, so the
  sampling order, ``train_share`` draws and ``scoring: resample`` picks are the per-agent engine's
  own); SGD ``p - lr * g`` per row, or Adam with per-row moments and step counts (torch.optim.Adam's
  single-tensor algorithm, its defaults);
- **exchange**: ``received[k, s]`` = the model agent k gets from its s-th neighbour (slot 0 = itself);
  a Byzantine sender's model is crafted by its own attack object (``attacks/``, i.e. the kernels)
  for each receiver, exactly as the attack node would serve it;
- **scoring**: the loss of every received model on the receiver's scoring batch, vmapped over agents
  and over slots (and squared distances to the previous model for the distance rule);
- **aggregation**: each agent's own rule object (``mtl_node.aggregation``, which calls the kernels in
  ``mtl_node.kernels`` with one row): cheap per row, and the decisions and reasons are the agents'
  own by construction;
- **combination**: ``mtl_node.kernels.combine.accumulate`` over the slots of all rows at once
  (float32 weights, slot order, absent or zero-weight slots adding an exact 0: the same sum the
  agent's ``weighted_sum`` does);
- **evaluation**: the loss of the combined models on the scoring batches (vmapped); test metrics
  every ``eval_every`` rounds through each agent's own ``TorchTask.test_metrics``.

Equality with the per-agent engine is to float32 rounding (batched matmuls and gradients sum in a
different order; tests/unit/test_torch_batched.py checks 1e-5 relative). It runs HAR with SGD or
Adam, every rule, and the attacks in ``ATTACKS``; what it cannot run (:func:`unsupported_reason`:
digits, custom ``module:factory`` tasks, the other attacks, cuda, state directories, agents with
different optimizers or batch sizes) the callers run on the per-agent engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from mtl_node import wire
from mtl_node.attack_api import Attack, AttackView, Withhold, make_attack
from mtl_node.batched import torch_pool
from mtl_node.batched.torch_draws import Draws
from mtl_node.batched.torch_pool import Pool, PoolScorer, finite_rows
from mtl_node.batched.torch_rules import RowRules
from mtl_node.batched.torch_trigger import TriggerRates
from mtl_node.combine import unflatten
from mtl_node.config import NodeConfig
from mtl_node.core import names
from mtl_node.core.errors import WireError
from mtl_node.recorder import RoundRecord
from mtl_node.tasks import Metrics, Task, make_task
from mtl_node.tasks.base import TASKS, parse_params
from mtl_node.tasks.torch_task import TorchTask, TorchTaskParams
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

# digits is left out on purpose: its CNN with Adam drifts from the per-agent engine beyond float32
# rounding within ten rounds (docs/performance.md), and batched it was no faster on this CPU.
TASKS_BATCHED = ("har",)
# Every rule: each agent's own rule object aggregates its row, given the losses, distances and
# flattened models it asks for (needs_loss / needs_distance / needs_models).
RULES = names.RULE_NAMES
# Attacks whose ``craft`` depends only on (seed, attacker, round, requester, honest model, last
# round's fetched pool): what the attack node serves does not depend on request order.
ATTACKS = ("constant", "gaussian", "small-perturbation", "scaled", "sign-flip", "ipm", "alie", "mimic")
POOL_ATTACKS = ("ipm", "alie", "mimic")
# torch's intra-op threads while the engine runs (restored after). One: a round is a few dozen
# operations of well under a millisecond each (HAR: 30 x 10 samples x 561 features), too small for
# a thread team to pay for its fork/join; and on a shared 2-core machine a team of two waits for its
# descheduled member at every operation, which made the engine 4-6x slower than with one thread
# (docs/performance.md, "Threads"). Larger models (a CNN on big batches) may gain from more:
# run_torch_batched(threads=None) keeps the caller's setting.
THREADS = 1

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape) or (rows, slots, *shape)


def unsupported_reason(configs: Sequence[NodeConfig]) -> str | None:
    """Why the torch batched engine cannot run these configs, or None when it can."""
    if not configs:
        return "no agents"
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        return "agent ids are not unique"
    if len({c.rounds for c in configs}) != 1:
        return "agents run different numbers of rounds"
    known = set(ids)
    params: list[TorchTaskParams] = []
    for c in configs:
        if c.task not in TASKS_BATCHED:
            return f"{c.id}: task {c.task!r} (the torch batched engine runs only {', '.join(TASKS_BATCHED)})"
        if c.device != "cpu":
            return f"{c.id}: device {c.device!r} (only cpu)"
        if c.state_path is not None:
            return f"{c.id}: a state directory (crash-only state is per-agent)"
        if c.rule not in RULES:
            return f"{c.id}: rule {c.rule!r} (the torch batched engine runs {', '.join(RULES)})"
        missing = [n for n in c.neighbors if n not in known]
        if missing:
            return f"{c.id}: neighbour {missing[0]!r} is not an agent of this run"
        try:
            p = parse_params(TASKS.get(c.task), c.task_params)
        except Exception as exc:  # the per-agent engine reports invalid parameters
            return f"{c.id}: {exc}"
        assert isinstance(p, TorchTaskParams)
        params.append(p)
        if c.attack is not None:
            if c.attack not in ATTACKS:
                return f"{c.id}: attack {c.attack!r} (the torch batched engine runs {', '.join(ATTACKS)})"
            try:
                make_attack(c.attack, c.id, c.seed, c.attack_params, task=c.task)
            except Exception as exc:
                return f"{c.id}: attack {c.attack!r}: {exc}"
    optimizers = {p.optimizer for p in params}
    if len(optimizers) != 1:
        return f"agents use different optimizers ({sorted(optimizers)})"
    sizes = {(p.batch_size, p.local_steps) for p in params}
    if len(sizes) != 1:
        return f"agents differ in batch_size/local_steps ({sorted(sizes)})"
    return None


class _View(AttackView):
    """What attack node k sees: its own task and the neighbour models it fetched per round."""

    def __init__(self, engine: _Engine, k: int) -> None:
        self.engine, self.k = engine, k

    @property
    def task(self) -> Task:
        return self.engine.tasks[self.k]

    def neighbors(self, round_: int) -> Mapping[str, StateDict]:
        return self.engine.fetched[self.k].get(round_, {})

    def model_of(self, agent_id: str, round_: int) -> StateDict | None:
        return None  # no supported attack asks for the requester's model

    def own(self, round_: int) -> StateDict | None:
        return None  # no supported attack replays its own history


def _row(stacked: Mapping[str, torch.Tensor], k: int) -> StateDict:
    return {name: t[k] for name, t in stacked.items()}


def _padded(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, longest, ...) zero-padded stack of ``parts``, and the (rows, longest) float64 mask."""
    longest = max(len(p) for p in parts)
    out = parts[0].new_zeros((len(parts), longest, *parts[0].shape[1:]))
    mask = torch.zeros((len(parts), longest), dtype=torch.float64)
    for k, p in enumerate(parts):
        out[k, : len(p)] = p
        mask[k, : len(p)] = 1.0
    return out, mask


def _rows(mask: np.ndarray) -> torch.Tensor | None:
    """The indices of the True rows, or None when there are none."""
    rows = np.flatnonzero(mask)
    return torch.from_numpy(rows) if len(rows) else None


def _reason(exc: Exception) -> str:
    return f"{getattr(exc, 'reason', 'error')}: {exc}"


class _Engine:
    def __init__(self, configs: Sequence[NodeConfig]) -> None:
        reason = unsupported_reason(configs)
        if reason is not None:
            raise ValueError(f"the torch batched engine cannot run this: {reason}")
        self.configs = list(configs)
        self.n = n = len(configs)
        self.ids = [c.id for c in configs]
        index = {a: k for k, a in enumerate(self.ids)}
        tasks = [make_task(c.task, c.id, c.seed, c.task_params, c.device) for c in configs]
        assert all(isinstance(t, TorchTask) for t in tasks)
        self.tasks: list[TorchTask] = tasks  # type: ignore[assignment]
        t0 = self.tasks[0]
        self.module = t0.module
        self.names = list(t0.names)
        if set(self.names) != {name for name, _ in self.module.named_parameters()}:
            raise ValueError("the torch batched engine cannot run this: the model has buffers")
        self.theta: Stacked = {
            name: torch.stack([t.init_model()[name] for t in self.tasks]) for name in self.names
        }
        self.manifest = wire.manifest_of(_row(self.theta, 0))
        self.slot_ids = [(c.id, *c.neighbors) for c in configs]
        self.width = width = max(len(s) for s in self.slot_ids)
        nbr = torch.zeros((n, width), dtype=torch.long)
        for k, slots in enumerate(self.slot_ids):
            nbr[k] = k
            for s, a in enumerate(slots):
                nbr[k, s] = index[a]
        self.nbr = nbr
        self.byzantine = [c.attack is not None for c in configs]
        self.rules = RowRules(
            [c.rule for c in configs], [c.rule_params for c in configs], self.byzantine, self.slot_ids
        )
        self.cooperating = self.rules.cooperating.tolist()
        self.attacks: dict[int, Attack] = {}
        self.fetched: list[dict[int, dict[str, StateDict]]] = [{} for _ in configs]
        for k, c in enumerate(configs):
            if c.attack is not None:
                attack = make_attack(c.attack, c.id, c.seed, c.attack_params, task=c.task)
                attack.bind(_View(self, k))
                self.attacks[k] = attack
        self.keeps_pool = [c.attack in POOL_ATTACKS for c in configs]
        # Which (receiver, slot) pairs see a crafted model: receivers that use what they fetch.
        self.crafted_pairs = [
            (k, s, int(nbr[k, s]))
            for k in range(n)
            if self.cooperating[k] or self.keeps_pool[k]
            for s in range(1, len(self.slot_ids[k]))
            if self.byzantine[int(nbr[k, s])]
        ]
        self.pair_rows = torch.tensor([k for k, _, _ in self.crafted_pairs], dtype=torch.long)
        self.pair_slots = torch.tensor([s for _, s, _ in self.crafted_pairs], dtype=torch.long)
        # Attacks whose model does not depend on the requester are crafted once per round.
        self.per_requester = {
            a: getattr(attack.params, "redraw", None) == "request" for a, attack in self.attacks.items()
        }
        # Every agent's training and test split, padded to the longest (rows index them at once).
        self.train_x, _ = _padded([t.train.x for t in self.tasks])
        self.train_y, _ = _padded([t.train.y for t in self.tasks])
        self.test_x, self.test_mask = _padded([t.test.x for t in self.tasks])
        self.test_y, _ = _padded([t.test.y for t in self.tasks])
        self.test_count = torch.tensor([len(t.test) for t in self.tasks], dtype=torch.float64)
        self.arange = torch.arange(n)
        lrs = [t.p.lr for t in self.tasks]
        self.lr = lrs[0] if len(set(lrs)) == 1 else None
        self.lr_rows = torch.tensor(lrs, dtype=torch.float32)
        self.steps = t0.p.local_steps
        # Adam (torch.optim.Adam's defaults, single-tensor algorithm): per-row moments and steps.
        self.adam = t0.p.optimizer == "adam"
        self.exp_avg = {name: torch.zeros_like(t) for name, t in self.theta.items()}
        self.exp_avg_sq = {name: torch.zeros_like(t) for name, t in self.theta.items()}
        self.adam_steps = [0] * n
        self.lr64 = torch.tensor(lrs, dtype=torch.float64)
        module, loss_fn = self.module, t0.loss_fn

        def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(module, params, (x,)), y)

        self.grads: Callable[..., dict[str, torch.Tensor]] = vmap(grad(loss_of))
        self.row_loss: Callable[..., torch.Tensor] = vmap(loss_of)
        self.scorer = PoolScorer(module, loss_fn)
        self.loss_rows = _rows(self.rules.needs_loss)
        self.dist_rows = _rows(self.rules.needs_distance)

        def sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(out[None], y[None])

        def outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(module, params, (x,))

        # For the padded test splits: (rows, samples, ...) outputs, one forward call per row, and
        # from them the per-sample losses (a per-sample forward call under a second vmap copied
        # the weights once per sample: 8 ms of a 30 ms HAR round).
        self.outputs: Callable[..., torch.Tensor] = vmap(outputs)
        self.sample_losses: Callable[..., torch.Tensor] = vmap(sample_loss)
        self._score: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.draws = Draws(self.tasks, self.steps, t0.p.batch_size)
        self.triggers = TriggerRates(self.tasks)
        self.resample = [k for k, t in enumerate(self.tasks) if t.p.scoring == "resample"]

    # -- one round ---------------------------------------------------------------------------------

    def adapt(self, i: int) -> Stacked:
        batches = self.draws.batches(i)
        rows = [k for k, t in enumerate(self.tasks) if t.trains_in(i)]
        psi = {name: t.clone() for name, t in self.theta.items()}
        if not rows:
            return psi
        r = torch.tensor(rows, dtype=torch.long)
        params = {name: t[r] for name, t in self.theta.items()}
        self.module.train()
        for s in range(self.steps):
            idx = batches[r, s]
            x, y = self.train_x[r[:, None], idx], self.train_y[r[:, None], idx]
            g = self.grads(params, x, y)
            if self.adam:
                params = self._adam(rows, r, params, g)
            elif self.lr is not None:  # torch.optim.SGD: p.add_(g, alpha=-lr)
                params = {name: p.add(g[name], alpha=-self.lr) for name, p in params.items()}
            else:
                lr = self.lr_rows[r]
                params = {
                    name: p.add(-lr.view(-1, *([1] * (p.dim() - 1))) * g[name]) for name, p in params.items()
                }
        for name in self.names:
            psi[name][r] = params[name].detach()
        return psi

    def _adam(self, rows: list[int], r: torch.Tensor, params: Stacked, g: Stacked) -> Stacked:
        """One torch.optim.Adam step (betas 0.9/0.999, eps 1e-8) of every training row, each with
        its own moments and step count; the scalars are float64 as Adam's, cast like its kernels."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for k in rows:
            self.adam_steps[k] += 1
        step = torch.tensor([self.adam_steps[k] for k in rows], dtype=torch.float64)
        step_size = (self.lr64[r] / (1 - beta1**step)).to(torch.float32)
        bc2_sqrt = ((1 - beta2**step) ** 0.5).to(torch.float32)
        out = {}
        for name, p in params.items():
            view = (-1, *([1] * (p.dim() - 1)))
            m = self.exp_avg[name][r].lerp(g[name], 1 - beta1)
            v = torch.addcmul(self.exp_avg_sq[name][r] * beta2, g[name], g[name], value=1 - beta2)
            self.exp_avg[name][r], self.exp_avg_sq[name][r] = m, v
            denom = (v.sqrt() / bc2_sqrt.view(view)).add(eps)
            out[name] = p + (-step_size).view(view) * (m / denom)
        return out

    def exchange(self, i: int, psi: Stacked) -> Pool:
        """What every slot receives this round: the adapted models, then each crafted model once."""
        src = self.nbr.clone()
        present = self.rules.exists.copy()
        missing: dict[tuple[int, int], str] = {}
        extra: list[StateDict] = []
        if self.crafted_pairs:
            honest = {a: _row(psi, a) for a in self.attacks}
            once: dict[int, int | str] = {}
            where = []
            for k, s, a in self.crafted_pairs:
                got = once.get(a)
                if got is None:
                    model = self._craft(a, i, self.ids[k], honest[a])
                    if isinstance(model, str):
                        got = model
                    else:
                        got = self.n + len(extra)
                        extra.append(model)
                    if not self.per_requester[a]:
                        once[a] = got
                if isinstance(got, str):
                    missing[k, s] = got
                    present[k, s] = False
                    where.append(a)
                else:
                    where.append(got)
            src[self.pair_rows, self.pair_slots] = torch.tensor(where, dtype=torch.long)
        models = psi
        if extra:
            models = {name: torch.cat([t, torch.stack([m[name] for m in extra])]) for name, t in psi.items()}
        pool = Pool(models, src, present, missing)
        ok = finite_rows(psi)
        if not bool(ok.all()):  # an honest model that is not finite arrives as missing, as a fetch's
            self._not_finite(pool, ok, psi)
        for k in range(self.n):
            if self.keeps_pool[k]:
                self.fetched[k][i] = {
                    self.slot_ids[k][s]: pool.slot(k, s)
                    for s in range(1, len(self.slot_ids[k]))
                    if pool.present[k, s]
                }
                self.fetched[k].pop(i - 2, None)
        return pool

    def _not_finite(self, pool: Pool, ok: torch.Tensor, psi: Stacked) -> None:
        for a in torch.nonzero(~ok).flatten().tolist():
            why = "non-finite"
            try:
                wire.validate_state(_row(psi, a), self.manifest)
            except WireError as exc:
                why = _reason(exc)
            for k, s in torch.nonzero(pool.src == a).tolist():
                if s > 0 and pool.present[k, s]:
                    pool.present[k, s] = False
                    pool.missing[k, s] = why

    def _craft(self, a: int, i: int, requester: str, honest: StateDict) -> StateDict | str:
        """What attack node ``a`` serves ``requester`` in round ``i``, or why nothing valid arrives."""
        attack = self.attacks[a]
        try:
            model = attack.craft(i, requester, honest)
            wire.validate_state(model, self.manifest)
        except Withhold:
            return f"unavailable: {self.ids[a]}: round {i}: refused (omission)"
        except WireError as exc:
            return _reason(exc)
        except Exception:  # the attack node serves its honest model when its attack fails
            log.exception("%s: attack %s failed; serving the honest model", self.ids[a], attack.name)
            return honest
        return model

    def scoring_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every agent's scoring samples of round ``i`` (TorchTask.scoring_batch, gathered at once)."""
        if self._score is None or self._score[0] != i:
            rows = self.draws.batches(i).flatten(1)
            if self.resample:
                rows = rows.clone()  # a view of the draws' block otherwise
            for k in self.resample:
                t = self.tasks[k]
                t.scoring_batch(i)
                assert t._scoring is not None
                rows[k] = t._scoring[1]
            self._score = (
                i,
                self.train_x[self.arange[:, None], rows],
                self.train_y[self.arange[:, None], rows],
            )
        return self._score[1], self._score[2]

    def evaluate(
        self, theta: Stacked, x: torch.Tensor, y: torch.Tensor, tests: bool
    ) -> tuple[list[float], list[float], list[float]]:
        """Every agent's loss on its scoring batch (x, y), and with ``tests`` its (mean loss,
        accuracy) on its whole test split (TorchTask.test_metrics): one forward call per row on the
        padded test split, the per-sample losses from its outputs."""
        own = self.row_loss(theta, x, y).tolist()
        if not tests:
            return own, [], []
        out = self.outputs(theta, self.test_x)
        losses = self.sample_losses(out.flatten(0, 1), self.test_y.flatten()).view(out.shape[:2]).double()
        loss = (losses * self.test_mask).sum(dim=1) / self.test_count
        hit = (out.argmax(dim=-1) == self.test_y).double()
        acc = (hit * self.test_mask).sum(dim=1) / self.test_count
        return own, loss.tolist(), acc.tolist()

    def step(self, i: int) -> list[RoundRecord]:
        started = time.perf_counter()
        theta_prev = self.theta
        psi = self.adapt(i)
        pool = self.exchange(i, psi)
        n, width = self.n, self.width
        losses = np.full((n, width), np.nan)
        distances = np.full((n, width), np.nan)
        self.module.eval()
        with torch.no_grad():
            if self.loss_rows is not None:
                x, y = self.scoring_batch(i)
                r = self.loss_rows
                losses[r.numpy()] = self.scorer.losses(pool, r, x[r], y[r]).double().numpy()
            if self.dist_rows is not None:
                r = self.dist_rows
                distances[r.numpy()] = torch_pool.distances(theta_prev, pool, r).numpy()
        agg = self.rules.aggregate(
            losses, distances, pool.present, pool.missing, lambda k: torch_pool.vectors(pool, k)
        )
        with torch.no_grad():
            theta = torch_pool.combine(pool, agg.weights, agg.keep_own, psi)
        for k, vector in agg.combined.items():
            model = unflatten(vector, _row(psi, k))
            for name in self.names:
                theta[name][k] = model[name]
        self.theta = theta

        due = [not (i % t.p.eval_every or len(t.test) == 0) for t in self.tasks]
        with torch.no_grad():
            x, y = self.scoring_batch(i)
            own_loss, test_loss, test_acc = self.evaluate(theta, x, y, any(due))
            success = self.triggers.rates(self.outputs, theta) if any(due) else {}
        seconds = (time.perf_counter() - started) / n
        records = []
        for k, c in enumerate(self.configs):
            if due[k]:
                metrics = Metrics(
                    loss=own_loss[k],
                    test_loss=test_loss[k],
                    test_accuracy=test_acc[k],
                    attack_success=success.get(k),
                )
            else:
                metrics = Metrics(loss=own_loss[k])
            records.append(
                RoundRecord(
                    agent=c.id,
                    round=i,
                    role=c.role,
                    rule=c.rule,
                    metrics=metrics,
                    accepted=agg.accepted[k],
                    filtered=agg.filtered[k],
                    missing=agg.missing[k],
                    decisions=agg.decisions[k],
                    seconds=seconds,
                )
            )
        return records


def run_torch_batched(
    configs: Sequence[NodeConfig],
    on_round: Callable[[list[RoundRecord]], Any] | None = None,
    threads: int | None = THREADS,
) -> dict[str, list[RoundRecord]]:
    """Run every agent to its last round, all at once; per agent its RoundRecords (as the
    per-agent engine's recorders hold them). ``on_round`` gets each round's records as they come.
    ``threads``: torch's intra-op threads during the run (restored after; None: leave as set)."""
    with _torch_threads(threads):
        engine = _Engine(configs)
        out: dict[str, list[RoundRecord]] = {c.id: [] for c in configs}
        rounds = configs[0].rounds
        for i in range(1, rounds + 1):
            records = engine.step(i)
            for rec in records:
                out[rec.agent].append(rec)
            if on_round is not None:
                on_round(records)
    return out


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
