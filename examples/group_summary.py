"""Per task group statistics and figures of a results directory (the paper's figures 3 and 4 split
the digit case study by group; ``mtl-orchestrate report`` pools all normal agents).

    python examples/group_summary.py RESULTS_DIR [--metric test_accuracy] [--plots]

For every rule and every task group of plan.json (all normal agents when the plan has no groups):
mean, min and max over the group's normal agents of the metric averaged over the final window of
rounds (the run's ``window`` share, rounds where the metric was recorded), as summary.json does for
all agents. ``--plots`` writes <metric>-group<N>.png next to the run's own figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.report import plot_metric, rule_colors  # noqa: E402
from orchestrator.results import MetricsTable, read_metrics_table, window_bounds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--metric", default="test_accuracy")
    ap.add_argument("--plots", action="store_true")
    args = ap.parse_args()
    plan = json.loads((args.results / "plan.json").read_text())
    table = read_metrics_table(args.results / "metrics.csv")
    first, last = window_bounds(int(table.round.max()), float(plan.get("window", 0.2)))
    groups: dict[int | None, set[str]] = {}
    for a in plan["agents"]:
        if a["role"] == "normal":
            groups.setdefault(a.get("group"), set()).add(a["id"])
    print(f"{args.results.name}: {args.metric}, rounds {first}-{last}, normal agents only")
    print("| group | rule | agents | mean | min | max |\n|---|---|---|---|---|---|")
    for g, members in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        for rule in plan["rules"]:
            sel = np.isin(table.agent, sorted(members)) & (table.rule == rule)
            sel &= (table.round >= first) & (table.round <= last)
            values = table.values[args.metric]
            per_agent = []
            for agent in sorted(members):
                v = values[sel & (table.agent == agent)]
                v = v[~np.isnan(v)]
                if len(v):
                    per_agent.append(float(v.mean()))
            if per_agent:
                name = "all" if g is None else str(g + 1)
                print(
                    f"| {name} | {rule} | {len(per_agent)} | {np.mean(per_agent):.4f} | "
                    f"{np.min(per_agent):.4f} | {np.max(per_agent):.4f} |"
                )
        if args.plots and g is not None:
            keep = np.isin(table.agent, sorted(members))
            sub = MetricsTable(
                round=table.round[keep],
                agent=table.agent[keep],
                role=table.role[keep],
                rule=table.rule[keep],
                values={k: v[keep] for k, v in table.values.items()},
            )
            path = args.results / f"{args.metric}-group{g + 1}.png"
            title = f"{plan['name']} group {g + 1}"
            plot_metric(
                sub, args.metric, plan["rules"], rule_colors(plan["rules"]), title, path, (first, last)
            )
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
