"""In-process engines on the paper's target-localization network: wall time of one rule.

100 agents at uniform positions in [0,3]^2, neighbours within range 1 (at most 10 with the agent
itself, each agent sampling its own subset as the reference code does), 4 targets near (10,10),
(10,20), (20,10), (20,20) assigned in groups of 25, 20 agents Byzantine sending constants from
[15,16]^2 (drawn once, as the reference code does; ``--redraw round`` draws every round), 500 rounds,
rule loss-filtered. Three implementations of the same maths, measured in one run:

  (a) loop     a straightforward per-agent Python/numpy loop, written here: for each round, for each
               agent, for each neighbour (the way the paper's reference simulation is written);
  (b) batched  mtl_node.batched.run_batched: all agents at once, numpy over (agents, slots) arrays;
  (c) engine   mtl_node.engine.run_agents: one asyncio Agent per agent with torch state dicts, the
               oracle the daemons are tested against (slow by design; timed once).

All three start from the same NodeConfigs and draw the same data, so their results must agree; the
benchmark checks that before it reports a time. (a) and (b) are timed ``--repeat`` times,
interleaved, and the best is reported (the machine is shared; see docs/performance.md).

    python benchmarks/bench_engine.py [--rounds 500] [--repeat 3] [--redraw never]
        [--engine-rounds 500 | --skip-engine]

Prints a table and writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from mtl_node import seeding  # noqa: E402
from mtl_node.attack_api import make_attack  # noqa: E402
from mtl_node.batched import run_batched  # noqa: E402
from mtl_node.config import NodeConfig  # noqa: E402
from mtl_node.engine import IN_PROCESS, run_agents  # noqa: E402
from mtl_node.tasks import TaskContext  # noqa: E402
from mtl_node.tasks.base import parse_params  # noqa: E402
from mtl_node.tasks.target_localization import (  # noqa: E402
    BLOCK,
    Resolved,
    TargetLocalization,
    TargetLocalizationParams,
    sample_block,
)
from orchestrator.graphs import geometric  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "engine.json"


def paper_network(
    rounds: int, rule: str, redraw: str, seed: int = 0, agents: int = 100, attackers: int = 20
) -> list[NodeConfig]:
    """The configs of the paper's first case study (section 7.1)."""
    rng = np.random.default_rng(seed)
    positions = rng.uniform(0.0, 3.0, size=(agents, 2))
    neighbourhoods = geometric(positions, radius=1.0, max_degree=10, rng=rng)
    corners = ((10.0, 10.0), (10.0, 20.0), (20.0, 10.0), (20.0, 20.0))
    targets = [(cx + float(rng.uniform()), cy + float(rng.uniform())) for cx, cy in corners]
    byzantine = set(rng.choice(agents, size=attackers, replace=False).tolist())
    ids = [f"agent-{k:03d}" for k in range(agents)]
    configs = []
    for k, agent in enumerate(ids):
        attacker = k in byzantine
        configs.append(
            NodeConfig(
                id=agent,
                neighbors={ids[j]: IN_PROCESS for j in neighbourhoods[k]},
                rule=rule,
                rounds=rounds,
                seed=seed,
                task_params={
                    "position": tuple(float(v) for v in positions[k]),
                    "target": targets[k * 4 // agents],
                },
                attack="constant" if attacker else None,
                attack_params={"low": 15.0, "high": 16.0, "redraw": redraw} if attacker else {},
            )
        )
    return configs


@dataclass
class Outcome:
    loss: np.ndarray  # (rounds, agents)
    test_loss: np.ndarray
    filtered: np.ndarray
    final: np.ndarray  # (agents, 2)


def per_agent_loop(configs: Sequence[NodeConfig]) -> Outcome:
    """Rule loss-filtered, written as one loop over agents and their neighbours per round.

    The same maths and the same data streams as the engines (so the results can be compared), with
    nothing vectorized across agents: every agent's adapt, every neighbour's score, EMA, filter and
    weight is its own small numpy/Python operation, as in the reference simulation.
    """
    n, rounds = len(configs), configs[0].rounds
    index = {c.id: k for k, c in enumerate(configs)}
    res = []
    for c in configs:
        p = parse_params(TargetLocalization, c.task_params)
        assert isinstance(p, TargetLocalizationParams)
        res.append(Resolved(TaskContext(c.id, c.seed, torch.device("cpu")), p))
    neighbours = [[index[a] for a in c.neighbors] for c in configs]
    attack: dict[int, tuple[float, float, str]] = {}
    for k, c in enumerate(configs):
        if c.attack:
            ap = make_attack(c.attack, c.id, c.seed, c.attack_params).params
            attack[k] = (ap.low, ap.high, ap.redraw)  # type: ignore[attr-defined]
    tests = [
        sample_block(c.seed, c.id, 0, r, size=r.test_samples, purpose=seeding.TEST)
        for c, r in zip(configs, res, strict=True)
    ]
    w = [r.init.copy() for r in res]
    ema: list[dict[int, float]] = [{} for _ in range(n)]
    out = Outcome(
        np.empty((rounds, n)), np.empty((rounds, n)), np.empty((rounds, n), dtype=int), np.empty((n, 2))
    )
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    drawn: dict[tuple[Any, ...], np.ndarray] = {}

    def crafted(a: int, i: int, receiver: int) -> np.ndarray:
        """What attacker ``a`` serves ``receiver`` in round ``i``: one draw per run, round or request."""
        low, high, redraw = attack[a]
        counters: tuple[int, ...] = ()
        if redraw in ("round", "request"):
            counters = (i,)
        if redraw == "request":
            counters += tuple(seeding.id_key(configs[receiver].id))
        key = (a, redraw, counters if redraw != "request" else (*counters, receiver))
        if key not in drawn:
            rng = seeding.generator(configs[a].seed, configs[a].id, seeding.ATTACK, *counters)
            drawn[key] = rng.uniform(low, high, 2)
        return drawn[key]

    for i in range(1, rounds + 1):
        if drawn and i > 1:  # keep only what this round can use again (the run-long draws)
            drawn = {k: v for k, v in drawn.items() if k[1] == "never"}
        if i % BLOCK == 0 or not blocks:
            blocks = [sample_block(c.seed, c.id, i // BLOCK, r) for c, r in zip(configs, res, strict=True)]
        psi = []
        for k in range(n):
            u, d = blocks[k][0][i % BLOCK], blocks[k][1][i % BLOCK]
            q = res[k].position + d * u
            psi.append(w[k] + res[k].mu * (q - w[k]))
        round_models: dict[int, np.ndarray] = {}
        for k in range(n):
            x = res[k].position
            u, d = blocks[k][0][i % BLOCK], blocks[k][1][i % BLOCK]
            filtered = 0
            if k in attack:
                combined = psi[k]  # Byzantine agents keep learning alone
                filtered = len(neighbours[k])
            else:
                p = configs[k].rule_params
                models = [psi[k]]
                scores = [float((d - (psi[k] - x) @ u) ** 2)]
                for j in neighbours[k]:
                    model = crafted(j, i, k) if j in attack else psi[j]
                    models.append(model)
                    scores.append(float((d - (model - x) @ u) ** 2))
                members = [k, *neighbours[k]]
                inverse = []
                for member, score in zip(members, scores, strict=True):
                    prev = ema[k].get(member, p.ema_init)
                    ema[k][member] = score if prev is None else (1.0 - p.nu) * prev + p.nu * score
                own = ema[k][k]
                for slot, member in enumerate(members):
                    if ema[k][member] <= own:
                        inverse.append((slot, 1.0 / max(ema[k][member], p.floor)))
                    else:
                        filtered += 1
                total = sum(v for _, v in inverse)
                combined = np.zeros(2)
                for slot, v in inverse:
                    combined = combined + (v / total) * models[slot]
            round_models[k] = combined
            out.loss[i - 1, k] = (d - (combined - x) @ u) ** 2
            tu, td = tests[k]
            out.test_loss[i - 1, k] = np.mean((td - tu @ (combined - x)) ** 2)
            out.filtered[i - 1, k] = filtered
        w = [round_models[k] for k in range(n)]
    out.final = np.stack(w)
    return out


def batched(configs: Sequence[NodeConfig]) -> Outcome:
    r = run_batched(configs)
    return Outcome(r.loss, r.test_loss, r.filtered, r.final_models)


def engine(configs: Sequence[NodeConfig]) -> Outcome:
    recorders = run_agents(configs)
    recs = [recorders[c.id].records for c in configs]
    rounds = configs[0].rounds
    loss = np.array([[recs[k][i].metrics.loss for k in range(len(configs))] for i in range(rounds)])
    test = np.array([[recs[k][i].metrics.test_loss for k in range(len(configs))] for i in range(rounds)])
    filtered = np.array([[recs[k][i].filtered for k in range(len(configs))] for i in range(rounds)])
    return Outcome(loss, test, filtered, np.full((len(configs), 2), math.nan))


def timed(
    fn: Callable[[Sequence[NodeConfig]], Outcome], configs: Sequence[NodeConfig]
) -> tuple[Outcome, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(configs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))


def check_agree(name: str, ref: Outcome, got: Outcome, rounds: int, models: bool = True) -> float:
    """Largest relative difference of losses (and final models); exits when they disagree."""
    diff = max(
        max_rel_diff(ref.loss[:rounds], got.loss[:rounds]),
        max_rel_diff(ref.test_loss[:rounds], got.test_loss[:rounds]),
    )
    if models:
        diff = max(diff, max_rel_diff(ref.final, got.final))
    same_counts = np.array_equal(ref.filtered[:rounds], got.filtered[:rounds])
    if diff > 1e-9 or not same_counts:
        sys.exit(
            f"{name} disagrees with the batched engine (max rel diff {diff:.3g}, counts same: {same_counts})"
        )
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of (a) and (b), interleaved")
    ap.add_argument("--redraw", choices=["never", "round", "request"], default="never")
    ap.add_argument("--engine-rounds", type=int, default=None, help="rounds for (c) (default: --rounds)")
    ap.add_argument("--skip-engine", action="store_true", help="do not run (c)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    rule = "loss-filtered"
    configs = paper_network(args.rounds, rule, args.redraw, seed=args.seed)
    batched(paper_network(5, rule, args.redraw, seed=args.seed))  # warm imports and caches
    runs: dict[str, list[tuple[float, float]]] = {"loop": [], "batched": []}
    outcomes: dict[str, Outcome] = {}
    for _ in range(args.repeat):
        for name, fn in (("loop", per_agent_loop), ("batched", batched)):
            out, wall, cpu = timed(fn, configs)
            runs[name].append((wall, cpu))
            outcomes[name] = out
    agree_loop = check_agree("(a) loop", outcomes["batched"], outcomes["loop"], args.rounds)

    engine_row: dict[str, Any] | None = None
    if not args.skip_engine:
        engine_rounds = args.engine_rounds or args.rounds
        engine_configs = paper_network(engine_rounds, rule, args.redraw, seed=args.seed)
        out, wall, cpu = timed(engine, engine_configs)
        agree = check_agree(
            "(c) engine", outcomes["batched"], out, min(engine_rounds, args.rounds), models=False
        )
        engine_row = {"rounds": engine_rounds, "wall_s": wall, "cpu_s": cpu, "max_rel_diff_vs_batched": agree}

    def summary(name: str) -> dict[str, Any]:
        walls = [w for w, _ in runs[name]]
        cpus = [c for _, c in runs[name]]
        return {
            "rounds": args.rounds,
            "wall_s_best": min(walls),
            "wall_s_median": statistics.median(walls),
            "cpu_s_best": min(cpus),
            "wall_s_all": walls,
        }

    loop, fast = summary("loop"), summary("batched")
    speedup = loop["wall_s_best"] / fast["wall_s_best"]
    normal = [k for k, c in enumerate(configs) if not c.attack]
    final_window = outcomes["batched"].loss[-50:, normal].mean()
    result = {
        "benchmark": "engine",
        "command": "python benchmarks/bench_engine.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(),
        "setup": {
            "agents": len(configs),
            "byzantine": sum(1 for c in configs if c.attack),
            "rule": rule,
            "redraw": args.redraw,
            "rounds": args.rounds,
            "edges": sum(len(c.neighbors) for c in configs),
            "seed": args.seed,
        },
        "loop": loop,
        "batched": fast,
        "engine": engine_row,
        "speedup_loop_over_batched": speedup,
        "loop_max_rel_diff_vs_batched": agree_loop,
        "mean_loss_normal_agents_last_50_rounds": float(final_window),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{len(configs)} agents ({result['setup']['byzantine']} Byzantine, redraw {args.redraw}), "
        f"{result['setup']['edges']} edges, rule {rule}, {args.rounds} rounds, best of {args.repeat}"
    )
    print(f"{'implementation':<34}{'wall s':>10}{'cpu s':>10}{'rounds/s':>11}")
    rows = [
        ("(a) per-agent Python loop", loop["rounds"], loop["wall_s_best"], loop["cpu_s_best"]),
        ("(b) mtl_node.batched", fast["rounds"], fast["wall_s_best"], fast["cpu_s_best"]),
    ]
    if engine_row:
        rows.append(
            (
                "(c) mtl_node.engine.run_agents",
                engine_row["rounds"],
                engine_row["wall_s"],
                engine_row["cpu_s"],
            )
        )
    for label, rounds, wall, cpu in rows:
        print(f"{label:<34}{wall:>10.3f}{cpu:>10.3f}{rounds / wall:>11.0f}")
    print(f"speed-up (a)/(b): {speedup:.1f}x   results agree (max rel diff {agree_loop:.1e})")
    if engine_row:
        per_round = engine_row["wall_s"] / engine_row["rounds"]
        print(f"(c)/(b) per round: {per_round / (fast['wall_s_best'] / args.rounds):.0f}x")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
