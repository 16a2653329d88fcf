"""The k8s backend without a cluster (none is reachable here): it must say so clearly and leave
nothing behind. Its manifests are validated against the Kubernetes schemas in
tests/unit/test_render.py (offline: ``kubectl apply --dry-run=client`` cannot check them here, since
even a client-side dry run asks the API server for its resource types and fails without one; see
test_kubectl_dry_run_needs_a_cluster); a run against a real cluster is documented in
docs/deployment.md. CI installs kubectl (.ci/run: Debian's kubernetes-client), so these run there.
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


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is not installed; .ci/run installs Debian's kubernetes-client")
        pytest.skip("kubectl is not installed (the error for a missing kubectl is tested above)")
    return kubectl


def test_kubectl_dry_run_needs_a_cluster(tmp_path: Path) -> None:
    """Why the manifests are checked against schemas offline rather than by kubectl: a client-side
    dry run still asks the API server what the resource types are. If a kubectl ever checks them
    without a cluster, this fails, and the dry run should be added as a check."""
    kubectl = _kubectl()
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    rendered = subprocess.run(
        [str(BIN / "mtl-orchestrate"), "render", str(topology), "--format", "k8s",
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    config = tmp_path / "kubeconfig"
    config.write_text(_unreachable_kubeconfig())
    done = subprocess.run(
        [kubectl, "apply", "--dry-run=client", "--validate=false", "--request-timeout=5s",
         "-f", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "KUBECONFIG": str(config)},
    )  # fmt: skip
    assert done.returncode != 0, done.stdout


def _unreachable_kubeconfig() -> str:
    with socket.socket() as s:  # a loopback port with nothing behind it once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"""apiVersion: v1
kind: Config
clusters: [{{name: none, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: nobody, user: {{token: not-a-token}}}}]
contexts: [{{name: nowhere, context: {{cluster: none, user: nobody}}}}]
current-context: nowhere
"""


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    _kubectl()
    config = tmp_path / "kubeconfig"
    config.write_text(_unreachable_kubeconfig())
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
