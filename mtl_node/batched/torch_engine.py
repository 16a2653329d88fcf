"""The vectorized in-process engine for torch tasks: every agent's round as stacked tensors.

Every agent's model is one row of stacked parameters (``name -> (agents, *shape)``) and a round is:

- **local steps** for every training agent on its own batch, from its own task's draws
  (mtl_node.batched.torch_draws lays out the task's epoch permutations; ``trains_in`` and
  ``scoring: resample`` are the task's own): gradients from mtl_node.batched.torch_model (vmapped,
  or the agent's own forward/backward for convolutional models), then each agent's own SGD or Adam step
  (mtl_node.batched.torch_optim: per-row moments and step counts);
- **exchange** (mtl_node.batched.torch_pool): a pool of the round's distinct models, Byzantine
  ones crafted by each attacker's own attack object exactly as its attack node would serve them
  (mtl_node.batched.torch_attackers);
- **scoring** of every received model on the receiver's scoring batch, distances, **aggregation**
  of all rows with the kernels (mtl_node.batched.torch_rules) and **combination**;
- **evaluation**: the combined models' loss on the scoring batches, test metrics and backdoor
  attack success rates (mtl_node.batched.torch_trigger) every ``eval_every`` rounds; the decision
  rows are built when first read (torch_rules.RowDecisions). The run holds torch to ``THREADS``
  intra-op threads (docs/performance.md, "Threads").

It runs every task built on ``TorchTask`` (HAR, digits, custom ``module:factory`` tasks) whose
agents share one model and loss (torch_model.model_reason), with SGD or Adam, every rule and the
attacks in ``ATTACKS``, on the configs' device (cuda when asked for and available: written for it,
but it has not run on a GPU). What it cannot run (:func:`unsupported_reason`, or ``Unbatchable``
once the tasks are built) the callers run on the per-agent engine.

**Equality with the per-agent engine** (tests/unit/test_torch_batched.py): with SGD, metrics and
decisions within 1e-5 relative (batched calls sum in another order: last-bit differences). Adam
amplifies last-bit differences of the combined models (its first step is about ``lr * sign(g)``, so
a nearly-zero gradient component flips by 2 lr): the local steps of a convolutional model are the
agent's own operations, so rule none stays equal; with combined models what holds is equal
decisions over the first rounds and metrics within 1e-3 (what the tests check), and long runs
separate (docs/performance.md has the measured drift).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch

from mtl_node import wire
from mtl_node.batched import torch_linear, torch_pool
from mtl_node.batched.torch_attackers import Attackers, reason_of
from mtl_node.batched.torch_attackers import row as _row
from mtl_node.batched.torch_draws import Draws
from mtl_node.batched.torch_model import BatchedModel
from mtl_node.batched.torch_model import Unbatchable as Unbatchable  # what the callers catch
from mtl_node.batched.torch_optim import RowOptimizers
from mtl_node.batched.torch_pool import Pool, PoolScorer, finite_rows
from mtl_node.batched.torch_rules import RowRules
from mtl_node.batched.torch_support import ATTACKS as ATTACKS
from mtl_node.batched.torch_support import RULES as RULES
from mtl_node.batched.torch_support import crafts_from_requester, keeps_fetch
from mtl_node.batched.torch_support import unsupported_reason as unsupported_reason
from mtl_node.batched.torch_trigger import TriggerRates, shared_trigger
from mtl_node.combine import unflatten
from mtl_node.config import NodeConfig
from mtl_node.core.errors import WireError
from mtl_node.recorder import RoundRecord
from mtl_node.tasks import Metrics, make_task
from mtl_node.tasks.torch_task import TorchTask
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

# torch's intra-op threads while the engine runs (restored after). One: a round is a few dozen
# operations of well under a millisecond each (HAR: 30 x 10 samples x 561 features), too small for
# a thread team to pay for its fork/join; and on a shared 2-core machine a team of two waits for its
# descheduled member at every operation, which made the engine 4-6x slower than with one thread
# (docs/performance.md, "Threads"). Convolutional models (digits: large operations) gain from more:
# for them run_torch_batched's default ("auto") keeps the caller's setting.
THREADS = 1

Stacked = dict[str, torch.Tensor]  # name -> (rows, *shape) or (rows, slots, *shape)


def _padded(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, longest, ...) zero-padded stack of ``parts``, and the (rows, longest) float64 mask."""
    longest = max(len(p) for p in parts)
    out = parts[0].new_zeros((len(parts), longest, *parts[0].shape[1:]))
    mask = torch.zeros((len(parts), longest), dtype=torch.float64, device=parts[0].device)
    for k, p in enumerate(parts):
        out[k, : len(p)] = p
        mask[k, : len(p)] = 1.0
    return out, mask


def _rows(mask: np.ndarray) -> torch.Tensor | None:
    """The indices of the True rows, or None when there are none."""
    rows = np.flatnonzero(mask)
    return torch.from_numpy(rows) if len(rows) else None


class _Engine:
    def __init__(self, configs: Sequence[NodeConfig]) -> None:
        reason = unsupported_reason(configs)
        if reason is not None:
            raise Unbatchable(reason)
        self.configs = list(configs)
        self.n = n = len(configs)
        self.ids = [c.id for c in configs]
        index = {a: k for k, a in enumerate(self.ids)}
        tasks = [make_task(c.task, c.id, c.seed, c.task_params, c.device) for c in configs]
        assert all(isinstance(t, TorchTask) for t in tasks)
        self.tasks: list[TorchTask] = tasks  # type: ignore[assignment]
        self.model = BatchedModel(self.tasks)  # raises Unbatchable
        t0 = self.tasks[0]
        self.device = t0.train.x.device
        self.names = list(t0.names)
        self.theta: Stacked = {
            name: torch.stack([t.init_model()[name] for t in self.tasks]) for name in self.names
        }
        self.manifest = wire.manifest_of(_row(self.theta, 0))
        self.spec = torch_pool.spec_of(_row(self.theta, 0))
        self.slot_ids = [(c.id, *c.neighbors) for c in configs]
        self.width = width = max(len(s) for s in self.slot_ids)
        nbr = torch.zeros((n, width), dtype=torch.long)
        for k, slots in enumerate(self.slot_ids):
            nbr[k] = k
            for s, a in enumerate(slots):
                nbr[k, s] = index[a]
        self.nbr = nbr.to(self.device)
        self.byzantine = [c.attack is not None for c in configs]
        self.rules = RowRules(
            [c.rule for c in configs], [c.rule_params for c in configs], self.byzantine, self.slot_ids
        )
        self.cooperating = self.rules.cooperating.tolist()
        self.index = index
        # The attack nodes: each attacker's own attack object and what it sees (torch_attackers).
        self.attackers = Attackers(self.configs, index, self.manifest, self.spec, self.tasks)
        self.attacks = self.attackers.attacks
        self.keeps_pool = [keeps_fetch(c) for c in configs]
        # Which (receiver, slot) pairs see a crafted model: receivers that use what they fetch.
        self.crafted_pairs = [
            (k, s, int(nbr[k, s]))
            for k in range(n)
            if self.cooperating[k] or self.keeps_pool[k]
            for s in range(1, len(self.slot_ids[k]))
            if self.byzantine[int(nbr[k, s])]
        ]
        self.pair_rows = torch.tensor(
            [k for k, _, _ in self.crafted_pairs], dtype=torch.long, device=self.device
        )
        self.pair_slots = torch.tensor(
            [s for _, s, _ in self.crafted_pairs], dtype=torch.long, device=self.device
        )
        # Attacks whose model does not depend on the requester are crafted once per round.
        self.per_requester = {
            a: getattr(attack.params, "redraw", None) == "request" or crafts_from_requester(configs[a])
            for a, attack in self.attacks.items()
        }
        # Every agent's training and test split, padded to the longest (rows index them at once).
        self.train_x, _ = _padded([t.train.x for t in self.tasks])
        self.train_y, _ = _padded([t.train.y for t in self.tasks])
        self.test_split: tuple[torch.Tensor, ...] | None = None
        if self.model.per_sample_tests and all(len(t.test) for t in self.tasks):
            test_x, test_mask = _padded([t.test.x for t in self.tasks])
            test_count = torch.tensor(
                [len(t.test) for t in self.tasks], dtype=torch.float64, device=self.device
            )
            test_y = _padded([t.test.y for t in self.tasks])[0]
            self.test_split = (self.model.layout(test_x), test_y, test_mask, test_count)
        self.arange = torch.arange(n, device=self.device)
        self.offsets = self.arange * self.train_x.shape[1]  # each row's first sample, flattened
        self.steps = t0.p.local_steps
        self.optim = RowOptimizers(t0.p.optimizer, [t.p.lr for t in self.tasks], self.theta)
        self.scorer = PoolScorer(self.model.module, self.model.loss_fn, closed_form=self.model.linear)
        self.loss_rows = _rows(self.rules.needs_loss)
        self.dist_rows = _rows(self.rules.needs_distance)
        self._score: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._batches: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.draws = Draws(self.tasks, self.steps, t0.p.batch_size)
        self._triggers: TriggerRates | None = None  # made when first needed (not with self.tests)
        # The closed-form linear layer's test metrics and rates in one pass (torch_linear.Tests).
        self.tests: torch_linear.Tests | None = None
        trigger = shared_trigger(self.tasks)
        if self.model.linear and self.test_split is not None and trigger is not False:
            self.tests = torch_linear.Tests(self.test_split, trigger)
        self.resample = [k for k, t in enumerate(self.tasks) if t.p.scoring == "resample"]

    # -- one round ---------------------------------------------------------------------------------

    def adapt(self, i: int) -> Stacked:
        rows = [k for k, t in enumerate(self.tasks) if t.trains_in(i)]
        psi = {name: t.clone() for name, t in self.theta.items()}
        if not rows:
            return psi
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        xs, ys = self.round_batches(i)
        shape = (len(rows), self.steps, -1)
        xs = xs.index_select(0, r).view(*shape, *xs.shape[2:])
        ys = ys.index_select(0, r).view(*shape, *ys.shape[2:])
        params = {name: t.index_select(0, r) for name, t in self.theta.items()}
        for s in range(self.steps):
            params = self.optim.step(rows, r, params, self.model.grads(params, xs[:, s], ys[:, s]))
        for name in self.names:
            psi[name].index_copy_(0, r, params[name].detach())
        return psi

    def exchange(self, i: int, psi: Stacked) -> Pool:
        """What every slot receives this round: the adapted models, then each crafted model once."""
        src = self.nbr.clone()
        present = self.rules.exists.copy()
        missing: dict[tuple[int, int], str] = {}
        extra: list[StateDict] = []
        if self.crafted_pairs:
            self.attackers.psi = psi
            honest = {a: _row(psi, a) for a in self.attacks}
            once: dict[int, int | str] = {}
            where = []
            for k, s, a in self.crafted_pairs:
                got = once.get(a)
                if got is None:
                    model = self.attackers.craft(a, i, self.ids[k], honest[a])
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
            src[self.pair_rows, self.pair_slots] = torch.tensor(where, dtype=torch.long, device=self.device)
        models = psi
        if extra:
            models = {name: torch.cat([t, torch.stack([m[name] for m in extra])]) for name, t in psi.items()}
        pool = Pool(models, src, present, missing)
        ok = finite_rows(psi)
        if not bool(ok.all()):  # an honest model that is not finite arrives as missing, as a fetch's
            self._not_finite(pool, ok, psi)
        for k in range(self.n):
            if self.keeps_pool[k]:
                self.attackers.fetched[k][i] = {
                    self.slot_ids[k][s]: pool.slot(k, s)
                    for s in range(1, len(self.slot_ids[k]))
                    if pool.present[k, s]
                }
                self.attackers.fetched[k].pop(i - 2, None)
        return pool

    def _not_finite(self, pool: Pool, ok: torch.Tensor, psi: Stacked) -> None:
        for a in torch.nonzero(~ok).flatten().tolist():
            why = "non-finite"
            try:
                wire.validate_state(_row(psi, a), self.manifest)
            except WireError as exc:
                why = reason_of(exc)
            for k, s in torch.nonzero(pool.src == a).tolist():
                if s > 0 and pool.present[k, s]:
                    pool.present[k, s] = False
                    pool.missing[k, s] = why

    def _gather(self, data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(rows, m, ...): ``data[k, idx[k]]`` for every row k of a padded split (one
        ``index_select`` over the flattened rows: advanced indexing costs several times more)."""
        flat = (self.offsets[:, None] + idx).flatten()
        return data.flatten(0, 1).index_select(0, flat).view(*idx.shape, *data.shape[2:])

    def round_batches(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every agent's samples of its local steps in round ``i`` (rows, steps * batch, ...), its
        task's own draws (TorchTask._round_batches), gathered once per round."""
        if self._batches is None or self._batches[0] != i:
            idx = self.draws.batches(i).flatten(1)
            self._batches = (i, self._gather(self.train_x, idx), self._gather(self.train_y, idx))
        return self._batches[1], self._batches[2]

    def scoring_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every agent's scoring samples of round ``i`` (TorchTask.scoring_batch, gathered at once):
        its round's batches, or for ``scoring: resample`` the task's own draw of others."""
        x, y = self.round_batches(i)
        if not self.resample:
            return x, y
        if self._score is None or self._score[0] != i:
            x, y = x.clone(), y.clone()
            for k in self.resample:
                t = self.tasks[k]
                t.scoring_batch(i)
                assert t._scoring is not None
                x[k], y[k] = self.train_x[k, t._scoring[1]], self.train_y[k, t._scoring[1]]
            self._score = (i, x, y)
        return self._score[1], self._score[2]

    def _attack_success(self, k: int, theta: Stacked) -> float | None:
        """Row k's rate from its own task, where TriggerRates has none (no trigger: None)."""
        return None if self.tasks[k].trigger is None else self.tasks[k].attack_success(_row(theta, k))

    def step(self, i: int) -> list[RoundRecord]:
        started = time.perf_counter()
        theta_prev = self.theta
        psi = self.adapt(i)
        pool = self.exchange(i, psi)
        n, width = self.n, self.width
        losses = np.full((n, width), np.nan)
        distances = np.full((n, width), np.nan)
        with torch.no_grad():
            if self.loss_rows is not None:
                x, y = self.scoring_batch(i)
                r = self.loss_rows
                score = self.model.pool_losses if self.model.per_model else self.scorer.losses
                losses[r.numpy()] = score(pool, r, x[r], y[r]).double().cpu().numpy()
            if self.dist_rows is not None:
                r = self.dist_rows
                distances[r.numpy()] = torch_pool.distances(theta_prev, pool, r).cpu().numpy()
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
        x, y = self.scoring_batch(i)
        own_loss = self.model.row_losses(theta, x, y).tolist()
        tested = [k for k in range(n) if due[k]]
        test_acc: Sequence[float | None]
        if self.tests is not None and len(tested) == n:
            test_loss, test_acc, success = self.tests(theta)
        else:
            test_loss, test_acc = self.model.test_metrics(theta, tested, self.test_split)
            if self._triggers is None:
                self._triggers = TriggerRates(self.tasks, self.model.layout)
            success = self._triggers.rates(self.model.predict, theta) if any(due) else {}
        tests = {k: (test_loss[j], test_acc[j]) for j, k in enumerate(tested)}
        seconds = (time.perf_counter() - started) / n
        records = []
        for k, c in enumerate(self.configs):
            if due[k]:
                metrics = Metrics(
                    loss=own_loss[k],
                    test_loss=tests[k][0],
                    test_accuracy=tests[k][1],
                    attack_success=success[k] if k in success else self._attack_success(k, theta),
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
    threads: int | Literal["auto"] | None = "auto",
) -> dict[str, list[RoundRecord]]:
    """Run every agent to its last round, all at once; per agent its RoundRecords (as the
    per-agent engine's recorders hold them). ``on_round`` gets each round's records as they come.
    ``threads``: torch's intra-op threads during the rounds (restored after). ``"auto"``: THREADS
    for models the engine vmaps (many tiny operations), the caller's setting for convolutional
    models run one call per model (operations large enough for a thread team: on the quiet 2-core
    machine digits ran 0.8x the per-agent engine's wall time with one thread, 1.4x with two;
    docs/performance.md). None leaves the setting alone."""
    engine = _Engine(configs)
    if threads == "auto":
        threads = None if engine.model.per_model else THREADS
    with _torch_threads(threads):
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
