"""The vectorized engine of this checkout against the one of another git revision, same run.

Refactors of the engine (the kernel layer, mtl_node/kernels) must not make it slower. This times
``mtl_node.batched.run_batched`` on the paper's first case study (benchmarks/bench_engine.py's
network: 100 agents, 20 Byzantine, loss-filtered, 500 rounds) for this checkout and for
``--baseline`` (exported with ``git archive`` to a temporary directory), alternating the two in
fresh interpreters ``--pairs`` times. Each interpreter reports the best CPU time of ``--repeat``
runs (CPU time, not wall time: the machine may be shared).

    python benchmarks/bench_revision.py --baseline f147706 [--pairs 3] [--repeat 7] [--rounds 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time
root = sys.argv[1]
sys.path.insert(0, root)
sys.path.insert(1, root + "/benchmarks")
import bench_engine, mtl_node
assert mtl_node.__file__.startswith(root), mtl_node.__file__
from mtl_node.batched import run_batched
configs = bench_engine.paper_network(rounds=int(sys.argv[2]), rule="loss-filtered", redraw="never")
best = float("inf")
for _ in range(int(sys.argv[3])):
    t0 = time.process_time()
    run_batched(configs)
    best = min(best, time.process_time() - t0)
print(json.dumps(best))
"""


def export(revision: str, into: Path) -> Path:
    data = subprocess.run(
        ["git", "archive", revision, "mtl_node", "attacks", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def best_cpu(root: Path, rounds: int, repeat: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(root), str(rounds), str(repeat)],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=500)
    args = ap.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        base = export(args.baseline, Path(tmp))
        rows = []
        for _ in range(args.pairs):
            rows.append((best_cpu(base, args.rounds, args.repeat), best_cpu(ROOT, args.rounds, args.repeat)))
    load_after = Path("/proc/loadavg").read_text().split()[:3] if load else []
    print(
        f"run_batched, {args.rounds} rounds, best CPU s of {args.repeat}: "
        f"baseline {args.baseline} / this checkout"
    )
    for base_s, this_s in rows:
        print(f"  {base_s:.4f} / {this_s:.4f}  ratio {this_s / base_s:.3f}")
    print(f"load average before {' '.join(load)}, after {' '.join(load_after)}")


if __name__ == "__main__":
    main()
