"""Paper-style figures and a markdown report from a results directory (DESIGN §3).

The figures follow Li, Abbas & Koutsoukos (NeurIPS 2020): per rule, the mean over normal agents as a
line and the min-max range over normal agents shaded, so one glance shows whether *every* normal agent
is protected, not just the average one. Losses go on a log scale (the rules differ by orders of
magnitude under attack), accuracy on a linear one.

Reads only files (plan.json, metrics.csv, optionally summary.json) and never imports torch, so a report
can be rendered anywhere the results directory is copied to. Figures are built with the object API on
the Agg canvas: no pyplot state leaks between calls, and it works headless.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the orchestrator renders on servers and in CI

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mtl_node.core import names
from mtl_node.core.errors import ConfigError
from orchestrator.results import (
    METRICS,
    METRICS_FILE,
    PLAN_FILE,
    SUMMARY_FILE,
    MetricsTable,
    read_metrics_table,
    summarize,
)

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
NETWORK_FILE = "network.png"
LABELS = {
    "loss": "Training loss",
    "test_loss": "Test loss",
    "test_accuracy": "Test accuracy",
    "attack_success": "Backdoor attack success",
}
DPI = 150
BYZANTINE_COLOR = "#d62728"
# tab10 without its red, which is reserved for Byzantine agents.
GROUP_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
GROUP_COLORS += ["#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"]
NO_GROUP_COLOR = "#4c72b0"


def write_report(results_dir: Path) -> list[Path]:
    """Write <metric>.png for each metric present, network.png and report.md; return their paths."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(
            str(results_dir), "is not a directory", "pass the --out directory of `mtl-orchestrate up`"
        )
    plan = _load_plan(results_dir / PLAN_FILE)
    table = read_metrics_table(results_dir / METRICS_FILE)
    if len(table) == 0:
        raise ConfigError(str(results_dir / METRICS_FILE), "has no rows: the run recorded no round")
    meta = _load_summary_meta(results_dir / SUMMARY_FILE)
    summary = summarize(table, plan, backend=meta.get("backend"), wall_seconds=meta.get("wall_seconds"))

    rules = list(summary["rules"])
    colors = rule_colors(rules)
    topology = str(plan.get("name") or results_dir.name)
    written: list[Path] = []
    present = [m for m in METRICS if np.any(~np.isnan(table.values[m][table.role == "normal"]))]
    for metric in present:
        path = results_dir / f"{metric}.png"
        plot_metric(table, metric, rules, colors, topology, path, window=tuple(summary["window"]))
        written.append(path)
    path = results_dir / NETWORK_FILE
    plot_network(plan, topology, path)
    written.append(path)
    path = results_dir / REPORT_FILE
    path.write_text(render_markdown(summary, plan, present, [p.name for p in written]))
    written.append(path)
    log.info("report written to %s (%d files)", results_dir, len(written))
    return written


# -- inputs -----------------------------------------------------------------------------------------


def _load_plan(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "not found", "point at the results directory of a run (--out of `up`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a JSON object (orchestrator.plan.RunPlan.to_json())")
    rounds = data.get("rounds")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"{path}: rounds", f"must be a positive integer, got {rounds!r}")
    window = data.get("window", 0.2)
    if not isinstance(window, int | float) or not 0 < window <= 1:
        raise ConfigError(f"{path}: window", f"must be a share in (0, 1], got {window!r}")
    agents = data.get("agents")
    if not isinstance(agents, list) or not all(isinstance(a, dict) and "id" in a for a in agents):
        raise ConfigError(f"{path}: agents", "must be a list of objects with an 'id'")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{path}: rules", f"must be a list of rule names, got {rules!r}")
    return data


def _load_summary_meta(path: Path) -> dict[str, Any]:
    """backend and wall time come from summary.json when `up` finished; the stats are recomputed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a JSON object")
    return {k: data.get(k) for k in ("backend", "wall_seconds")}


# -- figures ----------------------------------------------------------------------------------------


def rule_colors(rules: Sequence[str]) -> dict[str, str]:
    """One colour per rule, stable in plan order so every figure of a run agrees."""
    palette = [*GROUP_COLORS[:3], BYZANTINE_COLOR, *GROUP_COLORS[3:]]
    return {rule: palette[i % len(palette)] for i, rule in enumerate(rules)}


def band_by_round(table: MetricsTable, metric: str, rule: str) -> tuple[np.ndarray, ...]:
    """(rounds, mean, min, max) over normal agents with a value, per round, for one rule."""
    sel = (table.rule == rule) & (table.role == "normal")
    v = table.values[metric][sel]
    r = table.round[sel]
    ok = ~np.isnan(v)
    v, r = v[ok], r[ok]
    if not len(v):
        empty = np.empty(0)
        return empty, empty, empty, empty
    rounds, idx = np.unique(r, return_inverse=True)
    n = len(rounds)
    counts = np.bincount(idx, minlength=n)
    with np.errstate(invalid="ignore"):
        mean = np.bincount(idx, weights=v, minlength=n) / counts
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    np.minimum.at(lo, idx, v)
    np.maximum.at(hi, idx, v)
    return rounds, mean, lo, hi


def plot_metric(
    table: MetricsTable,
    metric: str,
    rules: Sequence[str],
    colors: Mapping[str, str],
    topology: str,
    path: Path,
    window: tuple[int, int] | None = None,
) -> None:
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    positive = True
    drawn = 0
    for rule in rules:
        rounds, mean, lo, hi = band_by_round(table, metric, rule)
        if not len(rounds):
            continue
        color = colors[rule]
        finite = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(rounds, lo, hi, where=finite, color=color, alpha=0.2, linewidth=0, interpolate=False)
        ax.plot(rounds, mean, color=color, linewidth=1.6, label=rule)
        positive &= bool(np.all(lo[finite] > 0))
        drawn += 1
    is_loss = metric not in ("test_accuracy", "attack_success")  # rates stay on a linear scale
    if is_loss and positive and drawn:
        ax.set_yscale("log")
    elif is_loss:
        log.warning("%s has values <= 0: plotted on a linear scale", metric)
    ax.set_xlabel("Round")
    if window is not None and window[0] > 1:
        # Faint marker of where the summary statistics are taken.
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="0.5", alpha=0.07, linewidth=0)
        ax.set_xlabel(f"Round (shaded: summary window {window[0]}-{window[1]})")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(f"{topology}: {LABELS.get(metric, metric).lower()} (normal agents)")
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        handles.append(_band_handle())
        labels.append("min-max band")
        ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    fig.savefig(path, dpi=DPI)


def _band_handle() -> Patch:
    return Patch(facecolor="0.5", alpha=0.3, edgecolor="none")


def layout(plan: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Plan positions when every agent has one, else a circle with task groups kept together."""
    agents = plan["agents"]
    positions = [a.get("position") for a in agents]
    if all(isinstance(p, list | tuple) and len(p) == 2 for p in positions):
        return {a["id"]: (float(p[0]), float(p[1])) for a, p in zip(agents, positions, strict=True)}
    order = sorted(
        range(len(agents)),
        key=lambda i: (agents[i].get("group") is None, agents[i].get("group") or 0, i),
    )
    n = max(len(agents), 1)
    coords: dict[str, tuple[float, float]] = {}
    for k, i in enumerate(order):
        angle = math.pi / 2 - 2 * math.pi * k / n
        coords[agents[i]["id"]] = (math.cos(angle), math.sin(angle))
    return coords


def plot_network(plan: Mapping[str, Any], topology: str, path: Path) -> None:
    agents = plan["agents"]
    pos = layout(plan)
    edges: set[tuple[str, str]] = set()
    unknown: set[str] = set()
    for a in agents:
        for nb in a.get("neighbors") or ():
            if nb not in pos:
                unknown.add(str(nb))
            elif nb != a["id"]:
                edges.add(tuple(sorted((a["id"], nb))))  # type: ignore[arg-type]
    if unknown:
        log.warning("plan.json names neighbours that are not agents: %s", ", ".join(sorted(unknown)))

    n = len(agents)
    size = 70.0 if n <= 30 else 38.0 if n <= 120 else 16.0
    fig = Figure(figsize=(6.0, 6.4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if edges:
        segments = [(pos[u], pos[v]) for u, v in sorted(edges)]
        ax.add_collection(LineCollection(segments, colors="0.78", linewidths=0.6, zorder=1))

    groups = sorted({a.get("group") for a in agents if a.get("group") is not None})
    group_color = {g: GROUP_COLORS[i % len(GROUP_COLORS)] for i, g in enumerate(groups)}
    handles: list[Any] = []
    for g in [*groups, None]:
        members = [a for a in agents if a.get("group") == g and a.get("role") != "byzantine"]
        if not members:
            continue
        xy = np.array([pos[a["id"]] for a in members])
        color = group_color.get(g, NO_GROUP_COLOR)
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=color, edgecolors="white", linewidths=0.6, zorder=2)
        label = f"task group {g}" if g is not None else "normal agent"
        handles.append(_marker("o", color, f"{label} ({len(members)})"))
    byz = [a for a in agents if a.get("role") == "byzantine"]
    if byz:
        xy = np.array([pos[a["id"]] for a in byz])
        ax.scatter(
            xy[:, 0], xy[:, 1], s=size * 1.6, c=BYZANTINE_COLOR, marker="X", edgecolors="black",
            linewidths=0.6, zorder=3,
        )  # fmt: skip
        handles.append(_marker("X", BYZANTINE_COLOR, f"Byzantine ({len(byz)})", edge="black"))
    if n <= 30:
        for a in agents:
            x, y = pos[a["id"]]
            ax.annotate(
                str(a["id"]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="0.25"
            )
    ax.margins(0.06)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(f"{topology}: {n} agents, {len(byz)} Byzantine, {len(edges)} links", fontsize=10)
    if not all(a.get("position") for a in agents):
        ax.set_axis_off()  # a circle has no meaningful coordinates
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False
        )
    fig.savefig(path, dpi=DPI)


def _marker(marker: str, color: str, label: str, edge: str = "white") -> Line2D:
    return Line2D(
        [], [], marker=marker, linestyle="", markerfacecolor=color, markeredgecolor=edge, markersize=8,
        label=label,
    )  # fmt: skip


# -- markdown ---------------------------------------------------------------------------------------


def render_markdown(
    summary: Mapping[str, Any], plan: Mapping[str, Any], metrics: Sequence[str], images: Sequence[str]
) -> str:
    agents = plan.get("agents", [])
    n_byz = sum(1 for a in agents if a.get("role") == "byzantine")
    first, last = summary["window"]
    share = float(plan.get("window", 0.2))
    wall = summary.get("wall_seconds")
    rounds = f"{summary['rounds']}"
    if summary.get("partial"):
        rounds += f" (stopped after round {summary.get('rounds_completed')})"
    lines = [
        f"# {summary.get('topology') or 'run'}",
        "",
        "| | |",
        "|---|---|",
        f"| topology | {summary.get('topology')} |",
        f"| task | {plan.get('task', '—')} |",
        f"| backend | {summary.get('backend') or '—'} |",
        f"| seed | {summary.get('seed')} |",
        f"| rounds | {rounds} |",
        f"| summary window | rounds {first}-{last} (last {share:.0%}) |",
        f"| agents | {len(agents)} ({len(agents) - n_byz} normal, {n_byz} Byzantine) |",
        f"| wall time | {_seconds(wall)} |",
        f"| rules | {', '.join(summary['rules'])} |",
        f"| attacks | {_attacks(agents)} |",
        "",
        "## Final-window metrics over normal agents",
        "",
        f"Each normal agent's metric is averaged over rounds {first}-{last}; the table gives the mean, "
        "min and max of those averages over the normal agents (Byzantine agents excluded).",
    ]
    for metric in metrics:
        lines += [
            "",
            f"### {LABELS.get(metric, metric)} (`{metric}`)",
            "",
            "| rule | normal agents | window | mean | min | max |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for rule, entry in summary["rules"].items():
            stats = entry.get(metric)
            cells = [_num(stats.get(k)) for k in ("mean", "min", "max")] if stats else ["—"] * 3
            lines.append(f"| {rule} | {entry.get('agents', 0)} | {first}-{last} | {' | '.join(cells)} |")
    lines += [
        "",
        "### Neighbour decisions (mean per normal agent and round, over the window)",
        "",
        "| rule | accepted | filtered | missing |",
        "|---|---:|---:|---:|",
    ]
    for rule, entry in summary["rules"].items():
        lines.append(
            f"| {rule} | "
            + " | ".join(_num(entry.get(k), 3) for k in ("accepted", "filtered", "missing"))
            + " |"
        )
    lines += ["", "## Figures", ""]
    for image in images:
        if image.endswith(".png"):
            title = image.removesuffix(".png")
            lines += [f"![{LABELS.get(title, title)}]({image})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _attacks(agents: Sequence[Mapping[str, Any]]) -> str:
    """The Byzantine agents' attacks with how many run each, labelled as results label them (an
    omniscient attack, which reads its victims' data, says so)."""
    counts: dict[str, int] = {}
    for a in agents:
        if a.get("role") == "byzantine":
            label = names.attack_label(a.get("attack"), a.get("attack_params"))
            counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{label} x{n}" for label, n in sorted(counts.items())) or "—"


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    return f"{float(x):.{digits}g}"


def _seconds(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"
