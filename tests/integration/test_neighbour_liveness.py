"""Neighbour liveness on real daemons (mtl_node.liveness).

- A neighbour stopped (SIGSTOP) for 20 s with a 5 s fetch deadline costs each of its neighbours
  one slow round, not one per round of the stall; after SIGCONT the stopped agent, whose own
  deadlines ran out while it was stopped, leaves none of its healthy neighbours out.
- A neighbour killed and restarted within the fetch deadline is never counted missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemons import AgentSpec, DaemonSet

pytestmark = pytest.mark.integration

IDS = ["a", "b", "c"]
FETCH_TIMEOUT_S = 5.0
STALL_S = 20.0


def complete(ids: list[str]) -> list[AgentSpec]:
    return [AgentSpec(a, [n for n in ids if n != a]) for a in ids]


def test_stalled_neighbour_costs_one_deadline_and_the_resumed_agent_leaves_nobody_out(tmp_path: Path) -> None:
    rounds = 2000
    with DaemonSet(
        tmp_path,
        complete(IDS),
        rounds,
        seed=5,
        common_args=["--fetch-timeout", str(FETCH_TIMEOUT_S)],
        save_models_every=0,
    ) as ds:
        ds.wait_until(IDS, lambda s: s.round >= 20, 180, "round 20")
        ds.pause("c")
        stopped_at = time.monotonic()
        try:
            time.sleep(STALL_S)
        finally:
            ds.resume("c")
        ds.wait_done(timeout=300)
        assert time.monotonic() - stopped_at >= STALL_S
        for agent in ("a", "b"):
            rows = ds[agent].metrics()
            assert [r["round"] for r in rows] == list(range(1, rounds + 1))
            slow = [r["round"] for r in rows if r["seconds"] >= 0.8 * FETCH_TIMEOUT_S]
            assert len(slow) == 1, f"{agent}: rounds that waited out the deadline: {slow}"
            missing_c = [
                d for d in ds[agent].decisions() if d["neighbor"] == "c" and d["decision"] == "missing"
            ]
            assert missing_c, f"{agent} never left the stopped agent out"
            assert all("timeout" in d["reason"] for d in missing_c), missing_c[:3]
        c_rows = ds["c"].metrics()
        assert [r["round"] for r in c_rows] == list(range(1, rounds + 1))
        left_out = [r["round"] for r in c_rows if r["missing"]]
        assert not left_out, f"the resumed agent left healthy neighbours out in rounds {left_out}"
        assert "was paused" in ds["c"].stderr() or "did not run for" in ds["c"].stderr()


def test_neighbour_restarted_within_the_deadline_is_not_missing(tmp_path: Path) -> None:
    rounds = 400
    with DaemonSet(
        tmp_path,
        complete(IDS),
        rounds,
        seed=6,
        common_args=["--fetch-timeout", "60"],
        save_models_every=0,
    ) as ds:
        ds.wait_until(IDS, lambda s: s.round >= 20, 180, "round 20")
        ds.kill("c")
        ds.restart("c")
        ds.wait_done(timeout=300)
        for agent in ("a", "b"):
            rows = ds[agent].metrics()
            assert [r["round"] for r in rows] == list(range(1, rounds + 1))
            missing = [(r["round"], r["missing"]) for r in rows if r["missing"]]
            assert not missing, f"{agent} counted the restarted neighbour missing: {missing}"
