"""Classification tasks over real daemons: the local backend (gRPC on loopback, agent processes)
gives the same numbers as the in-process sim backend, for a built-in task (har) and for a custom
task loaded by import path in the agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent

HAR = """
name: har-e2e
task: har
agents: 4
graph: complete
byzantine: {ids: [a3], attack: constant}
rules: [loss-filtered]
rounds: 8
seed: 2
nu: 0.2
ema_init: 1.0
task_params: {samples: 60, batch_size: 8, eval_every: 2}
overrides:
  a0: {task_params: {train_share: 0.5}}
"""

CUSTOM = """
name: custom-e2e
task: examples.custom_task:make_task
agents: 3
graph: complete
rules: [average, loss-filtered]
rounds: 6
seed: 1
learning_rate: 0.01
task_params: {options: {samples: 30}, batch_size: 8}
"""


def up(topology: Path, backend: str, out: Path) -> dict:  # type: ignore[type-arg]
    done = subprocess.run(
        [
            str(BIN / "mtl-orchestrate"),
            "up",
            str(topology),
            "--backend",
            backend,
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,  # the custom task is imported as examples.custom_task, from the repository root
    )
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "text"), [("har", HAR), ("custom", CUSTOM)])
def test_local_daemons_match_in_process(tmp_path: Path, name: str, text: str) -> None:
    topology = tmp_path / f"{name}.yaml"
    topology.write_text(text)
    local = up(topology, "local", tmp_path / "local")
    sim = up(topology, "sim", tmp_path / "sim")
    assert local["rules"].keys() == sim["rules"].keys()
    for rule, stats in local["rules"].items():
        assert stats["agents"] == sim["rules"][rule]["agents"] > 0
        for metric in ("loss", "test_loss", "test_accuracy"):
            for key in ("mean", "min", "max"):
                assert stats[metric][key] == pytest.approx(sim["rules"][rule][metric][key], rel=1e-6), (
                    rule,
                    metric,
                    key,
                )
