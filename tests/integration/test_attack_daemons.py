"""Attack daemons end to end: ``mtl-orchestrate up --backend local`` with real agent processes.

One run, four attackers on a complete graph of six agents under loss-filtered:
- a2 ``constant`` with redraw=request: two-faced, each requester gets its own draw;
- a3 ``nan``: NaN payloads, which no normal agent may ever take in;
- a4 ``echo``: answers each requester with the requester's own model, which the attack daemon
  fetches from the requester over gRPC while serving it;
- a5 ``omission``: refuses every request (UNAVAILABLE).
The decision log every normal agent wrote shows which model it received from whom: the loss it
logged for an attacker is recomputed here from the plan (same task, same seed, same data).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl_node.attack_api import make_attack
from mtl_node.tasks import make_task
from orchestrator.plan import RunPlan
from orchestrator.results import load_decisions, load_metrics

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROUNDS = 8
TOPOLOGY = f"""
name: attack-daemons
task: target-localization
agents: 6
graph: complete
byzantine:
  ids: [a2, a3, a4, a5]
  attacks:
    a2: {{attack: constant, attack_params: {{redraw: request}}}}
    a3: {{attack: nan}}
    a4: {{attack: echo}}
    a5: {{attack: omission}}
rule: loss-filtered
rounds: {ROUNDS}
seed: 5
"""
NORMAL = ("a0", "a1")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("attack-daemons")
    topology = base / "topology.yaml"
    topology.write_text(TOPOLOGY)
    out = base / "out"
    done = subprocess.run(
        [BIN / "mtl-orchestrate", "up", topology, "--backend", "local", "--out", out, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


def decisions_about(out: Path, attacker: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(normal agent, round) -> that agent's decision row about ``attacker``."""
    rows = [d for d in load_decisions(out / "decisions.csv") if d["neighbor"] == attacker]
    return {(d["agent"], d["round"]): d for d in rows if d["agent"] in NORMAL}


def test_plan_gives_each_byzantine_agent_its_attack(run: Path) -> None:
    plan = RunPlan.load(run / "plan.json")
    got = {a.id: (a.role, a.attack, a.attack_params) for a in plan.agents}
    assert got["a2"] == ("byzantine", "constant", {"redraw": "request"})
    assert got["a3"] == ("byzantine", "nan", {})
    assert got["a4"] == ("byzantine", "echo", {})
    assert got["a5"] == ("byzantine", "omission", {})
    assert [a.id for a in plan.agents if a.role == "normal"] == list(NORMAL)


def test_two_faced_attacker_serves_each_victim_its_own_model(run: Path) -> None:
    plan = RunPlan.load(run / "plan.json")
    forger = make_attack("constant", "a2", plan.seed, plan.agent("a2").attack_params)
    template = {"w": torch.zeros(2, dtype=torch.float64)}
    tasks = {v: make_task(plan.task, v, plan.seed, plan.agent(v).task_params) for v in NORMAL}
    seen = decisions_about(run, "a2")
    assert {r for _, r in seen} == set(range(1, ROUNDS + 1))
    for (victim, round_), d in seen.items():
        other = NORMAL[1 - NORMAL.index(victim)]
        mine = tasks[victim].losses([forger.craft(round_, victim, template)], round_)[0]
        theirs = tasks[victim].losses([forger.craft(round_, other, template)], round_)[0]
        # the victim scored the model crafted for it, not the one its neighbour received
        assert d["loss"] == pytest.approx(mine, rel=1e-9), (victim, round_)
        assert d["loss"] != pytest.approx(theirs, rel=1e-6), (victim, round_)


@pytest.mark.parametrize(("attacker", "reason"), [("a3", "non-finite"), ("a5", "unavailable")])
def test_nan_and_omission_attackers_are_always_missing(run: Path, attacker: str, reason: str) -> None:
    seen = decisions_about(run, attacker)
    assert len(seen) == len(NORMAL) * ROUNDS
    for d in seen.values():
        assert d["decision"] == "missing" and d["weight"] == 0.0
        assert str(d["reason"]).startswith(reason), d["reason"]


def test_no_normal_model_is_ever_corrupted(run: Path) -> None:
    rows = [m for m in load_metrics(run / "metrics.csv") if m["role"] == "normal"]
    assert len(rows) == len(NORMAL) * ROUNDS
    for m in rows:
        assert math.isfinite(m["loss"]) and math.isfinite(m["test_loss"]), m
        assert m["missing"] == 2  # a3 and a5, every round


def test_echo_daemon_fetched_each_requesters_own_model(run: Path) -> None:
    own = {
        (d["agent"], d["round"]): d["loss"]
        for d in load_decisions(run / "decisions.csv")
        if d["neighbor"] == d["agent"]
    }
    seen = decisions_about(run, "a4")
    assert len(seen) == len(NORMAL) * ROUNDS
    for key, d in seen.items():
        assert d["loss"] == own[key], key  # the very model the victim published
        assert d["decision"] == "accepted"
