"""Faults on the link between two real daemons (tests/integration/faultproxy.py between agent a and
its neighbour c; a's other neighbour b, and c's only neighbour a, are reached directly): delay, a
stalled stream, a stream cut mid-way, corrupted bytes, a black-holed link. Every round completes,
the faulty neighbour is counted missing with the reason the fault explains, no corrupted model is
ever accepted, and c is back once the fault ends.

Plaintext (``--insecure``) on purpose: under TLS a corrupted byte fails the record's MAC and the
connection, so the payload checks (digest, format) this test reaches would not be reached.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemons import AgentSpec, DaemonSet, read_jsonl
from faultproxy import FaultProxy

pytestmark = pytest.mark.integration

FETCH_TIMEOUT_S = 2.0
PHASE_ROUNDS = 40
MARGIN = 5  # rounds around a switch that may have seen either mode
WIRE_REASONS = {"digest", "format", "truncated", "oversized", "manifest", "non-finite", "invalid"}
LINK_REASONS = {"timeout", "unavailable"}


def c_decisions(ds: DaemonSet, first: int, last: int) -> dict[int, tuple[str, str]]:
    rows = read_jsonl(ds["a"].results_dir / "decisions.jsonl")
    return {
        r["round"]: (r["decision"], (r.get("reason") or "").split(":")[0])
        for r in rows
        if r["neighbor"] == "c" and first <= r["round"] <= last
    }


def phase(
    ds: DaemonSet, proxy: FaultProxy, mode: str, rounds: int = PHASE_ROUNDS
) -> dict[int, tuple[str, str]]:
    proxy.set(mode)
    start = ds.status("a").round
    ds.wait_until(["a"], lambda s: s.round >= start + rounds, 180, f"{rounds} rounds of a under {mode}")
    end = ds.status("a").round
    deadline = time.monotonic() + 30
    while True:  # the recorder writes each round's decisions when the round ends
        got = c_decisions(ds, start + MARGIN, end - 1)
        if len(got) >= end - 1 - start - MARGIN or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def assert_back(ds: DaemonSet, proxy: FaultProxy, mode_before: str, timeout: float = 60.0) -> None:
    """The fault ends: within ``timeout`` s, a's last five rounds all have c (probe, then fetch)."""
    proxy.set("pass")
    deadline = time.monotonic() + timeout
    while True:
        now = ds.status("a").round
        got = c_decisions(ds, now - 5, now)
        tail = [got[r] for r in sorted(got)][-5:]
        if len(tail) == 5 and all(d != "missing" for d, _ in tail):
            return
        assert time.monotonic() < deadline, f"c not back {timeout:.0f}s after {mode_before}: {tail}"
        time.sleep(0.2)


def test_faults_on_a_link_cost_that_neighbour_only_and_heal(tmp_path: Path) -> None:
    holder: dict[str, DaemonSet] = {}
    with FaultProxy(lambda: holder["ds"]["c"].address if "ds" in holder else None) as proxy:
        specs = [
            AgentSpec("a", ["b", "c"]),
            AgentSpec("b", ["a"]),
            AgentSpec("c", ["a"]),
        ]
        with DaemonSet(
            tmp_path,
            specs,
            10_000_000,
            seed=12,
            common_args=["--fetch-timeout", str(FETCH_TIMEOUT_S)],
            save_models_every=0,
            insecure=True,
            via={"c": proxy.address},  # only a has c as a neighbour
        ) as ds:
            holder["ds"] = ds
            ds.wait_until(["a", "b", "c"], lambda s: s.round >= 10, 180, "round 10")

            healthy = phase(ds, proxy, "pass")
            assert healthy and all(d != "missing" for d, _ in healthy.values()), healthy

            proxy.delay_s = 0.05
            delayed = phase(ds, proxy, "delay")
            assert all(d != "missing" for d, _ in delayed.values()), delayed

            corrupt = phase(ds, proxy, "corrupt")
            assert proxy.corrupted > 0
            assert corrupt and all(d == "missing" for d, _ in corrupt.values()), corrupt
            assert {r for _, r in corrupt.values()} <= WIRE_REASONS | LINK_REASONS, corrupt
            assert_back(ds, proxy, "corrupt")

            stalled = phase(ds, proxy, "stall")
            assert stalled and all(d == "missing" for d, _ in stalled.values()), stalled
            assert {r for _, r in stalled.values()} == {"timeout"}, stalled
            assert_back(ds, proxy, "stall")

            cut = phase(ds, proxy, "cut")
            assert cut and all(d == "missing" for d, _ in cut.values()), cut
            assert {r for _, r in cut.values()} <= LINK_REASONS | {"truncated"}, cut
            assert_back(ds, proxy, "cut")

            holed = phase(ds, proxy, "blackhole")
            assert holed and all(d == "missing" for d, _ in holed.values()), holed
            assert {r for _, r in holed.values()} == {"timeout"}, holed
            assert_back(ds, proxy, "blackhole")

            # Every round of every agent completed, and the faults cost a only a few deadlines.
            for agent in ("a", "b", "c"):
                rows = ds[agent].metrics()
                assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
            slow = [r["round"] for r in ds["a"].metrics() if r["seconds"] >= 0.8 * FETCH_TIMEOUT_S]
            assert len(slow) <= 8, f"a waited out the deadline in rounds {slow}"
            # b's link is clean: whatever it missed of a was a's lateness (a waited out deadlines
            # on c, and b, skipping a meanwhile, got ahead of it), never a damaged model.
            b_missing = [
                r for r in read_jsonl(ds["b"].results_dir / "decisions.jsonl") if r["decision"] == "missing"
            ]
            assert {r["reason"].split(":")[0] for r in b_missing} <= LINK_REASONS, b_missing[:3]
