"""The k8s backend without a cluster (none is reachable here): it must say so clearly and leave
nothing behind. Its manifests are validated against the Kubernetes schemas in
tests/unit/test_render.py; a run against a real cluster is documented in docs/deployment.md.
Also: every deploying backend checks its -o options before anything starts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TOPOLOGY = "name: k8s\nagents: 3\nrounds: 5\n"


def up(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    return subprocess.run(
        [str(BIN / "mtl-orchestrate"), "up", str(topology), "--backend", "k8s", "--no-progress",
         "--out", str(tmp_path / "out"), *options],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_missing_kubectl_is_a_clear_error(tmp_path: Path) -> None:
    done = up(tmp_path, "-o", f"kubectl={tmp_path / 'no-kubectl'}")
    assert done.returncode == 2
    assert "no-kubectl: not found" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the error for a missing kubectl is tested above)")
    with socket.socket() as s:  # a loopback port with nothing behind it once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "kubeconfig"
    config.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: none, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: nobody, user: {{token: not-a-token}}}}]
contexts: [{{name: nowhere, context: {{cluster: none, user: nobody}}}}]
current-context: nowhere
"""
    )
    done = up(tmp_path, env={**os.environ, "KUBECONFIG": str(config)})
    assert done.returncode == 2, done.stderr
    assert "kubectl cannot reach a cluster" in done.stderr and "render --format k8s" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("backend", "option", "expected"),
    [
        ("docker", "imgae=x", "unknown option for backend docker (valid: image, agents_per_container"),
        ("docker", "agents_per_container=two", "'two' is not a whole number"),
        ("ssh", "base_port=0", "0 is below 1"),
        ("k8s", "namespce=x", "unknown option for backend k8s (valid: image, namespace"),
    ],
)
def test_backend_options_are_checked(backend: str, option: str, expected: str, tmp_path: Path) -> None:
    """A mistyped -o option fails with the valid ones listed, before anything is deployed."""
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY + "overrides: {a0: {host: h}, a1: {host: h}, a2: {host: h}}\n")
    done = subprocess.run(
        [str(BIN / "mtl-orchestrate"), "up", str(topology), "--backend", backend, "-o", option,
         "--no-progress", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
