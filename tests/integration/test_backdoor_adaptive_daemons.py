"""The backdoor and adaptive attacks of issue 13 as real attack daemons over gRPC (mutual TLS,
tests/integration/daemons.py), on HAR: four normal agents (subjects 1..4) and the attackers, every
attacker a neighbour of every normal agent and of no other attacker. adaptive fetches each
requester's own model over gRPC while serving it; under ``loss-filtered`` it bisects on its own
data, under ``average`` it goes max_step.

Every normal agent's checkpoint of every round must equal the in-process engine's for the same
configs and seeds (each daemon served exactly what the attack's code says; float32 models, so to
rounding), and every normal agent's metrics rows carry ``attack_success`` at its test rounds;
under ``average`` the models must differ from the same run with honest agents in the attackers'
places. The omniscient adaptive attack (it reads its victims' data) is refused by the daemon.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from daemons import AgentSpec, DaemonSet, attack_args, in_process_models, mtl_node_command, shared_ca

from mtl_node.engine import IN_PROCESS

pytestmark = pytest.mark.integration

NORMAL = ["a0", "a1", "a2", "a3"]
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "a4": ("backdoor", {"poison": 0.5}),
    "a5": ("adaptive", {"max_step": 0.5}),
}
IDS = [*NORMAL, *ATTACKS]
ROUNDS = 8
SEED = 17
EVAL_EVERY = 4
TOL = 1e-5


def task_params(k: int) -> dict[str, Any]:
    return {"subject": k + 1, "samples": 60, "lr": 0.05, "eval_every": EVAL_EVERY}


def neighbours(a: str) -> list[str]:
    """Normal agents see everyone; attackers see the normal agents only."""
    return [n for n in IDS if n != a and (a in NORMAL or n in NORMAL)]


def specs() -> list[AgentSpec]:
    out = []
    for k, a in enumerate(IDS):
        args = ["--task", "har"]
        for key, value in task_params(k).items():
            args += ["--task-param", f"{key}={value}"]
        if a in ATTACKS:
            args += attack_args(*ATTACKS[a])
        out.append(AgentSpec(a, neighbours(a), args))
    return out


def in_process(attacked: bool, rule: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    configs: list[dict[str, Any]] = []
    for k, a in enumerate(IDS):
        data: dict[str, Any] = {
            "id": a,
            "task": "har",
            "task_params": task_params(k),
            "rule": rule,
            "rounds": ROUNDS,
            "seed": SEED,
            "neighbors": {n: IN_PROCESS for n in neighbours(a)},
        }
        if attacked and a in ATTACKS:
            data |= {"attack": ATTACKS[a][0], "attack_params": ATTACKS[a][1]}
        configs.append(data)
    return in_process_models(configs, NORMAL)


@pytest.mark.parametrize("rule", ["average", "loss-filtered"])
def test_backdoor_and_adaptive_daemons_serve_their_maths_over_grpc(tmp_path: Path, rule: str) -> None:
    with DaemonSet(tmp_path, specs(), ROUNDS, SEED, rule, save_models_every=1) as ds:
        ds.wait_done(timeout=300)
        metrics = {a: ds[a].metrics() for a in NORMAL}
        dirs = {a: ds[a].results_dir / "models" for a in NORMAL}
        # GetStatus carries the last round's rate too (round 8 is a test round).
        status = {a: ds.status(a) for a in NORMAL}
    for a in NORMAL:
        assert status[a].HasField("attack_success"), a
        assert status[a].attack_success == metrics[a][-1]["attack_success"]
    expected, honest = in_process(True, rule), in_process(False, rule)
    moved = 0.0
    for agent in NORMAL:
        assert len(expected[agent]) == ROUNDS
        for i in range(ROUNDS):
            path = dirs[agent] / f"round-{i + 1:06d}.safetensors"
            assert path.exists(), f"{agent}: no checkpoint for round {i + 1}"
            got = safetensors.torch.load_file(str(path))
            for name, want in expected[agent][i].items():
                torch.testing.assert_close(
                    got[name], want, rtol=TOL, atol=TOL, msg=f"{agent} {name} round {i + 1}"
                )
                moved = max(moved, float((got[name] - honest[agent][i][name]).abs().max()))
        rates = {row["round"]: row.get("attack_success") for row in metrics[agent]}
        for r in range(1, ROUNDS + 1):
            if r % EVAL_EVERY == 0:
                assert rates[r] is not None and 0.0 <= rates[r] <= 1.0, (agent, r, rates[r])
            else:
                assert rates[r] is None, (agent, r)
    if rule == "average":
        assert moved > 1e-3, f"the attacks changed the normal agents' models by at most {moved}"


def test_a_daemon_refuses_the_omniscient_adaptive_attack(tmp_path: Path) -> None:
    ca = shared_ca()
    done = subprocess.run(
        [
            *mtl_node_command(),
            "serve",
            "--id",
            "a0",
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            "2",
            "--attack",
            "adaptive",
            "--attack-param",
            "omniscient=true",
            *ca.args("a0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "attack_params.omniscient" in errors[0] and "in-process engine" in errors[0], errors[0]


def test_up_refuses_the_omniscient_adaptive_attack_off_the_sim_backend(tmp_path: Path) -> None:
    """Before any daemon starts (each would refuse it, and be restarted, and refuse again)."""
    import sys

    topology = tmp_path / "t.yaml"
    topology.write_text(
        "name: t\ntask: target-localization\nagents: 4\ngraph: complete\nrules: [average]\nrounds: 2\n"
        "byzantine: {count: 1, attack: adaptive, attack_params: {omniscient: true}}\n"
    )
    orchestrate = str(Path(sys.executable).parent / "mtl-orchestrate")
    done = subprocess.run(
        [orchestrate, "up", str(topology), "--backend", "local", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "byzantine.attack_params.omniscient" in errors[0] and "--backend sim" in errors[0], errors[0]
