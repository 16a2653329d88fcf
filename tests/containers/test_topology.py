"""A small topology of node containers (testcontainers): three normal agents and one attack node on
a Docker network the test creates. The test reaches the agents only through ports published on
127.0.0.1; the agents reach each other by name on the network."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from nodes import StatusClient, container_user, published, write_configs
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from orchestrator.plan import RunPlan
from orchestrator.planner import plan_topology
from orchestrator.render import AGENT_PORT, IMAGE_UID, TLS_DIR
from orchestrator.spec import parse_spec

# The first test's setup may build the image (deploy/build-image.sh: minutes when cold).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

ATTACKER = "a3"


def small_plan(rounds: int, fetch_timeout: float = 30.0) -> RunPlan:
    return plan_topology(
        parse_spec(
            {
                "name": "containers",
                "agents": 4,
                "graph": "complete",
                "byzantine": {"ids": [ATTACKER], "attack": "constant"},
                "rule": "loss-filtered",
                "rounds": rounds,
                "seed": 11,
                "fetch_timeout": fetch_timeout,
            }
        )
    )


class Topology:
    """Node containers for a plan, started with testcontainers on a network of their own."""

    def __init__(self, image: str, plan: RunPlan, workdir: Path, stack: ExitStack) -> None:
        configs, hostnames, certs, tls_dirs = write_configs(plan, "loss-filtered", workdir)
        self.results = workdir / "results"
        self.network = stack.enter_context(Network())
        self.containers: dict[str, DockerContainer] = {}
        for agent in plan.agents:
            container = (
                DockerContainer(image)
                .with_network(self.network)
                .with_network_aliases(hostnames[agent.id])
                .with_volume_mapping(str(configs[agent.id]), "/etc/mtl/agent.yaml", "ro")
                .with_volume_mapping(str(self.results / agent.id), f"/results/{agent.id}", "rw")
                .with_volume_mapping(str(tls_dirs[agent.id]), f"{TLS_DIR}/{agent.id}", "ro")
                .with_command(["serve", "--config", "/etc/mtl/agent.yaml"])
                .with_kwargs(user=container_user(), labels={"org.resilient-mtl.test": "topology"})
            )
            # Published on loopback only (testcontainers' own helpers would bind every interface).
            container.ports[f"{AGENT_PORT}/tcp"] = ("127.0.0.1", None)  # type: ignore[assignment]
            self.containers[agent.id] = stack.enter_context(container)
        addresses = {a: published(c.get_wrapped_container()) for a, c in self.containers.items()}
        self.client = StatusClient(addresses, certs)
        stack.callback(self.client.close)

    def wrapped(self, agent_id: str) -> Any:
        return self.containers[agent_id].get_wrapped_container()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_completes_and_normal_agents_filter_the_attacker(
    node_image: str, tmp_path: Path, stack: ExitStack
) -> None:
    rounds = 80  # the attacker is accepted early on, while the agents' own models are still poor
    plan = small_plan(rounds=rounds)
    topo = Topology(node_image, plan, tmp_path, stack)
    normal = plan.normal_ids
    final = topo.client.wait(
        [a.id for a in plan.agents], lambda s: s.state == "done", timeout=300, what="done"
    )

    for agent_id in normal:
        st = final[agent_id]
        assert st.round == rounds and st.role == "normal"
        decisions = {n.agent_id: n.decision for n in st.neighbors}
        assert decisions[ATTACKER] == "filtered", (agent_id, decisions)
        weights = {n.agent_id: n.weight for n in st.neighbors}
        assert weights[ATTACKER] == 0.0 and weights[agent_id] > 0.0, weights
    assert final[ATTACKER].role == "byzantine"

    # Every round reached the bind-mounted results directory, written by the non-root user.
    for agent_id in normal:
        metrics = read_jsonl(topo.results / agent_id / "metrics.jsonl")
        assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
        attacker_rows = [
            d for d in read_jsonl(topo.results / agent_id / "decisions.jsonl") if d["neighbor"] == ATTACKER
        ]
        assert len(attacker_rows) == rounds
        # Over the second half of the run the attacker never gets weight.
        late = attacker_rows[rounds // 2 :]
        assert all(d["decision"] == "filtered" and d["weight"] == 0.0 for d in late), late[:3]

    wrapped = topo.wrapped(normal[0])
    assert wrapped.exec_run(["id", "-u"]).output.decode().strip() == str(
        IMAGE_UID if container_user() is None else container_user().split(":")[0]  # type: ignore[union-attr]
    )
    # The image's HEALTHCHECK (grpc.health.v1 from inside the container) reports healthy.
    deadline = time.monotonic() + 90
    while True:
        wrapped.reload()
        health = wrapped.attrs["State"]["Health"]["Status"]
        if health == "healthy" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert health == "healthy", wrapped.attrs["State"]["Health"]


def test_stopping_one_container_mid_run_leaves_the_others_running(
    node_image: str, tmp_path: Path, stack: ExitStack
) -> None:
    plan = small_plan(rounds=100_000, fetch_timeout=3.0)
    topo = Topology(node_image, plan, tmp_path, stack)
    victim = "a1"
    others = [a for a in plan.normal_ids if a != victim]

    before = topo.client.wait(
        [a.id for a in plan.agents], lambda s: s.round >= 3, timeout=300, what="at round 3"
    )
    container = topo.wrapped(victim)
    container.stop(timeout=10)
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, container.logs()[-2000:]  # a clean SIGTERM stop
    stopped_at = max(before[a].round for a in others)

    # The others keep completing rounds, now with the stopped agent counted missing.
    after = topo.client.wait(
        others,
        lambda s: (
            s.round >= stopped_at + 10
            and {n.agent_id: n.decision for n in s.neighbors}.get(victim) == "missing"
        ),
        timeout=180,
        what=f"past round {stopped_at + 10} with {victim} missing",
    )
    for agent_id in others:
        decisions = {n.agent_id: n.decision for n in after[agent_id].neighbors}
        assert decisions[ATTACKER] == "filtered", decisions
        assert after[agent_id].state == "running"
    # What the stopped agent wrote before it stopped is intact.
    rows = read_jsonl(topo.results / victim / "metrics.jsonl")
    assert len(rows) >= 3 and [r["round"] for r in rows] == list(range(1, len(rows) + 1))
