"""Where sweep cells run: a registry of executors (``--executor``), each yielding cell records as
they finish, in whatever order they finish (the sweep's log and tables do not depend on it).

- ``local`` (default): N worker processes on this machine (spawned, so the orchestrator process
  stays torch-free and a worker's crash cannot corrupt it). Workers ignore SIGINT: Ctrl-C reaches
  the orchestrator, which terminates them.
- ``ray``: every cell a Ray task on a cluster (``--address``; none: a Ray instance on this
  machine). Every node needs resilient-mtl installed (``pip install 'resilient-mtl[ray]'``). Jobs
  and records are plain JSON-able dicts, so nothing of ours is pickled across machines.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import TracebackType
from typing import Any, ClassVar

from mtl_node.core.errors import ConfigError
from mtl_node.core.registry import Registry

log = logging.getLogger(__name__)

Job = dict[str, Any]
Record = dict[str, Any]


class Executor(ABC):
    name: ClassVar[str]

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError("--workers", f"{workers} workers", "use 1 or more")
        self.workers = workers
        self.address = address

    @abstractmethod
    def run(self, jobs: list[Job]) -> Iterator[Record]:
        """Run ``orchestrator.sweep.cell.run_cell`` on every job; yield records as they finish."""

    @abstractmethod
    def close(self) -> None:
        """Stop everything still running (also on KeyboardInterrupt)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


EXECUTORS: Registry[type[Executor]] = Registry("executor")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@EXECUTORS.register("local", "worker processes on this machine (--workers N, default: CPUs)")
class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        super().__init__(workers, address)
        if address is not None:
            raise ConfigError("--address", "the local executor takes no address", "use --executor ray")
        self._pool: Any = None

    def run(self, jobs: list[Job]) -> Iterator[Record]:
        from orchestrator.sweep.cell import run_cell

        n = min(self.workers or os.cpu_count() or 1, max(len(jobs), 1))
        self._pool = multiprocessing.get_context("spawn").Pool(n, initializer=_ignore_sigint)
        yield from self._pool.imap_unordered(run_cell, jobs, chunksize=1)
        self._pool.close()
        self._pool.join()
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init retries such an address for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            "--address",
            f"cannot join the Ray cluster at {address}: {exc.strerror or exc}",
            "start one with `ray start --head` and pass the address it prints",
        ) from None


def _ray_cell(job: Job) -> tuple[Record, str]:
    """A cell in a Ray worker, with the id of the node that ran it."""
    import ray

    from orchestrator.sweep.cell import run_cell

    return run_cell(job), ray.get_runtime_context().get_node_id()


@EXECUTORS.register("ray", "one Ray task per cell on a Ray cluster (--address ADDR)")
class RayExecutor(Executor):
    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        super().__init__(workers, address)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--executor", "ray is not installed", "pip install 'resilient-mtl[ray]'"
            ) from None
        self._pending: list[Any] = []
        self._started = False
        self.nodes: dict[str, int] = {}  # Ray node id -> cells it ran

    def run(self, jobs: list[Job]) -> Iterator[Record]:
        import ray

        if self.address is not None:
            _check_reachable(self.address)
        try:
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=self.workers, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                "--address",
                f"cannot join the Ray cluster at {self.address or 'a new local instance'}: {first}",
                "start one with `ray start --head` and pass the address it prints",
            ) from None
        self._started = True
        # SPREAD: cells are CPU-bound and independent; fill every node, not the head first.
        remote = ray.remote(num_cpus=1, max_retries=1, scheduling_strategy="SPREAD")(_ray_cell)
        # --workers caps the cells in flight (default: as many as the cluster takes).
        cap = self.workers or len(jobs)
        queue = list(reversed(jobs))
        while queue or self._pending:
            while queue and len(self._pending) < cap:
                self._pending.append(remote.remote(queue.pop()))
            done, self._pending = ray.wait(self._pending, num_returns=1)
            record, node = ray.get(done[0])
            self.nodes[node] = self.nodes.get(node, 0) + 1
            yield record
        log.info("ray: %d cells on %d nodes (%s)", sum(self.nodes.values()), len(self.nodes), self.nodes)

    def close(self) -> None:
        if not self._started:
            return
        import ray

        for ref in self._pending:
            ray.cancel(ref, force=True)
        self._pending = []
        ray.shutdown()
        self._started = False
