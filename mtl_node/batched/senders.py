"""The Byzantine senders of a vectorized run: what each serves to each (receiver, slot) pair.

Every attack's maths is ``mtl_node.kernels.attacks`` (the attack classes in ``attacks/`` call the
same kernels); this module gathers the inputs for all pairs at once: random draws from the same
generators (``mtl_node.attack_api.draw_generator``), pools of last round's fetched models, the
requester's model, the attacker's own history. Which attacks and networks of attackers it
reproduces is ``attack_kinds``. Long (~370 lines) because it is one class whose parts share its
per-run tables; splitting it would only pass them around.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from mtl_node.attack_api import draw_generator
from mtl_node.batched.adaptive_sender import adaptive, proxy_losses
from mtl_node.batched.attack_kinds import DRAWN as _DRAWN
from mtl_node.batched.attack_kinds import (
    POOL_ATTACKS,
    REQUESTER_ATTACKS,
    VICTIM_POOL_ATTACKS,
    Sender,
    sender_of,
)
from mtl_node.batched.attack_kinds import draw_args as _draw_args
from mtl_node.kernels import attacks as ka
from mtl_node.kernels import target_localization as tl

if TYPE_CHECKING:
    from mtl_node.batched.network import Batch


class Attackers:
    """Every Byzantine sender's model for every (receiver, slot) pair that uses it, per round.

    Pairs are the slots of receivers that use what they fetch (cooperating normal agents) and of
    Byzantine receivers whose attack is built from what they fetched (pool and victim-pool
    attacks); when such a receiver is itself the requester of a requester-model attack, its own
    attack is run for it too (what it answers that attacker: ``_victims``). Each
    attack follows its docstring in ``attacks/``; random draws come from the same generators
    (``seeding.generator`` keyed by seed, attacker id, purpose, name salt and counters), made once
    per distinct key and round, so stacked runs with the same agent ids share them.
    """

    def __init__(self, b: Batch, receivers: np.ndarray, slots: np.ndarray) -> None:
        configs = b.configs
        self.rows, self.slots = receivers, slots
        senders = b.nbr[receivers, slots]
        self.senders = senders
        self.pairs = len(senders)
        spec: dict[int, Sender] = {a: sender_of(configs[a]) for a in sorted(set(senders.tolist()))}
        self.spec = spec
        kind = np.array([spec[a].kind for a in senders.tolist()], dtype=object)
        self.by_kind = {k: np.flatnonzero(kind == k) for k in sorted(set(kind.tolist()))}
        # Requester-model attacks: the attacker can fetch the requester's model iff it lists it.
        listed = {(a, n) for a in spec for n in configs[a].neighbors}
        self.route = np.array(
            [(a, configs[r].id) in listed for a, r in zip(senders.tolist(), receivers.tolist(), strict=True)],
            dtype=bool,
        )
        # ... and when the requester is an attacker (a pool attacker: attack_kinds), it is served
        # what that attacker serves everyone this round: its attack is run for it too.
        requesting = np.isin(kind, (*REQUESTER_ATTACKS, *VICTIM_POOL_ATTACKS))
        needs = requesting & self.route & b.byzantine[receivers]
        for r in sorted(set(receivers[needs].tolist())):
            spec.setdefault(r, sender_of(configs[r]))
        self._last_victim: dict[str, np.ndarray] = {}  # per kind: last round's requester models
        on_off = sorted(a for a, sp in spec.items() if sp.on_off is not None)
        self.on_off_senders = np.array(on_off, dtype=np.intp)
        self.on_off_pairs = np.flatnonzero(np.isin(senders, self.on_off_senders))

        # Random draws: one generator per distinct (seed, attacker id, salt, counters) and round.
        self.draw_keys: dict[str, tuple[np.ndarray, list[tuple[Any, ...]], str]] = {}
        for k in _DRAWN:
            idx = self.by_kind.get(k)
            if idx is None or not len(idx):
                continue
            keys: dict[tuple[Any, ...], int] = {}
            where = np.empty(len(idx), dtype=np.intp)
            for j, (a, r) in enumerate(zip(senders[idx].tolist(), receivers[idx].tolist(), strict=True)):
                cfg, p = configs[a], spec[a].params
                requester = configs[r].id if p.redraw == "request" else None
                key = (cfg.seed, cfg.id, p.redraw, requester, *_draw_args(k, p))
                where[j] = keys.setdefault(key, len(keys))
            self.draw_keys[k] = (where, list(keys), k)
        self._never: dict[tuple[Any, ...], np.ndarray] = {}
        self._by_row: dict[str, np.ndarray] = {}

        # Pool attacks: which rows' pools, and for mimic each row's neighbour slots by id.
        self.pool_rows = np.array(
            sorted(a for a, sp in spec.items() if sp.kind in ("ipm", "alie", "min-max", "min-sum")),
            dtype=np.intp,
        )
        self.mimic_rows = np.array(sorted(a for a, sp in spec.items() if sp.kind == "mimic"), dtype=np.intp)
        self.mimic_order = np.zeros((len(self.mimic_rows), b.width), dtype=np.intp)
        self.mimic_valid = np.zeros((len(self.mimic_rows), b.width), dtype=bool)
        for j, a in enumerate(self.mimic_rows.tolist()):
            ids = b.slot_ids[a]
            target = spec[a].params.target
            order = [s for s in sorted(range(1, len(ids)), key=lambda s: ids[s]) if target in (None, ids[s])]
            self.mimic_order[j, : len(order)] = order
            self.mimic_valid[j, : len(order)] = True
        # Stale: the senders' own honest models of every round so far.
        self.stale_rows = np.array(sorted(a for a, sp in spec.items() if sp.kind == "stale"), dtype=np.intp)
        self.history: list[np.ndarray] = []
        self.window = max(
            [int(sp.params.window) for sp in spec.values() if sp.kind in ("loss-budget", "adaptive")],
            default=1,
        )
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        self.b = b

    def _draws(self, kind: str, round_: int) -> np.ndarray:
        """(pairs of ``kind``, 2): each pair's draw this round."""
        where, keys, _ = self.draw_keys[kind]
        dist, _, _, salted = _DRAWN[kind]
        values = np.empty((len(keys), 2))
        for j, key in enumerate(keys):
            seed, agent, redraw, requester, first, second = key
            if redraw == "never" and key in self._never:
                values[j] = self._never[key]
                continue
            rng = draw_generator(seed, agent, kind, redraw, round_, requester or "", salted=salted)
            values[j] = rng.uniform(first, second, 2) if dist == "uniform" else rng.normal(first, second, 2)
            if redraw == "never":
                self._never[key] = values[j]
        return values[where]

    def crafted(
        self, round_: int, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """((pairs, 2) models served, (pairs,) withheld): what each pair's sender serves this round.

        ``psi`` is every agent's honest model of this round; ``prev`` what every row received and
        which slots were present in the previous round (None in round 1)."""
        b = self.b
        if len(self.stale_rows):
            self.history.append(psi[self.stale_rows].copy())
        self.samples.append(b.sample(round_))
        self.samples = self.samples[-self.window :]
        out = np.empty((self.pairs, 2))
        withheld = np.zeros(self.pairs, dtype=bool)
        senders = self.senders
        h = psi[senders]
        for kind, idx in self.by_kind.items():
            a, own = senders[idx], h[idx]
            if kind in _DRAWN:
                draws = self._draws(kind, round_)
                if kind == "constant" or kind == "gaussian":
                    out[idx] = draws
                elif kind == "small-perturbation":
                    out[idx] = ka.perturbed(own, draws)
                else:
                    out[idx] = ka.scaled(own, draws)
            elif kind == "nan":
                out[idx] = math.nan
            elif kind == "omission":
                out[idx] = 0.0
                withheld[idx] = True
            elif kind == "sign-flip":
                out[idx] = ka.sign_flip(own, self._param(a, "scale")[:, None])
            elif kind in POOL_ATTACKS:
                out[idx] = self._pool_attack(kind, a, psi, prev)
            elif kind in VICTIM_POOL_ATTACKS:
                victim, known = self._victims(kind, idx, psi, prev, round_)
                out[idx] = self._against_victim(kind, idx, psi, victim, known, prev)
            elif kind == "low-loss":
                out[idx] = self._low_loss(a, own)
            elif kind == "adaptive":  # mtl_node/batched/adaptive_sender.py
                victim, known = self._victims(kind, idx, psi, prev, round_)
                out[idx] = adaptive(self, idx, psi, victim, known, prev, round_)
            elif kind == "stale":
                lag = self._param(a, "lag").astype(np.intp)
                back = ka.stale_round(round_, lag)
                pos = np.searchsorted(self.stale_rows, a)
                hist = np.stack(self.history)  # (rounds so far, stale senders, 2)
                out[idx] = hist[back - 1, pos]
            else:  # requester-model attacks
                victim, known = self._victims(kind, idx, psi, prev, round_)
                base = np.where(known[:, None], victim, own)
                if kind == "echo":
                    out[idx] = base
                elif kind == "distance-capture":
                    out[idx] = ka.towards(base, self._goal(a), self._param(a, "r")[:, None])
                else:
                    out[idx] = self._loss_budget(a, base, round_)
        if len(self.on_off_pairs):
            quiet = np.array(
                [not self.spec[a].attacking(round_) for a in senders[self.on_off_pairs].tolist()], dtype=bool
            )
            idx = self.on_off_pairs[quiet]
            out[idx] = h[idx]
            withheld[idx] = False
        return out, withheld

    def _goal(self, senders: np.ndarray) -> np.ndarray:
        """(senders, 2): each sender's goal model (one value for both coordinates, or both)."""
        if "goal" not in self._by_row:
            table = np.zeros((self.b.n, 2))
            for a, sp in self.spec.items():
                if hasattr(sp.params, "goal"):
                    table[a] = np.broadcast_to(np.asarray(sp.params.goal, dtype=np.float64), (2,))
            self._by_row["goal"] = table
        return self._by_row["goal"][senders]

    def _param(self, senders: np.ndarray, name: str, neg: bool = False) -> np.ndarray:
        """A numeric attack parameter of each sender (looked up once per run, then gathered)."""
        if name not in self._by_row:
            table = np.full(self.b.n, math.nan)
            for a, sp in self.spec.items():
                if hasattr(sp.params, name):
                    table[a] = float(getattr(sp.params, name))
            self._by_row[name] = table
        values = self._by_row[name][senders]
        return -values if neg else values

    def _pool(
        self, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population std of H = [h] + [models fetched last round], per pool row."""
        rows = self.pool_rows
        own = psi[rows]
        if prev is None:
            return own, np.zeros_like(own)
        received, present = prev
        return ka.pool_moments(own, received[rows], present[rows] & self.b.neighbours[rows])

    def _min_max(
        self, kind: str, senders: np.ndarray, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """min-max / min-sum over H = [h] + [models fetched last round], per sender of ``kind``."""
        rows = senders
        H = psi[rows][:, None, :]
        mask = np.ones((len(rows), 1), dtype=bool)
        if prev is not None:
            received, present = prev
            H = np.concatenate([H, received[rows]], axis=1)
            mask = np.concatenate([mask, present[rows] & self.b.neighbours[rows]], axis=1)
        objective = "max" if kind == "min-max" else "sum"
        direction = np.array([self.spec[a].params.direction for a in rows.tolist()], dtype=object)
        out = np.empty((len(rows), H.shape[2]))
        for d in sorted(set(direction.tolist())):
            sel = direction == d
            gamma, iters = self._param(rows[sel], "gamma_init"), self._param(rows[sel], "iters")
            out[sel] = ka.min_max(H[sel], mask[sel], d, objective, gamma, iters.astype(np.intp))[0]
        return out

    def _pool_attack(
        self, kind: str, a: np.ndarray, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """(len(a), 2): what the pool attackers ``a`` (all of ``kind``) serve every requester."""
        if kind in ("ipm", "alie"):
            mean, std = self._pool(psi, prev)
            pos = np.searchsorted(self.pool_rows, a)
            if kind == "ipm":
                return ka.ipm(mean[pos], self._param(a, "epsilon")[:, None])
            sign, z = self._param(a, "sign")[:, None], self._param(a, "z")[:, None]
            return ka.alie(mean[pos], std[pos], sign, z)
        if kind in ("min-max", "min-sum"):
            return self._min_max(kind, a, psi, prev)
        return self._mimic(psi, prev)[np.searchsorted(self.mimic_rows, a)]

    def _victims(
        self,
        kind: str,
        idx: np.ndarray,
        psi: np.ndarray,
        prev: tuple[np.ndarray, np.ndarray] | None,
        round_: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """((pairs, 2) requester models, (pairs,) known) for the pairs ``idx`` of a requester-model
        attack, as ``attacks._common.victim_model`` finds them: what the requester serves the
        attacker this round (a normal agent its model; a pool attacker its attack, or its model in
        an on-off attacker's quiet round), fetched when the attacker lists it and valid (finite),
        else what it served the attacker last round if that was valid, else unknown."""
        b = self.b
        r = self.rows[idx]
        victim = psi[r].copy()
        byz = b.byzantine[r] & self.route[idx]  # only these are asked (pool attackers: attack_kinds)
        if byz.any():
            rows = r[byz]
            served = victim[byz]
            kinds = np.array([self.spec[x].kind for x in rows.tolist()], dtype=object)
            for k in sorted(set(kinds.tolist())):
                sel = kinds == k
                served[sel] = self._pool_attack(k, rows[sel], psi, prev)
            quiet = np.array([not self.spec[x].attacking(round_) for x in rows.tolist()], dtype=bool)
            served[quiet] = psi[rows[quiet]]
            victim[byz] = served
        fetched = self.route[idx] & np.isfinite(victim).all(axis=1)
        last = self._last_victim.get(kind)
        self._last_victim[kind] = victim.copy()
        if last is None:
            return victim, fetched
        earlier = self.route[idx] & ~fetched & np.isfinite(last).all(axis=1)
        victim[earlier] = last[earlier]
        return victim, fetched | earlier

    def _against_victim(
        self,
        kind: str,
        idx: np.ndarray,
        psi: np.ndarray,
        victim: np.ndarray,
        known: np.ndarray,
        prev: tuple[np.ndarray, np.ndarray] | None,
    ) -> np.ndarray:
        """dissensus / rop (attacks/disagreement.py) for the pairs ``idx``: built from the
        requester's model (``victim`` where ``known``; else the honest model is served) and what
        the attacker fetched last round (for dissensus, less the requester's own slot)."""
        b = self.b
        a, r = self.senders[idx], self.rows[idx]
        own = psi[a]
        if prev is None:
            X, mask = np.zeros((len(a), 0, own.shape[1])), np.zeros((len(a), 0), dtype=bool)
        else:
            received, present = prev
            X, mask = received[a], present[a] & b.neighbours[a]
        if kind == "dissensus":
            if X.shape[1]:
                mask = mask & (b.nbr[a] != r[:, None])
            x = ka.dissensus(victim, X, mask, self._param(a, "eps"), self._param(a, "byzantine"))
        else:
            mean, std = ka.pool_moments(own, X, mask)
            angle = np.deg2rad(self._param(a, "angle"))
            x = ka.rop(victim, mean, std, self._param(a, "relocation"), angle, self._param(a, "z"))
        return np.where(known[:, None], x, own)

    def _mimic(self, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Per mimic row: the model fetched last round from its target (the smallest id present)."""
        rows = self.mimic_rows
        out = psi[rows].copy()
        if prev is None:
            return out
        received, present = prev
        ok = self.mimic_valid & np.take_along_axis(present[rows], self.mimic_order, axis=1)
        has = ok.any(axis=1)
        first = np.take_along_axis(self.mimic_order, ok.argmax(axis=1)[:, None], axis=1)[:, 0]
        out[has] = received[rows[has], first[has]]
        return out

    def _low_loss(self, senders: np.ndarray, own: np.ndarray) -> np.ndarray:
        """``steps`` more LMS steps of the attacker's task on its own sample of the round."""
        b = self.b
        u, d = self.samples[-1]
        x, mu = b.x[senders], b.mu[senders]
        steps = self._param(senders, "steps").astype(np.intp)
        w = own.copy()
        for step in range(int(steps.max(initial=0))):
            w = np.where((step < steps)[:, None], tl.adapt(w, x, mu, u[senders], d[senders]), w)
        return w

    def _loss_budget(self, senders: np.ndarray, base: np.ndarray, round_: int) -> np.ndarray:
        """Bisection on the step towards the goal within the proxy-loss budget (attacks/capture.py)."""
        b = self.b
        goal = self._goal(senders)
        slack = self._param(senders, "slack")
        iters = self._param(senders, "iters").astype(np.intp)
        window = self._param(senders, "window").astype(np.intp)

        def proxy(w: np.ndarray) -> np.ndarray:
            return proxy_losses(self.samples, b.x, senders, w, round_, window)

        def towards(step: np.ndarray) -> np.ndarray:
            return ka.towards(base, goal, step[:, None])

        budget = slack * proxy(base)
        ok_budget = np.isfinite(budget)

        def feasible(step: np.ndarray) -> np.ndarray:
            loss = proxy(towards(step))
            return np.isfinite(loss) & (loss <= budget)

        step = ka.budget_step(feasible, iters)
        out = np.where((step > 0)[:, None], towards(step), base)
        return np.where(ok_budget[:, None], out, base)
