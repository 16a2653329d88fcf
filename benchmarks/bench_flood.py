"""A flood against one daemon: round rates of its honest neighbours with and without it, and the
victim's memory.

Three target-localization daemons on loopback (a complete graph, loss-filtered); the rounds/s of
the two honest neighbours over ``--window`` rounds, then again while a hostile client
(tests/integration/flood.py) keeps ``--calls`` pending GetModel calls (half for the victim's next
round, half for rounds far ahead) and ``--watchers`` unread WatchStatus streams open against the
victim, re-issuing what the server ends at up to 200 calls/s. Also the victim's RSS before and
during, and how the server ended the flood's calls (gRPC status counts). Load average before and
after is printed: on a shared machine the rates move with it.

    python benchmarks/bench_flood.py [--window 300] [--calls 3000] [--watchers 3000]

Prints one JSON object and writes benchmarks/results/flood.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from daemons import AgentSpec, DaemonSet  # noqa: E402
from flood import Flood, rss_bytes  # noqa: E402
from test_flood import rounds_per_second  # noqa: E402


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=300, help="rounds counted for each rate")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--watchers", type=int, default=3000)
    args = parser.parse_args()
    ids = ["a", "b", "victim"]
    result: dict[str, object] = {"load_before": loadavg(), **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        specs = [AgentSpec(a, [n for n in ids if n != a]) for a in ids]
        with DaemonSet(Path(tmp), specs, 10_000_000, seed=8, save_models_every=0, insecure=True) as ds:
            ds.wait_until(ids, lambda s: s.round >= 20, 180, "round 20")
            pid = ds["victim"].proc.pid  # type: ignore[union-attr]
            result["rss_before_mib"] = rss_bytes(pid) / 2**20
            result["rounds_per_s_without"] = rounds_per_second(ds, ["a", "b"], args.window)
            with Flood(ds["victim"].address, calls=args.calls, watchers=args.watchers) as flood:
                time.sleep(2.0)
                result["rounds_per_s_with"] = rounds_per_second(ds, ["a", "b"], args.window)
                result["rss_during_mib"] = rss_bytes(pid) / 2**20
            result["flood_calls_ended"] = dict(flood.ended)
            result["flood_calls_issued"] = flood.issued
    result["load_after"] = loadavg()
    out = ROOT / "benchmarks" / "results" / "flood.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
