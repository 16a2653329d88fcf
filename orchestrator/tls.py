"""The certificates of a run, as the orchestrator hands them to agents and uses them itself.

A certificates directory holds what ``mtl-orchestrate certs`` writes (or what a user's own CA
issued under the same names): ``ca.pem``, ``<id>.pem`` + ``<id>.key`` per agent, ``operator.pem`` +
``operator.key``. ``up`` makes one per run under the results directory unless given ``--certs``.
Torch-free and grpc-free (render and certs run where no agent does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl_node.ca import make_certs
from mtl_node.core.errors import ConfigError
from mtl_node.identity import DEFAULT_TRUST_DOMAIN, TlsMaterial, load_material


@dataclass(frozen=True)
class RunCerts:
    """A checked certificates directory: the operator's material and where each agent's files are."""

    directory: Path
    operator: TlsMaterial

    @property
    def trust_domain(self) -> str:
        return self.operator.trust_domain

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, agent: str) -> Path:
        return self.directory / f"{agent}.pem"

    def key(self, agent: str) -> Path:
        return self.directory / f"{agent}.key"

    def node_fields(self, agent: str, directory: str | None = None) -> dict[str, Any]:
        """The NodeConfig TLS fields of ``agent``; ``directory``: where the files are for the
        agent (inside a container or on a remote host), if not where they are here."""
        base = directory.rstrip("/") if directory else str(self.directory.resolve())
        return {
            "ca": f"{base}/ca.pem",
            "cert": f"{base}/{agent}.pem",
            "key": f"{base}/{agent}.key",
            "trust_domain": self.trust_domain,
        }


def open_certs(directory: Path, agents: Iterable[str]) -> RunCerts:
    """Check that ``directory`` has the operator's and every agent's material (one line per
    problem, as ConfigError)."""
    directory = Path(directory)
    for name in ["ca", "operator", *agents]:
        for suffix in (".pem",) if name == "ca" else (".pem", ".key"):
            if not (directory / f"{name}{suffix}").exists():
                raise ConfigError(
                    "--certs",
                    f"{directory / (name + suffix)} is missing",
                    f"make them with `mtl-orchestrate certs TOPOLOGY.yaml --out {directory}`",
                )
    operator = load_material(
        directory / "ca.pem", directory / "operator.pem", directory / "operator.key", kind="operator"
    )
    return RunCerts(directory, operator)


def run_certs(out: Path, agents: Iterable[str], given: Path | None, trust_domain: str | None) -> RunCerts:
    """``given``'s certificates, else a CA made for this run in ``out/certs`` (reused when the
    directory already holds this run's certificates, e.g. a detached run's re-exec)."""
    agents = list(agents)
    if given is not None:
        return open_certs(given, agents)
    directory = out / "certs"
    if not (directory / "ca.pem").exists():
        make_certs(directory, agents, trust_domain=trust_domain or DEFAULT_TRUST_DOMAIN)
        (directory / "ca.key").chmod(0o600)
    return open_certs(directory, agents)
