"""The Byzantine senders of a vectorized run: what each serves to each (receiver, slot) pair.

Every attack's maths is ``mtl_node.kernels.attacks`` (the attack classes in ``attacks/`` call the
same kernels); this module gathers the inputs for all pairs at once: random draws from the same
generators (``mtl_node.attack_api.draw_generator``), pools of last round's fetched models, the
requester's model, the attacker's own history. Long (~340 lines) because it is one class whose
parts share its per-run tables; splitting it would only pass them around.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mtl_node.attack_api import draw_generator, make_attack
from mtl_node.config import NodeConfig
from mtl_node.kernels import attacks as ka
from mtl_node.kernels import target_localization as tl

if TYPE_CHECKING:
    from mtl_node.batched.network import Batch

# Attacks the batched engine reproduces, by what they need each round.
_DRAWN = {  # name -> (distribution, first parameter, second parameter, name salt in the generator)
    "constant": ("uniform", "low", "high", False),
    "gaussian": ("normal", "mean", "std", True),
    "small-perturbation": ("normal", None, "std", True),
    "scaled": ("uniform", "low", "high", True),
}
POOL_ATTACKS = ("ipm", "alie", "mimic", "min-max", "min-sum")  # built from last round's fetch
REQUESTER_ATTACKS = ("echo", "distance-capture", "loss-budget")  # built from the requester's model
VICTIM_POOL_ATTACKS = ("dissensus", "rop")  # built from both
ATTACKS = (
    *_DRAWN,
    "nan",
    "omission",
    "sign-flip",
    *POOL_ATTACKS,
    *REQUESTER_ATTACKS,
    *VICTIM_POOL_ATTACKS,
    "low-loss",
    "stale",
    "on-off",
)
HONEST = "honest"  # what an on-off attacker serves outside its attack rounds


@dataclass(frozen=True)
class _Sender:
    """One Byzantine agent's attack: ``kind`` and ``params`` of what it serves in attack rounds,
    ``on_off`` = (honest_rounds, attack_rounds) when it only attacks in some rounds."""

    kind: str
    params: Any
    on_off: tuple[int, int] | None

    def attacking(self, round_: int) -> bool:
        return self.on_off is None or ka.on_off_attacking(round_, *self.on_off)


def sender_of(cfg: NodeConfig) -> _Sender:
    key = (cfg.seed, cfg.id, cfg.attack, repr(sorted(cfg.attack_params.items())))
    got = _SENDERS.get(key)
    if got is None:
        got = _SENDERS[key] = _make_sender(cfg)
    return got


# Stacked runs repeat the same attackers: their parsed parameters are shared (they are immutable).
_SENDERS: dict[tuple[Any, ...], _Sender] = {}


def _make_sender(cfg: NodeConfig) -> _Sender:
    assert cfg.attack is not None
    attack = make_attack(cfg.attack, cfg.id, cfg.seed, cfg.attack_params)
    if cfg.attack == "on-off":
        p = attack.params
        inner = attack.inner  # type: ignore[attr-defined]
        return _Sender(inner.name, inner.params, (int(p.honest_rounds), int(p.attack_rounds)))  # type: ignore[attr-defined]
    return _Sender(cfg.attack, attack.params, None)


def attack_unsupported(configs: Sequence[NodeConfig]) -> str | None:
    """Why the batched engine cannot reproduce these configs' attacks, or None."""
    byzantine = {c.id: c for c in configs if c.attack is not None}
    kinds: dict[str, str] = {}
    for c in byzantine.values():
        if c.attack not in ATTACKS:
            return f"{c.id}: attack {c.attack!r} (only {', '.join(ATTACKS)})"
        try:
            sender = sender_of(c)
        except Exception as exc:  # an invalid attack is the per-agent engine's to report
            return f"{c.id}: attack {c.attack!r}: {exc}"
        if sender.kind not in ATTACKS or sender.kind == "on-off":
            return f"{c.id}: on-off around {sender.kind!r} (only {', '.join(ATTACKS[:-1])})"
        if sender.kind == "omission" and sender.params.mode != "refuse":
            return f"{c.id}: omission mode {sender.params.mode!r} (only refuse)"
        goal = getattr(sender.params, "goal", 0.0)
        if not isinstance(goal, int | float) and len(goal) != 2:
            return f"{c.id}: goal of {len(goal)} values (the model has 2)"
        kinds[c.id] = sender.kind
    # What an attacker crafting from the requester's model serves another attacker depends on
    # which of the two asks first; only attackers that use what they fetch would see it.
    for c in byzantine.values():
        if kinds[c.id] in (*POOL_ATTACKS, *VICTIM_POOL_ATTACKS):
            for n in c.neighbors:
                if kinds.get(n) in (*REQUESTER_ATTACKS, *VICTIM_POOL_ATTACKS):
                    return f"{c.id} ({kinds[c.id]}) fetches from {n} ({kinds[n]})"
    return None


class Attackers:
    """Every Byzantine sender's model for every (receiver, slot) pair that uses it, per round.

    Pairs are the slots of receivers that use what they fetch (cooperating normal agents) and of
    Byzantine receivers whose attack is built from what they fetched (ipm, alie, mimic). Each
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
        spec: dict[int, _Sender] = {a: sender_of(configs[a]) for a in sorted(set(senders.tolist()))}
        self.spec = spec
        kind = np.array([spec[a].kind for a in senders.tolist()], dtype=object)
        self.by_kind = {k: np.flatnonzero(kind == k) for k in sorted(set(kind.tolist()))}
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

        # Requester-model attacks: the attacker can fetch the requester's model iff it lists it.
        listed = {(a, n) for a in spec for n in configs[a].neighbors}
        self.route = np.array(
            [(a, configs[r].id) in listed for a, r in zip(senders.tolist(), receivers.tolist(), strict=True)]
        )
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
            [int(sp.params.window) for sp in spec.values() if sp.kind == "loss-budget"], default=1
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
        senders, receivers = self.senders, self.rows
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
            elif kind in ("ipm", "alie"):
                mean, std = self._pool(psi, prev)
                pos = np.searchsorted(self.pool_rows, a)
                if kind == "ipm":
                    out[idx] = ka.ipm(mean[pos], self._param(a, "epsilon")[:, None])
                else:
                    sign, z = self._param(a, "sign")[:, None], self._param(a, "z")[:, None]
                    out[idx] = ka.alie(mean[pos], std[pos], sign, z)
            elif kind in ("min-max", "min-sum"):
                out[idx] = self._min_max(kind, a, psi, prev)
            elif kind in VICTIM_POOL_ATTACKS:
                out[idx] = self._against_victim(kind, idx, psi, prev)
            elif kind == "mimic":
                copied = self._mimic(psi, prev)
                out[idx] = copied[np.searchsorted(self.mimic_rows, a)]
            elif kind == "low-loss":
                out[idx] = self._low_loss(a, own)
            elif kind == "stale":
                lag = self._param(a, "lag").astype(np.intp)
                back = ka.stale_round(round_, lag)
                pos = np.searchsorted(self.stale_rows, a)
                hist = np.stack(self.history)  # (rounds so far, stale senders, 2)
                out[idx] = hist[back - 1, pos]
            else:  # requester-model attacks
                base = np.where(self.route[idx][:, None], psi[receivers[idx]], own)
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

    def _against_victim(
        self, kind: str, idx: np.ndarray, psi: np.ndarray, prev: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """dissensus / rop (attacks/disagreement.py) for the pairs ``idx``: built from the
        requester's model (when the attacker lists it; else the honest model is served) and what
        the attacker fetched last round (for dissensus, less the requester's own slot)."""
        b = self.b
        a, r = self.senders[idx], self.rows[idx]
        own, victim = psi[a], psi[r]
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
        return np.where(self.route[idx][:, None], x, own)

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
        x = b.x[senders]

        def proxy(w: np.ndarray) -> np.ndarray:
            total = np.zeros(len(w))
            count = np.zeros(len(w))
            for back in range(len(self.samples) - 1, -1, -1):  # oldest first, as the attack sums
                r = round_ - back
                use = (r >= max(1, 0)) & (back < window) & (r >= 1)
                u, d = self.samples[len(self.samples) - 1 - back]
                res = tl.residual(w, x, u[senders], d[senders])
                total = np.where(use, total + res**2, total)
                count = count + use
            return total / count

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


def _draw_args(kind: str, p: Any) -> tuple[float, float]:
    _, first, second, _ = _DRAWN[kind]
    return (0.0 if first is None else float(getattr(p, first)), float(getattr(p, second)))
