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

The maths lives in ``mtl_node.kernels.robust``, written once over batches of neighbourhoods
(``(rows, slots, dim)`` arrays and a ``present`` mask), so that the vectorized engine
(mtl_node/batched/) runs the very same kernels on every agent at once; a rule here calls them
with one row and turns the result into decisions (reasons from ``mtl_node.kernels.decisions``).
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
from mtl_node.core.errors import ConfigError
from mtl_node.kernels import decisions as reasons
from mtl_node.kernels.robust import (
    coordinate_median,
    geometric_median,
    krum_select,
    self_clip,
    slot_sum,
    trimmed_mean,
)

NAN = math.nan

# Members each rule needs, as (multiplier of f, constant): n >= a*f + b.
_REQUIREMENTS: dict[str, tuple[int, int]] = {
    "median": (2, 1),
    "trimmed-mean": (2, 1),
    "geometric-median": (2, 1),
    "krum": (2, 3),
    "self-clipping": (0, 1),
}
ROBUST_RULES = tuple(_REQUIREMENTS)  # the robust baselines (the batched engine runs these)
# The decentralized defenses (decentralized.py) share the assumption checks.
_REQUIREMENTS |= {"clipped-gossip": (2, 2), "ios": (2, 1)}


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


class RobustRule(Rule):
    """Shared plumbing: collect the present members' vectors, check the assumption, run a kernel
    on them as one row of a batch (the layout the vectorized engine uses, or, with
    ``present_only``, the present members alone)."""

    needs_models = True
    present_only = False

    def aggregate(self, candidates: Sequence[Candidate]) -> Aggregation:
        present = [c for c in candidates if c.present]
        reason = too_few_reason(self.name, self.params.f, len(present))
        if reason is not None:
            return keep_own(candidates, reason)
        for c in present:
            if c.model is None:
                raise ValueError(f"{self.name}: member {c.agent_id} has no model (needs_models)")
        if self.present_only:
            X = np.stack([np.asarray(c.model, dtype=np.float64) for c in present])[None, :, :]
            mask = np.ones((1, len(present)), dtype=bool)
        else:
            # Every member in neighbourhood order, absent ones as zeros masked out.
            own = np.asarray(candidates[0].model, dtype=np.float64)
            X = np.stack(
                [
                    np.asarray(c.model, dtype=np.float64) if c.present else np.zeros_like(own)
                    for c in candidates
                ]
            )[None, :, :]
            mask = np.array([[c.present for c in candidates]])
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
            return keep_own(candidates, reasons.COMBINED_NOT_FINITE)
        w = 1.0 / len(present)
        decisions = [
            NeighborDecision(c.agent_id, "accepted", w, NAN, _loss(c)) if c.present else _missing(c)
            for c in candidates
        ]
        return Aggregation({c.agent_id: w for c in present}, decisions, combined=combined)


@RULES.register("median")
class Median(RobustRule):
    name = "median"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        return self._statistic(candidates, present, coordinate_median(X, mask)[0])


@RULES.register("trimmed-mean")
class TrimmedMean(RobustRule):
    name = "trimmed-mean"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        f = np.array([self.params.f])
        return self._statistic(candidates, present, trimmed_mean(X, mask, f)[0])


@RULES.register("geometric-median")
class GeometricMedian(RobustRule):
    name = "geometric-median"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        p = self.params
        z = geometric_median(X, mask, np.array([p.weiszfeld_iters]), np.array([p.weiszfeld_eps]))
        return self._statistic(candidates, present, z[0])


@RULES.register("krum")
class Krum(RobustRule):
    name = "krum"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        chosen = candidates[int(krum_select(X, mask, np.array([self.params.f]))[0])].agent_id
        why = reasons.krum_selected(chosen)
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
class SelfClipping(RobustRule):
    name = "self-clipping"

    def combine(
        self, candidates: Sequence[Candidate], present: list[Candidate], X: np.ndarray, mask: np.ndarray
    ) -> Aggregation:
        tau = self.params.clip_tau
        z, scales = self_clip(X, mask, np.array([tau]))
        if not np.isfinite(z).all():
            return keep_own(candidates, reasons.COMBINED_NOT_FINITE)
        row = scales[0] / len(present)  # effective weights s_l / n, the agent's own the rest
        own_weight = float(1.0 - slot_sum(row[None, 1:])[0])
        scale = dict(zip([c.agent_id for c in candidates], scales[0].tolist(), strict=True))
        weights = {c.agent_id: float(w) for c, w in zip(candidates[1:], row[1:], strict=True) if w > 0.0}
        weights = {candidates[0].agent_id: own_weight, **weights}
        decisions = []
        for c in candidates:
            if not c.present:
                decisions.append(_missing(c))
            elif scale[c.agent_id] == 0.0:
                decisions.append(
                    NeighborDecision(c.agent_id, "filtered", 0.0, NAN, _loss(c), reasons.PULL_NOT_FINITE)
                )
            else:
                why = reasons.pull_clipped(tau) if scale[c.agent_id] < 1.0 else ""
                decisions.append(
                    NeighborDecision(c.agent_id, "accepted", weights[c.agent_id], NAN, _loss(c), why)
                )
        return Aggregation(weights, decisions, combined=z[0])
