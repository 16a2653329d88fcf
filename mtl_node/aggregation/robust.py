"""Robust-aggregation baselines, applied per agent over its neighbourhood (DESIGN §1).

Each rule sees the models of the neighbourhood members that arrived (the agent itself first) as
flattened float64 vectors; members whose model is missing are left out before any of the maths, so
``n`` below is always the number of *present* members, the agent itself included.

=================  ===================================================  ==========================
rule               new model                                            assumption (n members)
=================  ===================================================  ==========================
median             coordinate-wise median                               n >= 2f + 1
trimmed-mean       per coordinate, drop the f largest and f smallest    n >= 2f + 1
                   values, average the n - 2f left
krum               the member whose n - f - 2 nearest other members     n >= 2f + 3
                   are closest (sum of squared distances); ties: first
geometric-median   Weiszfeld iterations from the coordinate-wise        n >= 2f + 1
                   median (``weiszfeld_iters``, distances floored at
                   ``weiszfeld_eps``)
self-clipping      psi_k + (1/n) sum_l clip(psi_l - psi_k, tau):        none (each neighbour moves
                   centred clipping around the agent's *own* model      the model at most tau/n)
=================  ===================================================  ==========================

``f`` (``RuleParams.f``) is the number of Byzantine neighbours the rule is meant to withstand. These
rules were made for *consensus* (one shared model); in multi-task learning a neighbour with another
task looks just like an outlier, so they also pull an agent towards other tasks. That is the paper's
point against them, and what docs/robustness.md measures.

Two places check the assumptions: :func:`check_neighbourhood` when a topology is planned (a
ConfigError naming the fix), and every round on the members actually present (a neighbour may be
missing): with too few, the agent keeps its own model and the decision log says why. A combined
model that is not finite (overflow from crafted huge models) is likewise replaced by the agent's own.

Decisions: median, trimmed-mean and geometric-median mark every present member ``accepted`` with
weight 1/n; they contribute through a robust statistic, not a weighted sum, so the weight only says
who was part of it. Krum accepts the member it selects (weight 1) and marks the others ``filtered``
(the agent itself included when another member is selected). Self-clipping accepts every member
with weight 1/n and says in the reason when a pull was clipped.

The maths is written once, over batches of neighbourhoods (``(rows, slots, dim)`` arrays and a
``present`` mask), so that the vectorized engine (mtl_node/batched.py) runs the very same kernels
on every agent at once; a rule here calls them with one row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mtl_node.aggregation.base import (
    RULES,
    Aggregation,
    Candidate,
    NeighborDecision,
    Rule,
    RuleParams,
)
from mtl_node.errors import ConfigError

NAN = math.nan

# Members each rule needs, as (multiplier of f, constant): n >= a*f + b.
_REQUIREMENTS: dict[str, tuple[int, int]] = {
    "median": (2, 1),
    "trimmed-mean": (2, 1),
    "geometric-median": (2, 1),
    "krum": (2, 3),
    "self-clipping": (0, 1),
}
ROBUST_RULES = tuple(_REQUIREMENTS)


def required_members(rule: str, f: int) -> int | None:
    """The fewest members (the agent included) ``rule`` needs with ``f``; None: not a robust rule."""
    if rule not in _REQUIREMENTS:
        return None
    a, b = _REQUIREMENTS[rule]
    return a * f + b


def max_f(rule: str, members: int) -> int | None:
    """The largest f that ``members`` members admit for ``rule`` (-1: none; None: f not used)."""
    if rule not in _REQUIREMENTS:
        return None
    a, b = _REQUIREMENTS[rule]
    if a == 0:
        return None
    return (members - b) // a


def _formula(rule: str) -> str:
    a, b = _REQUIREMENTS[rule]
    return f"{a}f+{b}" if a else str(b)


def too_few_reason(rule: str, f: int, present: int) -> str | None:
    """The run-time fallback's reason when ``present`` members are too few, else None."""
    need = required_members(rule, f)
    if need is None or present >= need:
        return None
    return f"{rule} needs {need} members ({_formula(rule)}, f={f}), {present} present; keeping own model"


NOT_FINITE_REASON = "combined model not finite; keeping own model"


def check_neighbourhood(
    rule: str, params: RuleParams, degree: int, agent: str | None = None, field: str = "rule"
) -> None:
    """Raise ConfigError when an agent with ``degree`` neighbours (itself not counted) cannot run
    ``rule`` with ``params``: the topology-time check of the rule's assumption."""
    need = required_members(rule, params.f)
    if need is None or degree + 1 >= need:
        return
    who = f"agent {agent}" if agent else "an agent"
    fewest_f = max_f(rule, degree + 1)
    fixes = [f"give every normal agent at least {need - 1} neighbours (e.g. a denser graph)"]
    if fewest_f is not None and fewest_f >= 0:
        fixes.append(f"assume fewer Byzantine neighbours (rule_params.f <= {fewest_f})")
    fixes.append("or use a rule without this assumption (loss-filtered, self-clipping)")
    raise ConfigError(
        field,
        f"{rule} with f={params.f} needs {need} neighbourhood members ({_formula(rule)}, the agent "
        f"included) but {who} has {degree} neighbour{'s' if degree != 1 else ''}",
        "; ".join(fixes),
    )


def check_topology(
    rules: Sequence[str], params: RuleParams, degrees: Mapping[str, int], field: str = "rule"
) -> None:
    """:func:`check_neighbourhood` for every rule and every (normal) agent id -> its degree.

    ``field="rules"`` names the offending entry of a rule list (``rules.2``) in the error."""
    for i, rule in enumerate(rules):
        where = f"rules.{i}" if field == "rules" else field
        for agent, degree in degrees.items():
            check_neighbourhood(rule, params, degree, agent, where)


# -- kernels over batches of neighbourhoods ------------------------------------------------------------
#
# X: (rows, slots, dim) float64, present: (rows, slots) bool with slot 0 (the agent) always present.
# Absent slots may hold anything finite; they never reach a result.


def norms(v: np.ndarray) -> np.ndarray:
    """Euclidean norms over the last axis, without overflow or underflow for finite vectors: the
    plain sqrt(sum v^2) where the sum is a normal float, rescaled by max |v| where it is not."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        sq = (v * v).sum(axis=-1)
        out = np.sqrt(sq)
        if np.isfinite(sq).all() and sq.min(initial=np.inf) >= 1e-290:
            return out
        bad = ~np.isfinite(sq) | (sq < 1e-290)
        w = v[bad]
        scale = np.abs(w).max(axis=-1)
        safe = np.where(scale > 0.0, scale, 1.0)
        out[bad] = scale * np.sqrt(((w / safe[..., None]) ** 2).sum(axis=-1))
    return out


def _sorted_present(X: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each coordinate's values sorted over the slots, absent slots last (as +inf)."""
    return np.sort(np.where(present[:, :, None], X, np.inf), axis=1)


def _take(sorted_: np.ndarray, rank: np.ndarray) -> np.ndarray:
    return np.take_along_axis(sorted_, rank[:, None, None], axis=1)[:, 0, :]


def coordinate_median(X: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(rows, dim): the median of each coordinate over the present members (mean of the middle two
    for an even count, written so that it cannot overflow)."""
    s = _sorted_present(X, present)
    n = present.sum(axis=1)
    return 0.5 * _take(s, (n - 1) // 2) + 0.5 * _take(s, n // 2)


def trimmed_mean(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows, dim): per coordinate, the mean of the present values less the f smallest and f
    largest (``f`` per row; needs n >= 2f + 1)."""
    s = _sorted_present(X, present)
    n = present.sum(axis=1)
    rank = np.arange(X.shape[1])[None, :]
    keep = (rank >= f[:, None]) & (rank < (n - f)[:, None])
    total = np.where(keep[:, :, None], s, 0.0).sum(axis=1)
    return total / (n - 2 * f)[:, None]


def pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    """(rows, slots, slots): ||X_i - X_j||^2. Small problems at once, large models one slot at a time
    (memory rows*slots*dim); each entry is the same sum over the last axis either way."""
    rows, slots, dim = X.shape
    if rows * slots * slots * dim <= 1 << 24:
        diff = X[:, :, None, :] - X[:, None, :, :]
        return (diff * diff).sum(axis=-1)
    out = np.empty((rows, slots, slots))
    for i in range(slots):
        diff = X - X[:, i : i + 1, :]
        out[:, i, :] = (diff * diff).sum(axis=-1)
    return out


def krum_scores(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows, slots): each present member's sum of squared distances to its n - f - 2 nearest other
    present members (+inf for absent slots). Summed in order with cumsum so that every engine gets
    bit-identical scores, and so the same member, on ties."""
    d2 = pairwise_sq_distances(X)
    slots = X.shape[1]
    other = present[:, None, :] & ~np.eye(slots, dtype=bool)[None, :, :]
    d2 = np.sort(np.where(other, d2, np.inf), axis=2)
    m = present.sum(axis=1) - f - 2  # >= f + 1 >= 1 when n >= 2f + 3
    cums = np.cumsum(d2, axis=2)
    idx = np.clip(m - 1, 0, slots - 1)
    scores = np.take_along_axis(cums, np.broadcast_to(idx[:, None, None], (X.shape[0], slots, 1)), axis=2)
    return np.where(present, scores[:, :, 0], np.inf)


def krum_select(X: np.ndarray, present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(rows,): the slot Krum selects (the first on ties; the agent itself if no score is finite)."""
    scores = krum_scores(X, present, f)
    chosen = np.argmin(scores, axis=1)
    finite_any = np.isfinite(scores).any(axis=1)
    return np.where(finite_any, chosen, 0)


def geometric_median(X: np.ndarray, present: np.ndarray, iters: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(rows, dim): Weiszfeld's iterations z <- sum w_l X_l / sum w_l with w_l = 1/max(||X_l - z||, eps),
    from the coordinate-wise median, ``iters`` times per row (a fixed count, no early stop: every
    engine does exactly the same arithmetic)."""
    z = coordinate_median(X, present)
    for it in range(int(iters.max(initial=0))):
        d = norms(X - z[:, None, :])
        w = np.where(present, 1.0 / np.maximum(d, eps[:, None]), 0.0)
        new = (w[:, :, None] * X).sum(axis=1) / w.sum(axis=1)[:, None]
        z = np.where((it < iters)[:, None], new, z)
    return z


def self_clip(X: np.ndarray, present: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((rows, dim) new models, (rows, slots) pull scales): psi_k + (1/n) sum_l clip(psi_l - psi_k, tau),
    clip(v, tau) = s v with s = min(1, tau/||v||). The scale is 0 for absent slots and for a pull
    whose length is not finite (left out). Since the result is (1 - sum_l s_l/n) psi_k +
    sum_l (s_l/n) psi_l, the members' effective weights are s_l/n and the agent's own the rest."""
    v = X - X[:, :1, :]
    length = norms(v)
    ok = present & np.isfinite(length)
    clipped = ok & (length > tau[:, None])
    scale = np.where(clipped, tau[:, None] / np.where(clipped, length, 1.0), np.where(ok, 1.0, 0.0))
    pull = (scale[:, :, None] * np.where(ok[:, :, None], v, 0.0)).sum(axis=1)
    n = present.sum(axis=1)
    return X[:, 0, :] + pull / n[:, None], scale


# -- the rules -----------------------------------------------------------------------------------------


def _loss(c: Candidate) -> float:
    return c.loss if c.loss is not None else NAN


def _missing(c: Candidate) -> NeighborDecision:
    return NeighborDecision(c.agent_id, "missing", 0.0, NAN, NAN, c.missing_reason or "missing")


def keep_own(candidates: Sequence[Candidate], reason: str) -> Aggregation:
    """The run-time fallback: the agent keeps its own model; present neighbours are filtered."""
    own = candidates[0]
    decisions = [NeighborDecision(own.agent_id, "accepted", 1.0, NAN, _loss(own), reason)]
    for c in candidates[1:]:
        if c.present:
            decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), reason))
        else:
            decisions.append(_missing(c))
    return Aggregation({own.agent_id: 1.0}, decisions)


class _RobustRule(Rule):
    """Shared plumbing: collect the present members' vectors, check the assumption, run a kernel."""

    needs_models = True

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        present = [c for c in candidates if c.present]
        reason = too_few_reason(self.name, self.params.f, len(present))
        if reason is not None:
            return keep_own(candidates, reason)
        vectors = []
        for c in present:
            if c.model is None:
                raise ValueError(f"{self.name}: member {c.agent_id} has no model (needs_models)")
            vectors.append(np.asarray(c.model, dtype=np.float64))
        X = np.stack(vectors)[None, :, :]
        mask = np.ones((1, len(present)), dtype=bool)
        # Overflow is a legitimate input (a crafted 1e308 model): the result is checked instead.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self.combine(candidates, present, X, mask)

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        raise NotImplementedError

    def _statistic(
        self, candidates: Sequence[Candidate], present: list[Candidate], combined: np.ndarray
    ) -> Aggregation:
        """Every present member accepted with weight 1/n; the new model is ``combined``."""
        if not np.isfinite(combined).all():
            return keep_own(candidates, NOT_FINITE_REASON)
        w = 1.0 / len(present)
        decisions = [
            NeighborDecision(c.agent_id, "accepted", w, NAN, _loss(c)) if c.present else _missing(c)
            for c in candidates
        ]
        return Aggregation({c.agent_id: w for c in present}, decisions, combined=combined)


@RULES.register("median")
class Median(_RobustRule):
    name = "median"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        return self._statistic(candidates, present, coordinate_median(X, mask)[0])


@RULES.register("trimmed-mean")
class TrimmedMean(_RobustRule):
    name = "trimmed-mean"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        f = np.array([self.params.f])
        return self._statistic(candidates, present, trimmed_mean(X, mask, f)[0])


@RULES.register("geometric-median")
class GeometricMedian(_RobustRule):
    name = "geometric-median"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        p = self.params
        z = geometric_median(X, mask, np.array([p.weiszfeld_iters]), np.array([p.weiszfeld_eps]))
        return self._statistic(candidates, present, z[0])


@RULES.register("krum")
class Krum(_RobustRule):
    name = "krum"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        chosen = present[int(krum_select(X, mask, np.array([self.params.f]))[0])].agent_id
        why = f"krum selected {chosen}"
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif c.agent_id == chosen:
                decisions.append(NeighborDecision(c.agent_id, "accepted", 1.0, NAN, _loss(c)))
            else:
                decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), why))
        return Aggregation({chosen: 1.0}, decisions)


@RULES.register("self-clipping")
class SelfClipping(_RobustRule):
    name = "self-clipping"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        tau = self.params.clip_tau
        z, scales = self_clip(X, mask, np.array([tau]))
        if not np.isfinite(z).all():
            return keep_own(candidates, NOT_FINITE_REASON)
        n = len(present)
        scale = dict(zip([c.agent_id for c in present], scales[0].tolist(), strict=True))
        weights = {c.agent_id: scale[c.agent_id] / n for c in present[1:] if scale[c.agent_id] > 0.0}
        weights = {candidates[0].agent_id: 1.0 - math.fsum(weights.values()), **weights}
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif scale[c.agent_id] == 0.0:
                decisions.append(NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), UNBOUNDED))
            else:
                why = clip_reason(tau) if scale[c.agent_id] < 1.0 else ""
                decisions.append(
                    NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], NAN, _loss(c), why)
                )
        return Aggregation(weights, decisions, combined=z[0])


UNBOUNDED = "pull not finite"


def clip_reason(tau: float) -> str:
    return f"pull clipped to tau={tau:.4g}"
