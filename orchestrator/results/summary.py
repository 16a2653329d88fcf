"""summary.json: per rule, over normal agents, mean/min/max of each metric averaged over the final
window of rounds (the paper's way of comparing rules), computed columnar with numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.results.layout import COUNTS, DEFAULT_WINDOW, METRICS, PlanLike
from orchestrator.results.reader import MetricsTable, read_metrics_table


def window_bounds(rounds: int, window_share: float = DEFAULT_WINDOW) -> tuple[int, int]:
    """(first, last) round of the final window, inclusive, rounds numbered 1..rounds; never empty.

    500 rounds with share 0.2 -> (401, 500); 3 rounds with share 0.2 -> (3, 3).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < window_share <= 1:
        raise ValueError(f"window share must be in (0, 1], got {window_share}")
    # The epsilon keeps 500 * 0.2 == 100.00000000000001 from becoming 101 rounds.
    n = min(rounds, max(1, math.ceil(rounds * window_share - 1e-9)))
    return rounds - n + 1, rounds


def summarize(
    metrics: Sequence[Mapping[str, Any]] | Path | str | MetricsTable,
    plan: PlanLike,
    *,
    backend: str | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The summary.json dict: per rule, stats over normal agents of window-averaged metrics.

    ``plan`` gives rounds and window share (and name/seed/rules when it is a RunPlan or plan.json
    dict). A run that stopped early (fewer rounds recorded than planned) is summarized over the
    window of the rounds it completed and marked ``"partial": true``, so a crash still gets numbers.
    Non-finite statistics (a diverged agent) are written as null since JSON has no Infinity.
    """
    table = _as_table(metrics)
    planned = int(_plan_get(plan, "rounds"))
    share = float(_plan_get(plan, "window", DEFAULT_WINDOW))
    completed = int(table.round.max()) if len(table) else 0
    effective = min(planned, completed) if completed else planned
    first, last = window_bounds(max(effective, 1), share)

    plan_rules = [str(r) for r in (_plan_get(plan, "rules", ()) or ())]
    data_rules = sorted(set(np.unique(table.rule).tolist()) - set(plan_rules))
    rules = plan_rules + data_rules

    in_window = (table.round >= first) & (table.round <= last) & (table.role == "normal")
    rule_names, rule_idx = np.unique(table.rule[in_window], return_inverse=True)
    agent_names, agent_idx = np.unique(table.agent[in_window], return_inverse=True)
    n_agents = max(len(agent_names), 1)
    key = rule_idx * n_agents + agent_idx
    size = len(rule_names) * n_agents
    present = np.bincount(key, minlength=size).reshape(-1, n_agents) > 0

    per_rule: dict[str, dict[str, Any]] = {}
    stats_by_metric: dict[str, np.ndarray] = {}
    for metric in METRICS:
        v = table.values[metric][in_window]
        ok = ~np.isnan(v)
        sums = np.bincount(key[ok], weights=v[ok], minlength=size).reshape(-1, n_agents)
        counts = np.bincount(key[ok], minlength=size).reshape(-1, n_agents)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats_by_metric[metric] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    count_means: dict[str, np.ndarray] = {}
    for name in COUNTS:
        v = table.values[name][in_window]
        ok = ~np.isnan(v)
        sums = np.bincount(rule_idx[ok], weights=v[ok], minlength=len(rule_names))
        counts = np.bincount(rule_idx[ok], minlength=len(rule_names))
        with np.errstate(invalid="ignore", divide="ignore"):
            count_means[name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    index = {name: i for i, name in enumerate(rule_names.tolist())}
    for rule in rules:
        entry: dict[str, Any] = {"agents": 0}
        i = index.get(rule)
        if i is not None:
            entry["agents"] = int(present[i].sum())
            for metric in METRICS:
                per_agent = stats_by_metric[metric][i]
                per_agent = per_agent[~np.isnan(per_agent)]
                if len(per_agent):
                    entry[metric] = {
                        "mean": _finite(float(np.mean(per_agent))),
                        "min": _finite(float(np.min(per_agent))),
                        "max": _finite(float(np.max(per_agent))),
                    }
            for name in COUNTS:
                if not math.isnan(count_means[name][i]):
                    entry[name] = float(count_means[name][i])
        per_rule[rule] = entry

    summary: dict[str, Any] = {
        "topology": _plan_get(plan, "name", None),
        "backend": backend,
        "seed": _plan_get(plan, "seed", None),
        "rounds": planned,
        "window": [first, last],
        "wall_seconds": wall_seconds,
        "rules": per_rule,
    }
    if completed < planned:
        summary["partial"] = True
        summary["rounds_completed"] = completed
    return summary


def _as_table(metrics: Sequence[Mapping[str, Any]] | Path | str | MetricsTable) -> MetricsTable:
    if isinstance(metrics, MetricsTable):
        return metrics
    if isinstance(metrics, str | Path):
        return read_metrics_table(Path(metrics))
    return MetricsTable.from_rows(metrics)


def _plan_get(plan: PlanLike, name: str, *default: Any) -> Any:
    if isinstance(plan, Mapping):
        if name in plan:
            return plan[name]
    elif hasattr(plan, name):
        return getattr(plan, name)
    if default:
        return default[0]
    raise KeyError(f"plan has no {name!r}")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
