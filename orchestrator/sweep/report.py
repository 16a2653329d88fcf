"""The sweep report: heat-maps per task (final metric per rule x attack, one panel per Byzantine
fraction; and the share of normal agents worse than learning alone) and report.md.

Every number is pooled over topologies, seeds and normal agents of the task (the per-topology
numbers are in results.csv). The alone reference is rule ``none`` in the same grid; without it the
"worse than alone" figure is left out and the report says so. Object API on the Agg canvas, as
orchestrator.report: headless, no pyplot state. Torch-free.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from orchestrator.sweep.spec import HIGHER_IS_BETTER, NO_ATTACK, SweepSpec
from orchestrator.sweep.store import worse_than_alone

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
DPI = 130
LOG_CAP = 1e30  # the top of a log colour scale (see plot_heatmaps)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in s)


def grids(
    table: Sequence[dict[str, Any]], spec: SweepSpec, task: str
) -> tuple[list[str], list[str], list[float], np.ndarray, np.ndarray]:
    """(rules, attacks, fractions, mean final [f, rule, attack], worse share [f, rule, attack])."""
    rules = list(spec.rules)
    attacks = [NO_ATTACK, *(a.label for a in spec.attacks)]
    fractions = sorted(spec.fractions)
    acc: dict[tuple[float, str, str], list[float]] = defaultdict(list)
    worse: dict[tuple[float, str, str], list[bool]] = defaultdict(list)
    for r in table:
        if r["task"] != task:
            continue
        key = (r["fraction"], r["rule"], r["attack"])
        acc[key].append(math.inf if r["final"] is None else r["final"])
        w = worse_than_alone(r)
        if w is not None:
            worse[key].append(w)
    shape = (len(fractions), len(rules), len(attacks))
    mean = np.full(shape, np.nan)
    share = np.full(shape, np.nan)
    for i, f in enumerate(fractions):
        for j, rule in enumerate(rules):
            for k, attack in enumerate(attacks):
                if acc.get((f, rule, attack)):
                    mean[i, j, k] = float(np.mean(acc[(f, rule, attack)]))
                if worse.get((f, rule, attack)):
                    share[i, j, k] = float(np.mean(worse[(f, rule, attack)]))
    return rules, attacks, fractions, mean, share


def plot_heatmaps(
    values: np.ndarray,
    rules: list[str],
    attacks: list[str],
    fractions: list[float],
    title: str,
    label: str,
    path: Path,
    *,
    log_scale: bool,
    share: bool = False,
) -> None:
    """One panel per fraction: rows rules, columns attacks (0% has only the no-attack column)."""
    panels = [(i, f) for i, f in enumerate(fractions) if np.any(~np.isnan(values[i]))]
    cols = [[k for k in range(len(attacks)) if np.any(~np.isnan(values[i, :, k]))] for i, _ in panels]
    width = sum(max(len(c), 1) for c in cols)
    # Side by side while that stays readable; one panel per row for wide grids (many attacks).
    stacked = width > 24
    if stacked:
        fig = Figure(
            figsize=(3.0 + 0.55 * max(len(c) for c in cols), len(panels) * (1.2 + 0.3 * len(rules))),
            dpi=DPI,
            layout="constrained",
        )
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    else:
        fig = Figure(
            figsize=(3.0 + 0.55 * width + 0.9 * len(panels), 1.6 + 0.38 * len(rules)),
            dpi=DPI,
            layout="constrained",
        )
        axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[max(len(c), 1) for c in cols])[0]
    finite = values[np.isfinite(values)]
    if share:
        norm: Normalize = Normalize(0.0, 1.0)
        cmap = "Reds"
    elif log_scale and finite.size and finite.min() > 0:
        # Diverging cells reach 1e300: the colour scale stops at LOG_CAP (above it, the darkest
        # colour; the cell's text still gives the value), or the colour bar's ticks overflow.
        top = min(finite.max(), max(LOG_CAP, finite.min() * 1e3))
        norm = LogNorm(finite.min(), max(top, finite.min() * 1.0001), clip=True)
        cmap = "viridis_r"
    else:
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        norm = Normalize(lo, hi if hi > lo else lo + 1)
        cmap = "viridis" if not log_scale else "viridis_r"
    image = None
    for ax, (i, f), ks in zip(axes, panels, cols, strict=True):
        data = values[i][:, ks]
        shown = np.where(np.isfinite(data), data, np.nan)
        image = ax.imshow(shown, norm=norm, cmap=cmap, aspect="auto")
        ax.set_xticks(
            range(len(ks)), [_attack_name(attacks[k]) for k in ks], rotation=60, ha="right", fontsize=7
        )
        ax.set_yticks(range(len(rules)), rules if stacked or ax is axes[0] else [""] * len(rules), fontsize=7)
        ax.set_title(f"{f:.0%} Byzantine", fontsize=8)
        if data.size <= 400:
            dark_high = share or cmap.endswith("_r")
            for (r, c), v in np.ndenumerate(data):
                text = "—" if np.isnan(v) else ("inf" if not np.isfinite(v) else _short(v, share))
                level = float(norm(v)) if np.isfinite(v) else math.nan
                # A diverged or missing cell is drawn blank (white): its text stays black.
                dark = not math.isnan(level) and (level > 0.6 if dark_high else level < 0.4)
                ax.text(
                    c, r, text, ha="center", va="center", fontsize=5.5, color="white" if dark else "black"
                )
    if image is not None:
        fig.colorbar(image, ax=list(axes), label=label, shrink=0.3 if stacked else 0.9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=DPI)


def _attack_name(label: str) -> str:
    return "no attack" if label == NO_ATTACK else label


def _short(v: float, share: bool) -> str:
    if share:
        return f"{v:.0%}"
    return f"{v:.2g}" if abs(v) >= 1000 or abs(v) < 0.01 else f"{v:.3g}"


def write_report(
    out: Path, spec: SweepSpec, table: Sequence[dict[str, Any]], *, command: str, wall_seconds: float
) -> list[Path]:
    """Heat-map PNGs per task and report.md in ``out``; returns the paths written."""
    out = Path(out)
    written: list[Path] = []
    has_alone = "none" in spec.rules
    lines = [
        f"# Sweep {spec.name}",
        "",
        spec.description.strip(),
        "",
        "```",
        command,
        "```",
        "",
        f"{len(spec.cells())} cells ({len(spec.tasks)} tasks x {len(spec.topologies)} topologies x "
        f"{len(spec.seeds)} seeds x {len(spec.rules)} rules x (1 without attack + "
        f"{len(spec.attacks)} attacks x {len([f for f in spec.fractions if f > 0])} fractions)), "
        f"{spec.rounds} rounds each; final metric: the mean over the last {spec.window:.0%} of rounds. "
        f"This run: {wall_seconds:.0f} s wall time. One row per (cell, normal agent): results.csv.",
        "",
        "Each number below pools the task's topologies, seeds and normal agents: the mean final "
        "metric, and in brackets the share of normal agents worse than the same agent learning "
        "alone (rule `none`, same topology and seed)."
        if has_alone
        else "Each number below pools the task's topologies, seeds and normal agents. The grid has no "
        'rule `none`, so there is no alone reference and no "worse than alone" share.',
        "",
    ]
    for task in spec.tasks:
        rules, attacks, fractions, mean, share = grids(table, spec, task.label)
        metric = task.metric_name
        slug = _slug(task.label)
        heat = out / f"heatmap-{slug}.png"
        plot_heatmaps(
            mean, rules, attacks, fractions, f"{task.label}: final {metric} (normal agents)",
            metric, heat, log_scale=metric not in HIGHER_IS_BETTER,
        )  # fmt: skip
        written.append(heat)
        images = [heat.name]
        if has_alone and np.any(~np.isnan(share)):
            worse = out / f"worse-than-alone-{slug}.png"
            plot_heatmaps(
                share, rules, attacks, fractions, f"{task.label}: share of normal agents worse than alone",
                "share", worse, log_scale=False, share=True,
            )  # fmt: skip
            written.append(worse)
            images.append(worse.name)
        lines += [
            f"## {task.label} (`{metric}`, {'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better)",
            "",
        ]
        for i, f in enumerate(fractions):
            ks = [k for k in range(len(attacks)) if np.any(~np.isnan(mean[i, :, k]))]
            if not ks:
                continue
            lines += [
                f"### {f:.0%} Byzantine",
                "",
                "| rule | " + " | ".join(_attack_name(attacks[k]) for k in ks) + " |",
                "|---|" + "---|" * len(ks),
            ]
            for j, rule in enumerate(rules):
                row = []
                for k in ks:
                    v, s = mean[i, j, k], share[i, j, k]
                    text = "—" if np.isnan(v) else _short(v, False)
                    if not np.isnan(s):
                        text += f" ({s:.0%})"
                    row.append(text)
                lines.append(f"| {rule} | " + " | ".join(row) + " |")
            lines.append("")
        lines += [f"![{name}]({name})" for name in images] + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    written.append(path)
    return written
