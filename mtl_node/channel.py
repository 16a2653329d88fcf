"""The one place that owns gRPC channel and server options: message sizes, keepalive, retry.

Every channel an agent, the orchestrator or a test opens comes from ``create_channel`` so that
message-size bounds and retry behaviour are the same everywhere.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from mtl_node.core.protocol import MAX_MESSAGE_BYTES, SERVICE

__all__ = ["CHANNEL_OPTIONS", "SERVER_OPTIONS", "SERVICE", "create_channel", "create_sync_channel"]

# Retry transient UNAVAILABLE (a peer restarting, a refused connection during startup) a few
# times with backoff; every call still carries its own deadline.
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    # Reconnect quickly after a neighbour restarts instead of backing off for up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

# Every request an agent's server takes is small (a round, an id): a larger one is refused by
# gRPC itself before it is buffered (mtl_node.limits bounds the rest).
MAX_REQUEST_BYTES = 64 << 10

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Bounds how long any call can live, one whose reader stopped reading included: clients are
    # asked to reconnect after 30 minutes (transparently), calls still open 5 minutes later end.
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
    ("grpc.so_reuseport", 1),
]


def create_channel(address: str) -> grpc.aio.Channel:
    """An insecure asyncio channel to an agent (loopback or a trusted network)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def create_sync_channel(address: str) -> grpc.Channel:
    """A blocking channel with the same options (CLI tools, orchestrator, tests)."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
