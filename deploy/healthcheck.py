"""Container health check: ask each agent's own grpc.health.v1 service whether it is SERVING.

Why a gRPC check rather than "is the process alive": an agent is only useful to its neighbours once
its server is bound and its model is published, which is exactly when it marks ``mtl.v1.Node``
SERVING. Exit 0 when every address answers SERVING, 1 otherwise (Docker's HEALTHCHECK contract).

Addresses come from the command line or ``MTL_HEALTH_ADDRESSES`` (space- or comma-separated
HOST:PORT), so a container hosting several agents (``mtl-node serve-many``) checks all of them.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "mtl.v1.Node"
DEADLINE_S = 3.0


def check(address: str) -> str | None:
    """None if ``address`` is SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE_S
            )
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str]) -> int:
    raw = " ".join(argv) or os.environ.get("MTL_HEALTH_ADDRESSES", "127.0.0.1:50051")
    addresses = [a for a in raw.replace(",", " ").split() if a]
    problems = [p for p in map(check, addresses) if p]
    for p in problems:
        print(f"unhealthy: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
