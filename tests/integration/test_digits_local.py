"""The digits example (a CNN per agent, 10 agents, 2 Byzantine) runs on the local backend with every
rule of the file, ``none`` included: agents whose rounds are CPU-heavy and that fetch nothing must
still answer health checks (the orchestrator waits for them) and run side by side in serve-many.

The file's own topology, cut down (rounds and data) through the same fields a user would edit, so
the test fits CI's budget; the graph, groups, attackers and rules are the example's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
ROUNDS = 3
UP = [str(BIN / "mtl-orchestrate"), "up"]


def test_digits_example_runs_every_rule_on_local(tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "examples" / "digits-2byz.yaml").read_text())
    rules = spec["rules"]
    assert "none" in rules and len(rules) >= 4
    spec["rounds"] = ROUNDS
    spec["task_params"] |= {"train_samples": 64, "test_samples": 32, "eval_every": 1}
    topology = tmp_path / "digits-small.yaml"
    topology.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    done = subprocess.run(
        [*UP, str(topology), "--backend", "local", "--out", str(out), "--no-progress", "--no-report"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rules"]) == rules
    for rule in rules:
        stats = summary["rules"][rule]
        assert stats["agents"] == 8, (rule, stats)  # the normal agents, each with its test accuracy
        assert 0.0 <= stats["test_accuracy"]["mean"] <= 1.0
    for rule in rules:
        for k in range(10):
            rows = (out / "work" / rule / "agents" / f"a{k}" / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(r)["round"] for r in rows] == list(range(1, ROUNDS + 1)), (rule, k)
