"""``k8s``: one Pod + Service per agent on a Kubernetes cluster, applied with ``kubectl``.

The objects are exactly what ``mtl-orchestrate render --format k8s`` writes (orchestrator.render):
a ConfigMap holding the plan and every agent's config, and per agent a TLS Secret (its
certificate from the run's CA), a Service (its stable DNS name) and a Pod running the node image
with gRPC startup/readiness/liveness probes against ``grpc.health.v1`` on the plaintext
health-only port. The backend applies them with the user's kubectl context, waits until every
Pod is Ready, follows the run through ``kubectl port-forward`` (ports on 127.0.0.1 here), copies
each agent's metrics/decisions out with ``kubectl exec ... tar``, and deletes every object it
created (by the run's label) on completion, error or Ctrl-C.

The image must be pullable by the cluster: build it (deploy/build-image.sh), push it to a registry
the cluster reads, and pass ``-o image=REGISTRY/resilient-mtl-node:TAG``. Options: ``image``,
``namespace`` (default resilient-mtl, created if missing), ``context`` (kubectl context),
``kubectl`` (binary), ``pull_policy``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

from orchestrator.backends.base import BACKENDS, Backend, RunContext, RunOutput
from orchestrator.backends.common import (
    RESULT_FILES,
    DeploymentError,
    check_options,
    collect,
    extract_results,
    follow,
    wait_healthy,
)
from orchestrator.plan import RunPlan
from orchestrator.render import AGENT_PORT, DEFAULT_IMAGE, DEFAULT_NAMESPACE, RUN_LABEL, render_k8s

log = logging.getLogger(__name__)

KUBECTL_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 600  # image pulls and torch's import on small nodes
ALIVE_EVERY_S = 3.0  # how often Pod phases are listed while following
OPTIONS = ("image", "namespace", "context", "kubectl", "pull_policy")
_FORWARDING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) ->")


class Kubectl:
    """kubectl with the user's kubeconfig (and ``--context`` if given); every call bounded."""

    def __init__(self, binary: str = "kubectl", context: str | None = None, namespace: str = "") -> None:
        self.base = [binary] + (["--context", context] if context else [])
        self.namespace = namespace

    def argv(self, *args: str) -> list[str]:
        return [*self.base, "--namespace", self.namespace, *args] if self.namespace else [*self.base, *args]

    def __call__(self, *args: str, timeout: float = KUBECTL_TIMEOUT_S, check: bool = True) -> bytes:
        try:
            done = subprocess.run(
                self.argv(*args), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise DeploymentError(
                f"{self.base[0]}: not found (install kubectl and configure access to a cluster)"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"kubectl {args[0]}: no answer within {timeout:.0f}s") from None
        if check and done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise DeploymentError(f"kubectl {' '.join(args[:2])}: {err[-1] if err else done.returncode}")
        return done.stdout

    def check_cluster(self) -> None:
        try:
            self("version", "--request-timeout=15s", "--output=json", timeout=30)
        except DeploymentError as exc:
            raise DeploymentError(
                f"kubectl cannot reach a cluster ({exc}); check `kubectl config current-context`, "
                "or render manifests with `mtl-orchestrate render --format k8s`"
            ) from None


@BACKENDS.register("k8s", "one Pod + Service per agent on a Kubernetes cluster (kubectl)")
class K8sBackend(Backend):
    name = "k8s"

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        options = check_options(self.name, ctx.options or {}, OPTIONS)
        namespace = str(options.get("namespace") or DEFAULT_NAMESPACE)
        kubectl = Kubectl(str(options.get("kubectl") or "kubectl"), options.get("context"), namespace)
        kubectl.check_cluster()

        manifests = ctx.workdir / "k8s"
        render_k8s(
            plan,
            manifests,
            image=str(options.get("image") or DEFAULT_IMAGE),
            rule=ctx.rule,
            namespace=namespace,
            pull_policy=str(options.get("pull_policy") or "IfNotPresent"),
            certs=ctx.certs,
        )
        run_label = _relabel(manifests, f"{plan.name}-{ctx.rule}-{uuid.uuid4().hex[:6]}")
        selector = f"{RUN_LABEL}={run_label}"
        pods = _pod_names(manifests)
        forwards: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        applied = False
        try:
            # The namespace may exist already (and is kept); everything else is this run's.
            kubectl("apply", "-f", str(manifests / "00-namespace.yaml"))
            applied = True
            for name in ("10-configmap.yaml", "15-secrets.yaml", "20-services.yaml", "30-pods.yaml"):
                if (manifests / name).exists():  # no Secrets in an --insecure run
                    kubectl("apply", "-f", str(manifests / name))
            log.info("k8s run %s: %d pods in namespace %s", run_label, len(pods), namespace)
            kubectl(
                "wait", "--for=condition=Ready", "pod", "-l", selector, f"--timeout={READY_TIMEOUT_S}s",
                timeout=READY_TIMEOUT_S + 30,
            )  # fmt: skip
            addresses = {}
            for agent_id, pod in pods.items():
                port, forward = _port_forward(kubectl, ctx.workdir, pod)
                forwards.append(forward)
                addresses[agent_id] = f"127.0.0.1:{port}"
            alive = _PodWatch(kubectl, selector, pods)
            wait_healthy(addresses, 120.0, alive, what="pod", certs=ctx.certs)
            follow(plan, ctx, addresses, alive)
            for agent_id, pod in pods.items():
                data = kubectl(
                    "exec", pod, "--", "tar", "-c", "-C", "/results",
                    *(f"{agent_id}/{f}" for f in RESULT_FILES),
                    check=False, timeout=300,
                )  # fmt: skip
                # The Pod's /results/<id>/... becomes workdir/agents/<id>/...
                extract_results(data, ctx.workdir, [agent_id], prefix="agents/")
        finally:
            for popen, stdout in forwards:
                popen.terminate()
                try:
                    popen.wait(10)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
                stdout.close()
            if applied:
                kubectl(
                    "delete", "pod,service,configmap,secret", "-l", selector, "--grace-period=10",
                    "--wait=true", "--timeout=120s", check=False, timeout=180,
                )  # fmt: skip
        return collect(plan, ctx)


class _PodWatch:
    """Which agents' Pods are still running (listed at most every ALIVE_EVERY_S seconds)."""

    def __init__(self, kubectl: Kubectl, selector: str, pods: dict[str, str]) -> None:
        self.kubectl = kubectl
        self.selector = selector
        self.agent_of = {pod: agent for agent, pod in pods.items()}
        self.last = 0.0
        self.running = set(pods)

    def __call__(self) -> set[str]:
        if time.monotonic() - self.last >= ALIVE_EVERY_S:
            out = self.kubectl(
                "get", "pods", "-l", self.selector, "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{\"\\n\"}{end}",
            ).decode()  # fmt: skip
            phases = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
            self.running = {a for pod, a in self.agent_of.items() if phases.get(pod) == "Running"}
            self.last = time.monotonic()
        return set(self.running)


def _relabel(manifests: Path, run: str) -> str:
    """Give this run's objects a unique run label, so cleanup never touches another run's."""
    label = re.sub(r"[^a-z0-9.-]", "-", run.lower()).strip("-.")[:63].strip("-.")
    for path in manifests.glob("[123]*.yaml"):
        text = path.read_text()
        text = re.sub(rf"({re.escape(RUN_LABEL)}): .*", rf"\1: {label}", text)
        path.write_text(text)
    return label


def _pod_names(manifests: Path) -> dict[str, str]:
    import yaml

    pods = {}
    for doc in yaml.safe_load_all((manifests / "30-pods.yaml").read_text()):
        if doc and doc.get("kind") == "Pod":
            pods[doc["metadata"]["annotations"]["resilient-mtl.io/agent-id"]] = doc["metadata"]["name"]
    return pods


def _port_forward(
    kubectl: Kubectl, workdir: Path, pod: str
) -> tuple[int, tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """``kubectl port-forward pod/NAME :50051`` on 127.0.0.1; returns the local port."""
    out_path = workdir / f"port-forward-{pod}.out"
    out = open(out_path, "wb")  # noqa: SIM115 - closed by the caller
    popen = subprocess.Popen(
        kubectl.argv("port-forward", "--address", "127.0.0.1", f"pod/{pod}", f":{AGENT_PORT}"),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = _FORWARDING.search(out_path.read_bytes())
        if m:
            return int(m.group(1)), (popen, out)
        if popen.poll() is not None:
            break
        time.sleep(0.1)
    popen.kill()
    popen.wait()
    out.close()
    raise DeploymentError(f"kubectl port-forward {pod}: {out_path.read_text(errors='replace')[-500:]}")
