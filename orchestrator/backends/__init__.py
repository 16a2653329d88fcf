"""Deployment backends: where a plan's agents run. Registered by name; torch-free to import."""

from orchestrator.backends import docker as _docker  # noqa: F401  (registers "docker")
from orchestrator.backends import k8s as _k8s  # noqa: F401  (registers "k8s")
from orchestrator.backends import local as _local  # noqa: F401  (registers "local")
from orchestrator.backends import sim as _sim  # noqa: F401  (registers "sim")
from orchestrator.backends import ssh as _ssh  # noqa: F401  (registers "ssh")
from orchestrator.backends.base import BACKENDS, Backend, Progress, ProgressSink, RunContext

__all__ = ["BACKENDS", "Backend", "Progress", "ProgressSink", "RunContext"]
