"""mtl-orchestrate render: Kubernetes manifests valid against the Kubernetes schemas (offline, from
kubernetes-validate), compose files accepted by Docker Compose itself, and both wired consistently
(every neighbour address names a service that exists, every config is one a daemon accepts)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mtl_node.config import build_config, parse_hostport
from mtl_node.core.errors import ConfigError
from mtl_node.identity import agent_id, identity_from_pem
from orchestrator.plan import RunPlan
from orchestrator.planner import plan_topology
from orchestrator.render import agent_hostnames, dns_label, render_compose, render_k8s
from orchestrator.spec import load_topology, parse_spec
from orchestrator.tls import RunCerts, run_certs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The oldest release with gRPC probes on by default, and the newest the schemas ship.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TOPOLOGY: dict[str, Any] = {
    "name": "Render_Test.1",
    "agents": ["a_0", "a.1", "B2", "b-3", "a-0"],  # ids that are not DNS names, two colliding
    "graph": {"kind": "ring", "k": 2},
    "byzantine": {"ids": ["b-3"], "attack": "constant"},
    "rules": ["average", "loss-filtered"],
    "rounds": 7,
    "seed": 5,
}


def certs_for(plan: RunPlan, directory: Path) -> RunCerts:
    return run_certs(directory, [a.id for a in plan.agents], None, None)


def plan_of(data: dict[str, Any]) -> RunPlan:
    return plan_topology(parse_spec(data))


def docs_in(directory: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


# --------------------------------------------------------------------------------------- naming


def test_dns_labels_are_valid_and_distinct() -> None:
    names = agent_hostnames(TOPOLOGY["agents"], prefix="mtl-")
    assert len(set(names.values())) == len(names)
    for name in names.values():
        assert len(name) <= 63 and name[0].isalpha() and name[-1].isalnum(), name
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"), name
    assert dns_label("X" * 80).startswith("x") and len(dns_label("X" * 80)) <= 63


# ------------------------------------------------------------------------------------ kubernetes


@pytest.mark.parametrize("example", ["quickstart.yaml", "target-localization-20.yaml"])
def test_k8s_manifests_validate_against_the_schemas(example: str, tmp_path: Path) -> None:
    plan = plan_topology(load_topology(ROOT / "examples" / example))
    certs = certs_for(plan, tmp_path / "certs")
    render_k8s(plan, tmp_path / "k8s", image="registry.example/resilient-mtl-node:1", certs=certs)
    docs = docs_in(tmp_path / "k8s")
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Pod") == kinds.count("Service") == kinds.count("Secret") == len(plan.agents)
    assert kinds.count("ConfigMap") == kinds.count("Namespace") == 1
    # Every object on both versions; the 100-agent example's 400 objects on the newest only (speed).
    for version in K8S_VERSIONS if len(plan.agents) < 20 else K8S_VERSIONS[-1:]:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The validation above can fail: a misspelt probe field and a wrong type are refused."""
    render_k8s(plan_of(TOPOLOGY), tmp_path)
    pod = next(d for d in docs_in(tmp_path) if d["kind"] == "Pod")
    typo = yaml.safe_load(yaml.safe_dump(pod))
    typo["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(pod))
    wrong["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSIONS[-1], strict=True)


def test_k8s_objects_are_wired_together(tmp_path: Path) -> None:
    plan = plan_of(TOPOLOGY)
    certs = certs_for(plan, tmp_path / "certs")
    render_k8s(plan, tmp_path / "k8s", namespace="mtl-test", rule="average", certs=certs)
    docs = docs_in(tmp_path / "k8s")
    secrets = {
        d["metadata"]["annotations"]["resilient-mtl.io/agent-id"]: d for d in docs if d["kind"] == "Secret"
    }
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for d in docs} == {"mtl-test"}
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert RunPlan.from_json(json.loads(configmap["data"]["plan.json"])) == plan

    by_id = {p["metadata"]["annotations"]["resilient-mtl.io/agent-id"]: p for p in pods}
    assert set(by_id) == {a.id for a in plan.agents}
    for agent in plan.agents:
        pod = by_id[agent.id]
        spec = pod["spec"]
        (container,) = spec["containers"]
        # Health through grpc.health.v1 on the plaintext health-only port (kubelet probes cannot
        # present client certificates), for the agent's service.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": 8081, "service": "mtl.v1.Node"}, probe
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        # The Pod's config comes from its own key of the ConfigMap ...
        (config_volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
        (item,) = config_volume["configMap"]["items"]
        config = build_config(yaml.safe_load(configmap["data"][item["key"]]))
        assert config.id == agent.id and config.rule == "average" and config.role == agent.role
        assert config.health_listen == "0.0.0.0:8081" and not config.insecure
        # Its certificate, key and CA come from its own Secret, mounted where its config says.
        secret = secrets[agent.id]
        assert secret["type"] == "kubernetes.io/tls"
        (tls_volume,) = [v for v in spec["volumes"] if "secret" in v]
        assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == tls_volume["name"]]
        for field, key in (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")):
            assert str(getattr(config, field)) == f"{mount['mountPath']}/{key}", field
        pem = base64.b64decode(secret["data"]["tls.crt"])
        assert identity_from_pem(pem) == agent_id(agent.id)
        assert list(config.neighbors) == list(agent.neighbors)
        # ... and each neighbour address is a Service that selects exactly that neighbour's Pod.
        for neighbour, address in config.neighbors.items():
            host, port = parse_hostport(address, "neighbors")
            service = services[host]
            assert service["spec"]["ports"][0]["port"] == port
            target = by_id[neighbour]
            labels = target["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
            others = [p for p in pods if p is not target]
            assert not any(
                all(p["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
                for p in others
            )


def test_render_rejects_bad_arguments(tmp_path: Path) -> None:
    plan = plan_of(TOPOLOGY)
    with pytest.raises(ConfigError, match="--rule"):
        render_k8s(plan, tmp_path, rule="median")
    with pytest.raises(ConfigError, match="--namespace"):
        render_k8s(plan, tmp_path, namespace="Not_A_Namespace")


# --------------------------------------------------------------------------------------- compose


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package), whichever runs."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return cmd
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        reason = "Docker Compose is not installed (apt-get install docker-compose, or the compose plugin)"
        if IN_CI:
            pytest.fail(f"CI must validate the compose file: {reason}")
        pytest.skip(reason)
    return cmd


def test_compose_file_is_accepted_by_docker_compose(compose: list[str], tmp_path: Path) -> None:
    plan = plan_of(TOPOLOGY)
    rendered = render_compose(plan, tmp_path, image="resilient-mtl-node:test")
    compose_file = rendered.files[0]
    done = subprocess.run(
        [*compose, "-f", str(compose_file), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    hostnames = agent_hostnames([a.id for a in plan.agents])
    assert set(resolved["services"]) == set(hostnames.values())
    for agent in plan.agents:
        service = resolved["services"][hostnames[agent.id]]
        assert service["image"] == "resilient-mtl-node:test"
        # Published on loopback only.
        for port in service["ports"]:
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", port
        # The mounted config is this agent's, and its neighbours are services of the project.
        mounts = [v for v in service["volumes"] if str(v.get("target", v) if isinstance(v, dict) else v)]
        sources = [m["source"] if isinstance(m, dict) else str(m).split(":")[0] for m in mounts]
        config_path = next(Path(s) for s in sources if s.endswith(f"{agent.id}.yaml"))
        config = build_config(yaml.safe_load(config_path.read_text()))
        assert config.id == agent.id and config.rule == "loss-filtered"
        for address in config.neighbors.values():
            assert parse_hostport(address, "neighbors")[0] in resolved["services"]


def test_compose_validation_can_fail(compose: list[str], tmp_path: Path) -> None:
    """The same check rejects a compose file with a wrong field, so passing it means something."""
    rendered = render_compose(plan_of(TOPOLOGY), tmp_path)
    data = yaml.safe_load(rendered.files[0].read_text())
    next(iter(data["services"].values()))["portz"] = ["1:1"]
    rendered.files[0].write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [*compose, "-f", str(rendered.files[0]), "config"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "portz" in done.stderr


# ------------------------------------------------------------------------------------------- CLI


def test_cli_render_writes_both_formats(tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    for fmt in ("k8s", "compose"):
        done = subprocess.run(
            [
                str(BIN / "mtl-orchestrate"),
                "render",
                str(topology),
                "--format",
                fmt,
                "--out",
                str(tmp_path / fmt),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "deploy with:" in done.stdout
        listed = [Path(line) for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
        assert listed and all(p.is_file() for p in listed)


def test_cli_render_errors_name_the_flag(tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    done = subprocess.run(
        [str(BIN / "mtl-orchestrate"), "render", str(topology), "--format", "helm", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--format" in done.stderr and "compose, k8s" in done.stderr
    assert "Traceback" not in done.stderr
