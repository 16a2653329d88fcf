"""A flood against one daemon (loopback only, bounded count and time): thousands of pending
GetModel calls and unread WatchStatus streams. Its memory stays bounded and its honest neighbours
keep at least half their round rate (rounds counted over a fixed number of rounds, with and
without the flood; a ratio, not a wall-time bound). benchmarks/bench_flood.py reports the same."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemons import AgentSpec, DaemonSet
from flood import Flood, rss_bytes

pytestmark = pytest.mark.integration

IDS = ["a", "b", "victim"]
WINDOW_ROUNDS = 200
# RSS bound stated in docs/performance.md: the victim may grow by at most this much under flood.
RSS_GROWTH_BOUND = 256 << 20
MIN_RATE_RATIO = 0.5


def rounds_per_second(ds: DaemonSet, ids: list[str], window: int) -> dict[str, float]:
    """Each agent's round rate over its next ``window`` rounds."""
    start = {a: ds.status(a).round for a in ids}
    t0 = time.monotonic()
    ds.wait_until(ids, lambda s: True, 5, "status")  # every agent answers
    reached: dict[str, float] = {}
    deadline = t0 + 600
    while len(reached) < len(ids):
        for a in ids:
            if a not in reached and ds.status(a).round >= start[a] + window:
                reached[a] = time.monotonic()
        assert time.monotonic() < deadline, f"rounds did not advance: {start}"
        time.sleep(0.05)
    return {a: window / (reached[a] - t0) for a in ids}


def test_flood_keeps_memory_bounded_and_honest_rounds_going(tmp_path: Path) -> None:
    specs = [AgentSpec(a, [n for n in IDS if n != a]) for a in IDS]
    # --insecure: the flood stands for a peer that is not authenticated (per-peer limits then key by
    # connection); with mutual TLS an unknown client does not get past the handshake at all.
    with DaemonSet(tmp_path, specs, 10_000_000, seed=8, save_models_every=0, insecure=True) as ds:
        ds.wait_until(IDS, lambda s: s.round >= 20, 180, "round 20")
        victim = ds["victim"]
        assert victim.proc is not None
        base_rss = rss_bytes(victim.proc.pid)
        before = rounds_per_second(ds, ["a", "b"], WINDOW_ROUNDS)
        with Flood(victim.address, calls=3000, watchers=3000, reissue_per_s=100) as flood:
            time.sleep(2.0)  # the flood is in place
            during = rounds_per_second(ds, ["a", "b"], WINDOW_ROUNDS)
            peak_rss = rss_bytes(victim.proc.pid)
            assert flood.error is None, flood.error
        refused = {k: v for k, v in flood.ended.items() if k != "OK"}
        assert sum(refused.values()) > 0, f"nothing was refused: {flood.ended}"
        assert peak_rss - base_rss < RSS_GROWTH_BOUND, (base_rss, peak_rss)
        for a in ("a", "b"):
            assert during[a] >= MIN_RATE_RATIO * before[a], (before, during, flood.ended)
        # The victim's neighbours still got its models during the flood.
        status = ds.status("a")
        assert status.missing == 0, status
