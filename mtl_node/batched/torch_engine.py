"""The vectorized in-process engine for torch tasks: every agent's round as stacked tensors.

The per-agent engine steps each agent in its own asyncio task with its own small torch calls; for a
small model nearly all of that time is interpreter and dispatch overhead. Here every agent's
model is one row of stacked parameters (``name -> (agents, *shape)``) and a round is:

- **local steps**: the gradient of the task's loss for every training agent on its own batch
  (mtl_node.batched.torch_model: vmapped, or one call per agent for convolutional models), the
  batches from each agent's own task object (``TorchTask._round_batches``, so the sampling order,
  ``train_share`` draws and ``scoring: resample`` picks are the per-agent engine's own), then each
  agent's own SGD or Adam step (mtl_node.batched.torch_optim: per-row moments and step counts);
- **exchange**: ``received[k, s]`` = the model agent k gets from its s-th neighbour (slot 0 = itself);
  a Byzantine sender's model is crafted by its own attack object (``attacks/``, i.e. the kernels)
  for each receiver, exactly as the attack node would serve it;
- **scoring**: the loss of every received model on the receiver's scoring batch (vmapped over agents
  and slots, or each distinct model once on the stacked batches of its receivers), and squared
  distances to the previous model for the distance rule;
- **aggregation**: each agent's own rule object (``mtl_node.aggregation``, which calls the kernels in
  ``mtl_node.kernels`` with one row): cheap per row, and the decisions and reasons are the agents'
  own by construction;
- **combination**: ``mtl_node.kernels.combine.accumulate`` over the slots of all rows at once
  (float32 weights, slot order, absent or zero-weight slots adding an exact 0: the same sum the
  agent's ``weighted_sum`` does);
- **evaluation**: the loss of the combined models on the scoring batches; test metrics every
  ``eval_every`` rounds.

It runs every task built on ``TorchTask`` (HAR, digits, custom ``module:factory`` tasks) whose
agents share one model and loss (torch_model.model_reason), with SGD or Adam, every rule, and the
attacks in ``ATTACKS``, on the device of the configs (cuda when asked for and available: written
for it, but it has not run on a GPU). What it cannot run (:func:`unsupported_reason`, and
``Unbatchable`` from the task checks once the tasks are built) the callers run on the per-agent
engine.

**Equality with the per-agent engine** (tests/unit/test_torch_batched.py). With SGD, metrics and
decisions agree within 1e-5 relative: batched matmuls and grouped batches sum in a different order,
so values differ in the last bits of a float32. With Adam the same rounding differences are
amplified: Adam's step is ``lr * m / (sqrt(v) + 1e-8)``, so a gradient component that is nearly zero
(dead ReLU units, background pixels) and differs by a rounding error of ~1e-9 moves its parameter by
up to ``lr * 1e-9 / 1e-8``, a tenth of a full step, instead of by ``lr * 1e-9``; from then on the two
trajectories differ by more than rounding, and chaotically. For convolutional models the local steps
are the agent's own forward/backward, so this starts only once scoring (a different batch layout
than the agent's vmapped scoring) shifts a weight in the last bit. What can be guaranteed with Adam:
decisions (accepted / filtered / missing per round) equal, and metrics within 1e-4 relative over
the first rounds (the tests: 1e-5 for SGD, 1e-4 for Adam over six rounds); over hundreds of rounds
the runs are statistically alike, not equal (docs/performance.md gives the figures measured).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mtl_node import wire
from mtl_node.aggregation import Candidate, Rule, make_rule
from mtl_node.attack_api import Attack, AttackView, Withhold, make_attack
from mtl_node.batched.torch_model import BatchedModel, class_reason
from mtl_node.batched.torch_model import Unbatchable as Unbatchable  # what the callers catch
from mtl_node.batched.torch_optim import RowOptimizers
from mtl_node.combine import unflatten
from mtl_node.config import NodeConfig
from mtl_node.core import names
from mtl_node.errors import WireError
from mtl_node.kernels.combine import accumulate
from mtl_node.recorder import RoundRecord
from mtl_node.tasks import Metrics, Task, make_task
from mtl_node.tasks.base import TASKS, parse_params
from mtl_node.tasks.torch_task import TorchTask, TorchTaskParams
from mtl_node.wire import StateDict

log = logging.getLogger(__name__)

# Every rule: each agent's own rule object aggregates its row, given the losses, distances and
# flattened models it asks for (needs_loss / needs_distance / needs_models).
RULES = names.RULE_NAMES
# Attacks whose ``craft`` depends only on (seed, attacker, round, requester, honest model, last
# round's fetched pool): what the attack node serves does not depend on request order.
ATTACKS = ("constant", "gaussian", "small-perturbation", "scaled", "sign-flip", "ipm", "alie", "mimic")
POOL_ATTACKS = ("ipm", "alie", "mimic")

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
    if len({c.task for c in configs}) != 1:
        return "agents run different tasks"
    if len({c.device for c in configs}) != 1:
        return "agents run on different devices"
    for c in configs:
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            return f"{c.id}: device {c.device!r}, but torch sees no CUDA device"
        if c.state_path is not None:
            return f"{c.id}: a state directory (crash-only state is per-agent)"
        if c.rule not in RULES:
            return f"{c.id}: rule {c.rule!r} (the torch batched engine runs {', '.join(RULES)})"
        missing = [n for n in c.neighbors if n not in known]
        if missing:
            return f"{c.id}: neighbour {missing[0]!r} is not an agent of this run"
        try:
            cls = TASKS.get(c.task)
            p = parse_params(cls, c.task_params)
        except Exception as exc:  # the per-agent engine reports invalid parameters
            return f"{c.id}: {exc}"
        why = class_reason(cls)
        if why is not None:
            return f"{c.id}: task {c.task!r}: {why}"
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
    mask = torch.zeros((len(parts), longest), dtype=torch.float64, device=parts[0].device)
    for k, p in enumerate(parts):
        out[k, : len(p)] = p
        mask[k, : len(p)] = 1.0
    return out, mask


def _reason(exc: Exception) -> str:
    return f"{getattr(exc, 'reason', 'error')}: {exc}"


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
        self.device = device = t0.train.x.device
        self.names = list(t0.names)
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
        self.nbr = nbr.to(device)
        self.senders: list[list[int]] = nbr.tolist()
        self.byzantine = [c.attack is not None for c in configs]
        self.rules: list[Rule] = [make_rule("none" if c.attack else c.rule, c.rule_params) for c in configs]
        self.cooperating = [
            not z and r.name != "none" for z, r in zip(self.byzantine, self.rules, strict=True)
        ]
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
        self.pair_rows = torch.tensor([k for k, _, _ in self.crafted_pairs], dtype=torch.long, device=device)
        self.pair_slots = torch.tensor([s for _, s, _ in self.crafted_pairs], dtype=torch.long, device=device)
        self.crafted = {(k, s): a for k, s, a in self.crafted_pairs}
        # Attacks whose model does not depend on the requester are crafted once per round.
        self.per_requester = {
            a: getattr(attack.params, "redraw", None) == "request" for a, attack in self.attacks.items()
        }
        # Every agent's training and test split, padded to the longest (rows index them at once).
        self.train_x, _ = _padded([t.train.x for t in self.tasks])
        self.train_y, _ = _padded([t.train.y for t in self.tasks])
        self.test_split: tuple[torch.Tensor, ...] | None = None
        if self.model.per_sample_tests and all(len(t.test) for t in self.tasks):
            test_x, test_mask = _padded([t.test.x for t in self.tasks])
            test_count = torch.tensor([len(t.test) for t in self.tasks], dtype=torch.float64, device=device)
            self.test_split = (test_x, _padded([t.test.y for t in self.tasks])[0], test_mask, test_count)
        self.arange = torch.arange(n, device=device)
        self.steps = t0.p.local_steps
        self.optim = RowOptimizers(t0.p.optimizer, [t.p.lr for t in self.tasks], self.theta)
        self._score: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # -- one round ---------------------------------------------------------------------------------

    def adapt(self, i: int) -> Stacked:
        batches = [t._round_batches(i) for t in self.tasks]
        rows = [k for k, t in enumerate(self.tasks) if t.trains_in(i)]
        psi = {name: t.clone() for name, t in self.theta.items()}
        if not rows:
            return psi
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        params = {name: t[r] for name, t in self.theta.items()}
        for s in range(self.steps):
            idx = torch.stack([batches[k][s] for k in rows])
            x, y = self.train_x[r[:, None], idx], self.train_y[r[:, None], idx]
            params = self.optim.step(rows, r, params, self.model.grads(params, x, y))
        for name in self.names:
            psi[name][r] = params[name].detach()
        return psi

    def exchange(self, i: int, psi: Stacked) -> tuple[Stacked, dict[tuple[int, int], str]]:
        """(what every slot receives, the reasons of the slots that receive nothing valid)."""
        received = {name: t[self.nbr] for name, t in psi.items()}
        missing: dict[tuple[int, int], str] = {}
        if not self.crafted_pairs:
            return received, missing
        honest = {a: _row(psi, a) for a in self.attacks}
        once: dict[int, StateDict | str] = {}
        served: list[StateDict] = []
        for k, s, a in self.crafted_pairs:
            got = once.get(a)
            if got is None:
                got = self._craft(a, i, self.ids[k], honest[a])
                if not self.per_requester[a]:
                    once[a] = got
            if isinstance(got, str):
                missing[k, s] = got
                got = {name: torch.zeros_like(t) for name, t in honest[a].items()}
            served.append(got)
        for name in self.names:
            received[name][self.pair_rows, self.pair_slots] = torch.stack([m[name] for m in served])
        for k in range(self.n):
            if self.keeps_pool[k]:
                self.fetched[k][i] = {
                    self.slot_ids[k][s]: {name: received[name][k, s] for name in self.names}
                    for s in range(1, len(self.slot_ids[k]))
                    if (k, s) not in missing
                }
                self.fetched[k].pop(i - 2, None)
        return received, missing

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
            idx = []
            for t in self.tasks:
                if t.p.scoring == "resample":
                    t.scoring_batch(i)
                    assert t._scoring is not None
                    idx.append(t._scoring[1])
                else:
                    idx.append(torch.cat(t._round_batches(i)))
            rows = torch.stack(idx)
            self._score = (
                i,
                self.train_x[self.arange[:, None], rows],
                self.train_y[self.arange[:, None], rows],
            )
        return self._score[1], self._score[2]

    def scores(
        self, i: int, rows: list[int], received: Stacked, psi: Stacked, missing: Mapping[tuple[int, int], str]
    ) -> dict[int, list[float]]:
        """Loss of every model row k received (slot by slot) on k's scoring batch, for ``rows``."""
        x, y = self.scoring_batch(i)
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        if not self.model.per_model:
            values = self.model.slot_losses({name: t[r] for name, t in received.items()}, x[r], y[r])
            return dict(zip(rows, values.tolist(), strict=True))
        # One call per distinct model, on the stacked batches of every row that received it: an
        # honest sender's model is the same for all its receivers, and so is an attack's model
        # crafted once per round.
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for k in rows:
            for s in range(len(self.slot_ids[k])):
                if (k, s) in missing:
                    continue
                a = self.crafted.get((k, s))
                key: tuple[int, ...] = (self.senders[k][s],) if a is None else (a, -1)
                if a is not None and self.per_requester[a]:
                    key = (a, k, s)
                groups.setdefault(key, []).append((k, s))
        out = {k: [float("nan")] * len(self.slot_ids[k]) for k in rows}
        for key, pairs in groups.items():
            k0, s0 = pairs[0]
            model = _row(psi, key[0]) if len(key) == 1 else {n: t[k0, s0] for n, t in received.items()}
            on = torch.tensor([k for k, _ in pairs], dtype=torch.long, device=self.device)
            for (k, s), v in zip(pairs, self.model.losses_on(model, x[on], y[on]).tolist(), strict=True):
                out[k][s] = v
        return out

    def step(self, i: int) -> list[RoundRecord]:
        started = time.perf_counter()
        theta_prev = self.theta
        psi = self.adapt(i)
        # Nobody uses what it fetches (rule none, no pool attack): every agent keeps its own psi.
        alone = not any(self.cooperating) and not any(self.keeps_pool)
        received, missing = (psi, {}) if alone else self.exchange(i, psi)
        n = self.n
        loss_rows = [k for k in range(n) if self.cooperating[k] and self.rules[k].needs_loss]
        dist_rows = [k for k in range(n) if self.cooperating[k] and self.rules[k].needs_distance]
        losses = self.scores(i, loss_rows, received, psi, missing) if loss_rows else {}
        with torch.no_grad():
            distances: dict[int, list[float]] = {}
            if dist_rows:
                r = torch.tensor(dist_rows, dtype=torch.long, device=self.device)
                total = torch.zeros((len(dist_rows), self.width), dtype=torch.float64, device=self.device)
                for name in self.names:  # squared_distance: a float32 sum per tensor, added in float64
                    diff = theta_prev[name][r].unsqueeze(1) - received[name][r]
                    total = total + (diff**2).flatten(2).sum(dim=2).double()
                distances = dict(zip(dist_rows, total.tolist(), strict=True))

        model_rows = [k for k in range(n) if self.cooperating[k] and self.rules[k].needs_models]
        vectors: dict[int, Any] = {}
        if model_rows:  # flatten(): floating tensors in name order, as float64
            r = torch.tensor(model_rows, dtype=torch.long, device=self.device)
            flat = torch.cat(
                [received[name][r].reshape(len(model_rows), self.width, -1) for name in sorted(self.names)],
                dim=2,
            )
            vectors = dict(zip(model_rows, flat.double().cpu().numpy(), strict=True))

        weights = torch.zeros((n, self.width), dtype=torch.float64)
        aggs = []
        combined: dict[int, StateDict] = {}
        for k in range(n):
            slots = self.slot_ids[k]
            if self.cooperating[k]:
                cands = []
                for s, a in enumerate(slots):
                    if (k, s) in missing:
                        cands.append(Candidate(a, missing_reason=missing[k, s]))
                        continue
                    cands.append(
                        Candidate(
                            a,
                            losses[k][s] if k in losses else None,
                            distances[k][s] if k in distances else None,
                            model=vectors[k][s] if k in vectors else None,
                        )
                    )
            else:
                cands = [Candidate(a) for a in slots]
            agg = self.rules[k].aggregate(cands)
            aggs.append(agg)
            if agg.combined is not None:
                combined[k] = unflatten(agg.combined, _row(psi, k))
                continue
            for s, a in enumerate(slots):
                weights[k, s] = agg.weights.get(a, 0.0)

        # theta = sum_s w_s psi_s in slot order, as weighted_sum does it for one agent.
        w32 = weights.to(self.device, torch.float32)
        theta: Stacked = {}
        for name, t in received.items():
            if not any(self.cooperating):  # every row keeps psi (weighted_sum's single-member copy)
                theta[name] = psi[name].clone()
                continue
            shape = (n, *([1] * (t.dim() - 2)))
            theta[name] = accumulate(
                [w32[:, s].view(shape) for s in range(self.width)], [t[:, s] for s in range(self.width)]
            )
        for k, model in combined.items():
            for name in self.names:
                theta[name][k] = model[name]
        self.theta = theta

        due = [not (i % t.p.eval_every or len(t.test) == 0) for t in self.tasks]
        x, y = self.scoring_batch(i)
        own_loss = self.model.row_losses(theta, x, y).tolist()
        tested = [k for k in range(n) if due[k]]
        test_loss, test_acc = self.model.test_metrics(theta, tested, self.test_split)
        tests = {k: (test_loss[j], test_acc[j]) for j, k in enumerate(tested)}
        seconds = (time.perf_counter() - started) / n
        records = []
        for k, c in enumerate(self.configs):
            metrics = Metrics(loss=float(own_loss[k]))
            if due[k]:
                metrics = Metrics(loss=metrics.loss, test_loss=tests[k][0], test_accuracy=tests[k][1])
            agg = aggs[k]
            records.append(
                RoundRecord(
                    agent=c.id,
                    round=i,
                    role=c.role,
                    rule=c.rule,
                    metrics=metrics,
                    accepted=agg.count("accepted"),
                    filtered=agg.count("filtered"),
                    missing=agg.count("missing"),
                    decisions=tuple(agg.decisions),
                    seconds=seconds,
                )
            )
        return records


def run_torch_batched(
    configs: Sequence[NodeConfig],
    on_round: Callable[[list[RoundRecord]], Any] | None = None,
) -> dict[str, list[RoundRecord]]:
    """Run every agent to its last round, all at once; per agent its RoundRecords (as the
    per-agent engine's recorders hold them). ``on_round`` gets each round's records as they come."""
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
