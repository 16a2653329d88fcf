"""The backdoor attack's variants on a small HAR network: attack_success of the normal agents.

Five agents (HAR subjects 1..5, 120 samples each, SGD learning rate 0.05, complete graph), a4 the
attacker, 30 rounds, test metrics every 5 rounds; the figure is the mean over the normal agents
and their last three test evaluations (the configs of tests/unit/test_attacks.py's efficacy case).
Prints one line per (rule, attack parameters) with the rate per seed and the share of rounds in
the last ten where a normal agent accepted a4. docs/robustness.md quotes it.

    python benchmarks/backdoor_variants.py
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import attacks  # noqa: F401  (registers the attacks)
from mtl_node.config import build_config
from mtl_node.engine import IN_PROCESS, run_agents

IDS = ["a0", "a1", "a2", "a3", "a4"]
VARIANTS: list[dict[str, Any] | None] = [
    None,
    {},
    {"blend": "auto"},
    {"base": "victim", "blend": "auto"},
    {"base": "victim", "blend": 0.5},
]


def measure(rule: str, params: dict[str, Any] | None, seed: int, rounds: int) -> tuple[float, float]:
    configs = []
    for k, a in enumerate(IDS):
        data: dict[str, Any] = {
            "id": a,
            "neighbors": {n: IN_PROCESS for n in IDS if n != a},
            "task": "har",
            "task_params": {"subject": k + 1, "samples": 120, "lr": 0.05, "eval_every": 5},
            "rule": rule,
            "rounds": rounds,
            "seed": seed,
        }
        if params is not None and a == "a4":
            data |= {"attack": "backdoor", "attack_params": params}
        configs.append(build_config(data))
    run = run_agents(configs)
    rates: list[float] = []
    accepted: list[float] = []
    for a in IDS[:-1]:
        tested = [r.metrics.attack_success for r in run[a].records if r.metrics.attack_success is not None]
        rates += [x for x in tested[-3:] if x is not None]
        for r in run[a].records[-10:]:
            accepted += [float(d.decision == "accepted") for d in r.decisions if d.agent_id == "a4"]
    return statistics.mean(rates), statistics.mean(accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["average", "loss-filtered"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for rule in args.rules:
        for params in VARIANTS:
            got = [measure(rule, params, s, args.rounds) for s in args.seeds]
            label = "no attack" if params is None else f"backdoor {params or 'defaults'}"
            rates = " / ".join(f"{r:.3f}" for r, _ in got)
            acc = " / ".join(f"{a:.2f}" for _, a in got)
            print(f"{rule:14s} {label:45s} attack_success {rates}   a4 accepted {acc}")


if __name__ == "__main__":
    main()
