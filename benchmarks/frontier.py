"""The frontier matrices of docs/robustness.md: target localization, HAR and digits against the
defenses and attacks since 2021, the paper's loss-filtered rule and the non-cooperative reference.

Each matrix is one ``mtl-orchestrate sweep`` of an examples/sweep-frontier-*.yaml file; this
script runs nothing itself. It collects what the sweeps wrote (results/frontier-*/: the per-agent
table, reduced to the columns the matrix needs, into benchmarks/results/frontier-*.csv.gz; the
heat-maps into docs/img) and renders the frontier section of docs/robustness.md from them, between
the markers below (benchmarks/robustness.py keeps that section when it re-renders the page).

    nice -n 10 mtl-orchestrate sweep examples/sweep-frontier-tl.yaml --out results/frontier-tl --workers 2
    python benchmarks/frontier.py              # collect results/frontier-*/ and render the docs
    python benchmarks/frontier.py --render-only  # re-render from benchmarks/results only

How each sweep was run (command, wall time, load average before and after, engines) is recorded
by hand from the run in benchmarks/results/frontier-runs.json, and printed next to its matrix.
The findings are written from these numbers (FINDINGS in benchmarks/frontier_text.py); re-read them
after a rerun.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.frontier_text import FINDINGS, HARDENED, INTRO  # noqa: E402
from orchestrator.sweep.report import grids  # noqa: E402
from orchestrator.sweep.spec import HIGHER_IS_BETTER, NO_ATTACK, SweepSpec, parse_sweep  # noqa: E402
from orchestrator.sweep.store import SPEC_FILE, read_csv  # noqa: E402

DOC = ROOT / "docs" / "robustness.md"
IMG = ROOT / "docs" / "img"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "frontier-runs.json"
BEGIN = "<!-- frontier matrices: rendered by benchmarks/frontier.py -->"
END = "<!-- end of frontier matrices -->"
# name -> (sweep file, results directory of the sweep)
SWEEPS: dict[str, tuple[str, str]] = {
    "tl": ("examples/sweep-frontier-tl.yaml", "results/frontier-tl"),
    "tl-hardened": ("examples/sweep-frontier-tl-hardened.yaml", "results/frontier-tl-hardened"),
    "har": ("examples/sweep-frontier-har.yaml", "results/frontier-har"),
    "digits": ("examples/sweep-frontier-digits.yaml", "results/frontier-digits"),
}
HEADINGS = {
    "tl": "Target localization",
    "tl-hardened": "Target localization, complete graph: the adaptive attack and the hardened variants",
    "har": "Human activity recognition",
    "digits": "Digit classification",
}
KEEP = (
    "task",
    "topology",
    "rule",
    "attack",
    "fraction",
    "seed",
    "agent",
    "metric",
    "final",
    "alone",
    "attack_success",
)
BACKDOOR_MARGIN = 0.10  # backdoor success more than 10 points above the same agents' alone
DEFEAT_MARGIN = 0.10  # error (loss, or 1 - accuracy) more than 10% above learning alone
LOSS_FILTERED = ("loss-filtered", "loss-filtered-capped", "loss-filtered-clipped")


def collect(name: str) -> bool:
    """Copy sweep ``name``'s table (reduced) and heat-maps into the repo; False if it has not run."""
    out = ROOT / SWEEPS[name][1]
    if not (out / "results.csv").exists():
        return False
    rows = read_csv(out / "results.csv")
    with gzip.open(RESULTS / f"frontier-{name}.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(KEEP)
        for r in rows:
            w.writerow(["" if r[k] is None else r[k] for k in KEEP])
    shutil.copyfile(out / SPEC_FILE, RESULTS / f"frontier-{name}.sweep.json")
    for png in sorted(out.glob("*.png")):
        shutil.copyfile(png, IMG / f"frontier-{name}-{png.name}")
    return True


def load(name: str) -> tuple[SweepSpec, list[dict[str, Any]]] | None:
    table = RESULTS / f"frontier-{name}.csv.gz"
    if not table.exists():
        return None
    spec = parse_sweep(json.loads((RESULTS / f"frontier-{name}.sweep.json").read_text()), check_plans=False)
    rows = []
    with gzip.open(table, "rt", newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            row["fraction"] = float(row["fraction"])
            row["seed"] = int(row["seed"])
            for c in ("final", "alone", "attack_success"):
                row[c] = float(row[c]) if row.get(c, "") != "" else None
            rows.append(row)
    return spec, rows


def error(x: float, metric: str) -> float:
    """Lower is better: the loss, or the error rate for accuracy."""
    return 1.0 - x if metric in HIGHER_IS_BETTER else x


def alone_mean(rows: Sequence[dict[str, Any]], task: str, key: tuple[float, str, str]) -> float:
    """The same normal agents' mean final metric learning alone (rule none, same topology, seed)."""
    vals = [
        r["alone"]
        for r in rows
        if r["task"] == task and (r["fraction"], r["rule"], r["attack"]) == key and r["alone"] is not None
    ]
    return float(np.mean(vals)) if vals else math.nan


def fmt(v: float, metric: str) -> str:
    if math.isnan(v):
        return "—"
    if not math.isfinite(v):
        return "diverged"
    if metric in HIGHER_IS_BETTER:
        return f"{v:.3f}"
    return f"{v:.2g}" if abs(v) >= 1000 or abs(v) < 0.01 else f"{v:.3g}"


def render_task(name: str, spec: SweepSpec, rows: list[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    (task,) = spec.tasks
    metric = task.metric_name
    rules, attacks, fractions, mean, share = grids(rows, spec, task.label)
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    topo = ", ".join(f"`{t.label}` ({t.agents} agents)" for t in spec.topologies)
    params = ", ".join(
        f"`{a.label}`" + (f" {json.dumps(a.params)}" if a.params else "") for a in spec.attacks
    )
    lines = [
        f"### {HEADINGS.get(name, task.label)}",
        "",
        "```",
        run.get("command", f"mtl-orchestrate sweep {SWEEPS[name][0]} --out {SWEEPS[name][1]}"),
        "```",
        "",
        f"{len(spec.cells())} cells: {len(spec.topologies)} topologies ({topo}) x {len(spec.seeds)} "
        f"seeds x {len(spec.rules)} rules x (1 without attack + {len(spec.attacks)} attacks x "
        f"{len([f for f in fractions if f > 0])} fractions), {spec.rounds} rounds; final `{metric}` "
        f"({better} is better): each normal agent's mean over the last {spec.window:.0%} of rounds.",
        f"Attacks (parameters: the attack's defaults unless given): {params}.",
    ]
    if run:
        lines += ["", f"Run: {run['when']}. {run['wall']}. {run['load']}. {run['engines']}"]
    lines += [
        "",
        f"Each cell: the mean final `{metric}` of the normal agents (all topologies and seeds "
        "pooled) and in brackets the share of them that ended worse than the same agent learning "
        f"alone (rule `none`, same network and data). **Bold**: defeated, the mean "
        f"{'error rate (1 - accuracy)' if metric in HIGHER_IS_BETTER else 'loss'} more than "
        f"{DEFEAT_MARGIN:.0%} above the same agents' alone.",
        "",
    ]
    for i, f in enumerate(fractions):
        ks = [k for k in range(len(attacks)) if np.any(~np.isnan(mean[i, :, k]))]
        if not ks:
            continue
        head = [("no attack" if attacks[k] == NO_ATTACK else attacks[k]) for k in ks]
        lines += [
            f"#### {f:.0%} Byzantine" + (" (no attack)" if f == 0 else ""),
            "",
            "| rule | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for j, rule in enumerate(rules):
            cells = []
            for k in ks:
                v, s = mean[i, j, k], share[i, j, k]
                text = fmt(v, metric) + ("" if np.isnan(s) else f" ({s:.0%})")
                ref = alone_mean(rows, task.label, (f, rule, attacks[k]))
                if _defeated(v, ref, metric) and rule != "none":
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _defeats(rules, attacks, fractions, mean, rows, task.label, metric)
    lines += per_topology(spec, rows)
    lines += backdoor(spec, rows)
    images = [
        p
        for kind in ("heatmap", "worse-than-alone")
        for p in sorted(IMG.glob(f"frontier-{name}-{kind}-*.png"))
    ]
    lines += [f"![{p.stem}](img/{p.name})" for p in images] + [""]
    return lines


def _defeated(v: float, alone: float, metric: str) -> bool:
    if math.isnan(v) or math.isnan(alone):
        return False
    if not math.isfinite(v):
        return True
    return error(v, metric) > (1.0 + DEFEAT_MARGIN) * error(alone, metric)


def _defeats(
    rules: list[str],
    attacks: list[str],
    fractions: list[float],
    mean: np.ndarray,
    rows: list[dict[str, Any]],
    task: str,
    metric: str,
) -> list[str]:
    """Per rule: the (attack, fraction) cells it loses (pooled numbers)."""
    lines = ["Defeated cells per rule (attack at fraction):", ""]
    for j, rule in enumerate(rules):
        if rule == "none":
            continue
        lost = []
        for i, f in enumerate(fractions):
            for k, a in enumerate(attacks):
                if _defeated(mean[i, j, k], alone_mean(rows, task, (f, rule, a)), metric):
                    lost.append("no attack" if a == NO_ATTACK else f"{a} {f:.0%}")
        everywhere = len(lost) == int(np.sum(~np.isnan(mean[:, j, :])))
        text = "every cell, without attack too" if lost and everywhere else ", ".join(lost) or "none"
        lines.append(f"- `{rule}`: {text}")
    return [*lines, ""]


def backdoor(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """Rule x fraction: the backdoor's attack success rate, next to the same rule without attack
    and rule ``none`` (the same agents learning alone: the trigger's natural rate)."""
    labels = [a.label for a in spec.attacks if a.attack == "backdoor"]
    if not labels or not any(r["attack_success"] is not None for r in rows):
        return []
    label = labels[0]
    fractions = sorted(f for f in spec.fractions if f > 0)

    def asr(rule: str, f: float, attack: str) -> float:
        vals = [
            r["attack_success"]
            for r in rows
            if (r["rule"], r["fraction"], r["attack"]) == (rule, f, attack)
            and r["attack_success"] is not None
        ]
        return float(np.mean(vals)) if vals else math.nan

    lines = [
        f"Backdoor (`{label}`): the attack success rate, the share of the normal agents' test samples "
        "of other classes that the trigger turns into the target class (mean over normal agents), "
        "without attack and under the backdoor at each fraction. **Bold**: more than "
        f"{BACKDOOR_MARGIN * 100:.0f} points above the same agents learning alone (row `none`).",
        "",
        "| rule | no attack | " + " | ".join(f"backdoor {f:.0%}" for f in fractions) + " |",
        "|---|---|" + "---|" * len(fractions),
    ]
    for rule in spec.rules:
        cells = [_pct(asr(rule, 0.0, NO_ATTACK))]
        for f in fractions:
            v, ref = asr(rule, f, label), asr("none", f, label)
            text = _pct(v)
            cells.append(f"**{text}**" if rule != "none" and v > ref + BACKDOOR_MARGIN else text)
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _pct(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.0%}"


def per_topology(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """Rule x topology: the mean final metric without attack, and the worst (attack, fraction)."""
    (task,) = spec.tasks
    metric = task.metric_name
    topologies = [t.label for t in spec.topologies]
    if len(topologies) < 2:
        return []
    lines = [
        "Per topology: the normal agents' mean final metric without attack / under the worst attack "
        "and fraction [that attack, fraction]; alone: rule `none`.",
        "",
        "| rule | " + " | ".join(topologies) + " |",
        "|---|" + "---|" * len(topologies),
    ]
    for rule in spec.rules:
        cells = []
        for topo in topologies:
            groups: dict[tuple[float, str], list[float]] = {}
            for r in rows:
                if r["rule"] == rule and r["topology"] == topo:
                    v = math.inf if r["final"] is None else r["final"]
                    groups.setdefault((r["fraction"], r["attack"]), []).append(v)
            means = {k: float(np.mean(v)) for k, v in groups.items()}
            base = means.get((0.0, NO_ATTACK), math.nan)
            attacked = {k: v for k, v in means.items() if k[0] > 0}
            if not attacked:
                cells.append(fmt(base, metric))
                continue
            worst = max(attacked, key=lambda k: error(attacked[k], metric))
            cells.append(f"{fmt(base, metric)} / {fmt(attacked[worst], metric)} [{worst[1]}, {worst[0]:.0%}]")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render(runs: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "",
        "## Frontier matrices: defenses and attacks since 2021, on three tasks",
        "",
        *INTRO,
        "",
    ]
    lines += ["### Findings", "", *FINDINGS, "", *HARDENED, ""]
    for name in SWEEPS:
        loaded = load(name)
        if loaded is None:
            lines += [f"### {name}", "", f"Not run yet: `{SWEEPS[name][0]}`.", ""]
            continue
        lines += render_task(name, *loaded, runs.get(name, {}))
    return "\n".join([*lines, END]) + "\n"


def splice(doc: str, block: str) -> str:
    """``doc`` with the frontier block replaced by ``block`` (appended if it has none)."""
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + block.rstrip("\n") + tail
    return doc.rstrip("\n") + "\n\n" + block


def kept_block(doc: str) -> str:
    """The frontier block of ``doc`` ('' if none), for benchmarks/robustness.py's re-render."""
    if BEGIN in doc and END in doc:
        return BEGIN + doc.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render-only", action="store_true", help="do not collect results/frontier-*/")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    if not args.render_only:
        for name in SWEEPS:
            print(f"{name}: {'collected' if collect(name) else 'no results yet'}")
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    args.doc.write_text(splice(args.doc.read_text(), render(runs)))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
