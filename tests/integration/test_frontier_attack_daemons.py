"""The attacks of issue 13 (dissensus, min-max, min-sum, rop) as real attack daemons over gRPC
(mutual TLS, tests/integration/daemons.py): seven daemons under ``average``, four of them
attackers, every agent a neighbour of every normal agent. dissensus and rop fetch each requester's
own model over gRPC while serving it; min-max, min-sum and rop build on the models the attacker
fetched the round before.

Every normal agent's checkpoint of every round must equal the in-process engine's for the same
configs and seeds (so each daemon served exactly what the attack's maths says), and differ from the
same run with honest agents in the attackers' places (so the attacks changed what was learnt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from daemons import AgentSpec, DaemonSet, attack_args, in_process_models

from mtl_node.engine import IN_PROCESS

pytestmark = pytest.mark.integration

IDS = ["a0", "a1", "a2", "a3", "a4", "a5", "a6"]
ATTACKS = {
    "a3": ("dissensus", {"eps": 1.5}),
    "a4": ("min-max", {}),
    "a5": ("min-sum", {"direction": "sign"}),
    "a6": ("rop", {"z": 3.0}),
}
NORMAL = [a for a in IDS if a not in ATTACKS]
ROUNDS = 10
SEED = 13
ATOL = 1e-6


def neighbours(k: int) -> list[str]:
    """Every other agent, starting after oneself; attackers are not each other's neighbours, so
    what one serves never depends on when another's on-demand fetch of it happened."""
    around = [IDS[(k + j) % len(IDS)] for j in range(1, len(IDS))]
    return [n for n in around if IDS[k] not in ATTACKS or n not in ATTACKS]


def specs() -> list[AgentSpec]:
    out = []
    for k, a in enumerate(IDS):
        args = attack_args(*ATTACKS[a]) if a in ATTACKS else []
        out.append(AgentSpec(a, neighbours(k), args))
    return out


def in_process(attacked: bool, rule: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    configs: list[dict[str, Any]] = []
    for k, a in enumerate(IDS):
        data: dict[str, Any] = {
            "id": a,
            "rule": rule,
            "rounds": ROUNDS,
            "seed": SEED,
            "neighbors": {n: IN_PROCESS for n in neighbours(k)},
        }
        if attacked and a in ATTACKS:
            data |= {"attack": ATTACKS[a][0], "attack_params": ATTACKS[a][1]}
        configs.append(data)
    return in_process_models(configs, NORMAL)


@pytest.mark.parametrize("rule", ["average", "ubar"])
def test_new_attack_daemons_serve_their_maths_over_grpc(tmp_path: Path, rule: str) -> None:
    """Under ``ubar`` (a new rule needing both losses and models) the daemons must also agree with
    the in-process engine; only under ``average`` must the attacks move the models."""
    with DaemonSet(tmp_path, specs(), ROUNDS, SEED, rule, save_models_every=1) as ds:
        ds.wait_done(timeout=240)
    dirs = {d.id: d.results_dir / "models" for d in ds}
    expected, honest = in_process(True, rule), in_process(False, rule)
    moved = 0.0
    for agent in NORMAL:
        assert len(expected[agent]) == ROUNDS
        for i in range(ROUNDS):
            path = dirs[agent] / f"round-{i + 1:06d}.safetensors"
            assert path.exists(), f"{agent}: no checkpoint for round {i + 1}"
            got = safetensors.torch.load_file(str(path))["w"].double()
            want = expected[agent][i]["w"].double()
            assert float((got - want).abs().max()) <= ATOL, f"{agent} round {i + 1}: {got} vs {want}"
            moved = max(moved, float((got - honest[agent][i]["w"].double()).abs().max()))
    if rule == "average":
        assert moved > 0.1, f"the attacks changed the normal agents' models by at most {moved}"
