"""``docker``: every agent in its own container on this host, on a network made for the run.

Why one agent per container (the default): a container is what a device is in a real deployment,
so the run exercises the same things — name resolution, its own network stack, a health check, a
non-root user — and stopping one container is losing one agent, nothing else. It costs one torch
import (~230 MB) per agent; for large topologies on one machine ``agents_per_container=N`` packs N
agents into one ``mtl-node serve-many`` container (each still with its own port).

The backend creates a user-defined bridge network, starts the containers on it (agents reach each
other by network alias, ``<agent>:50051``), and talks to them only through ports published on
127.0.0.1. Each container's ``/results`` is a directory of this run's work directory, so the
agents' metrics.jsonl / decisions.jsonl are read back like the local backend's. Each agent's
certificate and key (from the run's CA) are mounted read-only at ``/etc/mtl/tls/<id>/``, owned by
the container's user; the image's HEALTHCHECK asks the plaintext health-only port on the
container's loopback (``health_listen``), since it has no client certificate. Containers and
network carry the label ``org.resilient-mtl.run=<run id>`` and are removed on completion, error
or Ctrl-C; ``docker rm -f $(docker ps -aq --filter label=org.resilient-mtl.run)`` clears any left
by a supervisor that was killed.

The image is built by ``bash deploy/build-image.sh`` (offline, no registry needed).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl_node.core.protocol import AGENT_PORT
from orchestrator.backends.base import BACKENDS, Backend, RunContext, RunOutput
from orchestrator.backends.common import (
    DeploymentError,
    check_options,
    collect,
    follow,
    int_option,
    wait_healthy,
)
from orchestrator.plan import RunPlan
from orchestrator.render import (
    DEFAULT_IMAGE,
    HEALTH_PORT,
    IMAGE_UID,
    TLS_DIR,
    agent_hostnames,
    tls_config,
    write_tls_dir,
)

log = logging.getLogger(__name__)

IMAGE_ENV = "MTL_IMAGE"
RUN_LABEL = "org.resilient-mtl.run"
AGENTS_LABEL = "org.resilient-mtl.agents"
START_TIMEOUT_S = 300.0  # containers import torch concurrently; a small machine needs a while
DOCKER_TIMEOUT_S = 120.0  # any single docker CLI call
STOP_GRACE_S = 10
OPTIONS = ("image", "agents_per_container", "docker", "max_restarts")


def image_name(options: dict[str, Any]) -> str:
    return str(options.get("image") or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE)


class Docker:
    """The docker CLI, every call bounded in time; errors become DeploymentError."""

    def __init__(self, binary: str = "docker") -> None:
        self.binary = binary

    def __call__(self, *args: str, check: bool = True, timeout: float = DOCKER_TIMEOUT_S) -> str:
        try:
            done = subprocess.run(
                [self.binary, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise DeploymentError(
                f"{self.binary}: not found (install Docker, e.g. apt-get install docker.io)"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"docker {args[0]}: no answer within {timeout:.0f}s") from None
        if check and done.returncode != 0:
            problem = done.stderr.strip() or done.stdout.strip()
            raise DeploymentError(f"docker {' '.join(args[:2])}: {problem}")
        return done.stdout

    def check_engine(self) -> None:
        try:
            self("version", "--format", "{{.Server.Version}}", timeout=30)
        except DeploymentError as exc:
            raise DeploymentError(
                f"no Docker engine answers ({exc}); start dockerd, or use --backend local"
            ) from None

    def check_image(self, image: str) -> None:
        try:
            self("image", "inspect", "--format", "{{.Id}}", image, timeout=30)
        except DeploymentError:
            raise DeploymentError(
                f"image {image} not found; build it with: bash deploy/build-image.sh "
                "(or name another with -o image=NAME or MTL_IMAGE)"
            ) from None


@dataclass
class Container:
    name: str
    agents: list[str]
    ports: dict[str, int]  # agent -> port inside the container


@BACKENDS.register("docker", "one container per agent on a Docker network made for the run (this host)")
class DockerBackend(Backend):
    name = "docker"

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        options = check_options(self.name, ctx.options or {}, OPTIONS)
        docker = Docker(str(options.get("docker") or "docker"))
        image = image_name(options)
        per_container = int_option(options, "agents_per_container", 1)
        docker.check_engine()
        docker.check_image(image)

        run_id = f"mtl-{uuid.uuid4().hex[:10]}"
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        ids = [a.id for a in plan.agents]
        hostnames = agent_hostnames(ids)
        containers = _group(ids, per_container, hostnames)
        (ctx.workdir / "containers.json").write_text(
            json.dumps({"run": run_id, "network": run_id, "containers": [c.name for c in containers]})
        )
        inside = {a: f"{hostnames[a]}:{c.ports[a]}" for c in containers for a in c.agents}
        started: list[str] = []
        try:
            docker("network", "create", "--label", f"{RUN_LABEL}={run_id}", run_id)
            user = _prepare_results(ctx.workdir / "agents", ids)
            for c in containers:
                self._start(docker, plan, ctx, run_id, image, user, c, hostnames, inside)
                started.append(c.name)
            published = {
                a: f"127.0.0.1:{_published_port(docker, run_id, c, a)}" for c in containers for a in c.agents
            }
            log.info("docker run %s: %d containers on network %s", run_id, len(containers), run_id)

            def alive() -> set[str]:
                running = set(
                    docker("ps", "--filter", f"label={RUN_LABEL}={run_id}", "--format", "{{.Names}}").split()
                )
                return {a for c in containers if _cname(run_id, c) in running for a in c.agents}

            try:
                wait_healthy(published, START_TIMEOUT_S, alive, what="container", certs=ctx.certs)
            except DeploymentError as exc:
                raise DeploymentError(f"{exc}\n{_logs_tail(docker, run_id, containers, alive())}") from None
            by_agent = {a: c for c in containers for a in c.agents}

            def resolve(agent_id: str) -> str | None:
                """A container restarted by its restart policy may publish another host port."""
                try:
                    return f"127.0.0.1:{_published_port(docker, run_id, by_agent[agent_id], agent_id)}"
                except DeploymentError:
                    return None

            follow(plan, ctx, published, alive, resolve)
        finally:
            self._teardown(docker, ctx.workdir, run_id, started)
        return collect(plan, ctx)

    # -- start ------------------------------------------------------------------------------------

    def _start(
        self,
        docker: Docker,
        plan: RunPlan,
        ctx: RunContext,
        run_id: str,
        image: str,
        user: str | None,
        c: Container,
        hostnames: dict[str, str],
        inside: dict[str, str],
    ) -> None:
        agents = []
        health = {a: HEALTH_PORT + i for i, a in enumerate(c.agents)}
        tls_mounts: list[str] = []
        for agent_id in c.agents:
            agent = plan.agent(agent_id)
            data = plan.node_config_data(agent, ctx.rule)
            data["listen"] = f"0.0.0.0:{c.ports[agent_id]}"
            data["health_listen"] = f"127.0.0.1:{health[agent_id]}"
            data["neighbors"] = {n: inside[n] for n in agent.neighbors}
            data["results_dir"] = f"/results/{agent_id}"
            data |= tls_config(agent_id, ctx.certs)
            agents.append(data)
            if ctx.certs is not None:
                owner = IMAGE_UID if user is None else None  # as root: the image's user reads it
                directory = write_tls_dir(ctx.workdir / "tls", agent_id, ctx.certs, owner)
                tls_mounts += ["--volume", f"{directory.resolve()}:{TLS_DIR}/{agent_id}:ro"]
        config = ctx.workdir / f"{c.name}.json"
        config.write_text(json.dumps({"agents": agents}, indent=1))
        config.chmod(0o644)
        args = [
            "run",
            "--detach",
            "--name",
            _cname(run_id, c),
            "--hostname",
            hostnames[c.agents[0]],
            "--network",
            run_id,
            "--label",
            f"{RUN_LABEL}={run_id}",
            "--label",
            f"{AGENTS_LABEL}={','.join(c.agents)}",
            "--env",
            "MTL_HEALTH_ADDRESSES=" + " ".join(f"127.0.0.1:{health[a]}" for a in c.agents),
            "--volume",
            f"{config.resolve()}:/etc/mtl/agents.json:ro",
            "--volume",
            f"{(ctx.workdir / 'agents').resolve()}:/results",
            # Crash-only: a crashed container is started again and its agents resume from
            # /results/<id>/state (a host directory, so it outlives the container).
            "--restart",
            f"on-failure:{int_option(ctx.options or {}, 'max_restarts', 5, minimum=0)}",
            *tls_mounts,
        ]
        for agent_id in c.agents:
            args += ["--network-alias", hostnames[agent_id], "--publish", f"127.0.0.1::{c.ports[agent_id]}"]
        if user:
            args += ["--user", user]
        args += [image, "serve-many", "--config", "/etc/mtl/agents.json", "--log-level", "info"]
        docker(*args)

    # -- stop -------------------------------------------------------------------------------------

    def _teardown(self, docker: Docker, workdir: Path, run_id: str, names: list[str]) -> None:
        """Stop (SIGTERM: agents flush their files), keep the logs, remove containers and network."""
        full = [f"{run_id}-{n}" for n in names]
        try:
            if full:
                docker("stop", "--time", str(STOP_GRACE_S), *full, check=False, timeout=STOP_GRACE_S + 60)
                for name, short in zip(full, names, strict=True):
                    logs = subprocess.run(
                        [docker.binary, "logs", name],
                        capture_output=True,
                        timeout=60,
                        stdin=subprocess.DEVNULL,
                    )
                    # host-*.log: where `mtl-orchestrate logs` looks.
                    (workdir / f"host-{short}.log").write_bytes(logs.stdout + logs.stderr)
        except (subprocess.TimeoutExpired, DeploymentError) as exc:
            log.warning("docker run %s: stopping: %s", run_id, exc)
        finally:
            remove_run(docker, run_id, full)


def remove_run(docker: Docker, run_id: str, names: Sequence[str] = ()) -> int:
    """Remove every container and the network of a run; returns how many containers there were.

    By label too: a container whose `docker run` was cut short by Ctrl-C is not in ``names``, and
    ``mtl-orchestrate down`` after the orchestrator died knows only the run id (containers.json).
    """
    labelled = docker(
        "ps", "--all", "--quiet", "--filter", f"label={RUN_LABEL}={run_id}", check=False, timeout=60
    ).split()
    if names or labelled:
        docker("rm", "--force", *names, *labelled, check=False, timeout=120)
    # Always tried: Ctrl-C may land between `network create` and noting it was made.
    docker("network", "rm", run_id, check=False, timeout=60)
    return len(labelled)


def remove_recorded_runs(out: Path) -> int:
    """``down`` for docker runs: remove the containers of every run recorded under ``out``.

    Their restart policy keeps them running after the orchestrator died; only the run's label
    (written to containers.json before any container starts) is needed to find them.
    """
    removed = 0
    records = sorted(out.glob("work/*/containers.json"))
    if not records:
        return 0
    docker = Docker()
    for record in records:
        try:
            run_id = json.loads(record.read_text())["run"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable, its containers (if any) are left alone", record)
            continue
        try:
            removed += remove_run(docker, str(run_id))
        except DeploymentError as exc:
            log.warning("docker run %s: %s", run_id, exc)
    return removed


def _cname(run_id: str, c: Container) -> str:
    return f"{run_id}-{c.name}"


def _group(ids: list[str], per_container: int, hostnames: dict[str, str]) -> list[Container]:
    out = []
    for start in range(0, len(ids), per_container):
        group = ids[start : start + per_container]
        name = hostnames[group[0]] if per_container == 1 else f"{hostnames[group[0]]}-x{len(group)}"
        ports = {a: AGENT_PORT + i for i, a in enumerate(group)}
        out.append(Container(name=name, agents=group, ports=ports))
    return out


def _prepare_results(agents_dir: Path, ids: list[str]) -> str | None:
    """Make the results directories writable by the container's user; return ``--user`` or None.

    As root, the directories are handed to the image's non-root user (containers keep running as
    that user). As anyone else, containers run with the caller's uid/gid, which owns them already
    (and is not root either).
    """
    agents_dir.mkdir(parents=True, exist_ok=True)
    for agent_id in ids:
        (agents_dir / agent_id).mkdir(exist_ok=True)
    if os.geteuid() == 0:
        for path in [agents_dir, *(agents_dir / a for a in ids)]:
            os.chown(path, IMAGE_UID, IMAGE_UID)
        return None
    return f"{os.geteuid()}:{os.getegid()}"


def _published_port(docker: Docker, run_id: str, c: Container, agent_id: str) -> int:
    out = docker("port", _cname(run_id, c), f"{c.ports[agent_id]}/tcp").split()
    for binding in out:
        host, _, port = binding.rpartition(":")
        if host == "127.0.0.1" and port.isdigit():
            return int(port)
    raise DeploymentError(f"{agent_id}: no port published on 127.0.0.1 ({' '.join(out) or 'none'})")


def _logs_tail(docker: Docker, run_id: str, containers: list[Container], alive: set[str]) -> str:
    """The last lines of the first container that died (or of the first one), for the error."""
    dead = [c for c in containers if not set(c.agents) & alive] or containers[:1]
    c = dead[0]
    done = subprocess.run(
        [docker.binary, "logs", "--tail", "20", _cname(run_id, c)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return f"--- last lines of container {c.name} ---\n{done.stdout}{done.stderr}"
