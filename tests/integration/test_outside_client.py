"""An outside program talks to a daemon knowing only standard gRPC tooling and safetensors.

The client half of this file deliberately imports nothing from mtl_node: it finds the service by
reflection, builds the request and response classes from the reflected descriptors, and calls
GetModel as a generic server-streaming method, over mutual TLS with an operator certificate (PEM
files, the standard grpc.ssl_channel_credentials, and the agent's DNS SAN as the name to check).
Only starting the daemon and making certificates use the test harness.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import xxhash
from daemons import AgentSpec, DaemonSet, shared_ca
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0
SERVICE = "mtl.v1.Node"


def operator_credentials() -> grpc.ChannelCredentials:
    ca, cert, key = shared_ca().files("operator", "operator")
    return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())


def wait_serving(channel: grpc.Channel, service: str, timeout: float = 60.0) -> int:
    """Health status of ``service`` once it is SERVING (or the last one seen at the deadline)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    status = health_pb2.HealthCheckResponse.UNKNOWN
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
            status = reply.status
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.1)
    return int(status)


def fetch_model(channel: grpc.Channel, round_: int) -> tuple[Any, bytes]:
    """(header, payload) of GetModel, with message classes built from reflection only."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName(SERVICE).methods_by_name["GetModel"]
    assert method.server_streaming and not method.client_streaming
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream(
        f"/{SERVICE}/GetModel",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    chunks = list(call(request_cls(round=round_, requester=""), timeout=DEADLINE_S))
    assert chunks, "GetModel streamed nothing"
    assert chunks[0].HasField("header")
    return chunks[0].header, b"".join(chunk.data for chunk in chunks)


def test_health_reflection_outside_client(tmp_path: Path) -> None:
    rounds = 3
    with (
        DaemonSet(tmp_path, [AgentSpec("solo")], rounds, seed=4, rule="none") as ds,
        # ---- the outside client: grpc, health, reflection, protobuf, safetensors; nothing else ----
        grpc.secure_channel(
            ds["solo"].address,
            operator_credentials(),
            options=[("grpc.ssl_target_name_override", "solo.agent.resilient-mtl")],
        ) as channel,
    ):
        for service in ("", SERVICE):
            assert wait_serving(channel, service) == health_pb2.HealthCheckResponse.SERVING, service
        ds.wait_done(timeout=120)  # so the last round is published

        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE in services, services
        assert "grpc.health.v1.Health" in services, services

        header, payload = fetch_model(channel, rounds)
        assert header.round == rounds
        assert header.format == "safetensors"
        assert header.total_bytes == len(payload)
        # The checksum is xxh3-128 (a well-known non-cryptographic hash: it guards against
        # truncation, not forgery); an outside client verifies it with the xxhash package.
        assert header.digest == "xxh3-128:" + xxhash.xxh3_128(payload).hexdigest()
        state = safetensors.torch.load(payload)
        assert set(state) == {"w"}
        assert tuple(state["w"].shape) == (2,)
        assert bool(state["w"].isfinite().all())

        # Round 0 asks for the latest published round.
        latest, _ = fetch_model(channel, 0)
        assert latest.round == rounds
