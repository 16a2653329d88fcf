"""The one place that owns gRPC channel and server options: message sizes, keepalive, retry,
credentials.

Every channel an agent, the orchestrator or a test opens comes from ``create_channel`` /
``create_sync_channel`` so that message-size bounds, retry behaviour and TLS are the same
everywhere; every server gets its credentials from ``server_credentials``.

Mutual TLS (DESIGN §5 "Identity"): the server requires a client certificate from the CA; the client
checks that the server's certificate names the agent it meant to reach. gRPC's client verifies the
server's name against DNS and IP SANs only (never URI SANs: grpcio 1.85 answers "Hostname
Verification Check failed" for a URI), so the check uses the identity's DNS form
``<id>.agent.<trust-domain>`` as ``grpc.ssl_target_name_override``: the certificate must carry it next
to the SPIFFE URI (mtl_node.identity). A mismatch fails the handshake, which ``is_identity_error``
recognises so the caller can count that neighbour missing with reason ``identity``.
"""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import grpc
from cryptography import x509

from mtl_node.core.errors import FetchError
from mtl_node.core.protocol import MAX_MESSAGE_BYTES, SERVICE
from mtl_node.identity import SpiffeId, TlsMaterial, identity_of

__all__ = [
    "CHANNEL_OPTIONS",
    "SERVER_OPTIONS",
    "SERVICE",
    "create_channel",
    "create_sync_channel",
    "discover_identity",
    "is_identity_error",
    "server_credentials",
]

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
    # One owner per port (DESIGN §5): gRPC sets SO_REUSEPORT unless told not to, which would let a
    # second process bind an agent's port and answer part of its neighbours' fetches.
    ("grpc.so_reuseport", 0),
]

# What a failed server-name check looks like in a gRPC status (grpcio 1.85; see the module doc).
_IDENTITY_ERRORS = ("Hostname Verification Check failed", "No match found for server name")


def server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """Serve with ``tls``'s certificate; require a client certificate issued by its CA."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def _secure(tls: TlsMaterial, expected: SpiffeId) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    return creds, [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", expected.dns)]


def create_channel(
    address: str, *, tls: TlsMaterial | None, expected_identity: SpiffeId | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to an agent: mutual TLS with ``tls`` (the certificate at ``address`` must
    name ``expected_identity``; None: whoever is there, found with ``discover_identity``), or
    plaintext when ``tls`` is None (``--insecure``)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    expected = expected_identity or discover_identity(address, tls)
    creds, options = _secure(tls, expected)
    return grpc.aio.secure_channel(address, creds, options=options)


def create_sync_channel(
    address: str, *, tls: TlsMaterial | None, expected_identity: SpiffeId | None = None
) -> grpc.Channel:
    """A blocking channel with the same options and credentials (CLI tools, orchestrator, tests)."""
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    expected = expected_identity or discover_identity(address, tls)
    creds, options = _secure(tls, expected)
    return grpc.secure_channel(address, creds, options=options)


def is_identity_error(details: str | None) -> bool:
    """Whether a gRPC error's details say the server's certificate named someone else."""
    return bool(details) and any(marker in str(details) for marker in _IDENTITY_ERRORS)


def discover_identity(address: str, tls: TlsMaterial, timeout: float = 5.0) -> SpiffeId:
    """The identity in the certificate served at ``address`` (one TLS handshake, chain checked
    against our CA, our certificate presented).

    For operator tools that reach an agent by address alone (``mtl-node status ADDRESS``); the
    channel they open afterwards still checks that exact identity in its own handshake, so what
    they talk to is the agent named here. Agents never use this: they know whom they fetch from.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the identity is the URI SAN, checked below
    context.load_verify_locations(cadata=tls.ca.decode())
    context.set_alpn_protocols(["h2"])
    if tls.paths is not None:
        context.load_cert_chain(str(tls.paths[1]), str(tls.paths[2]))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except (OSError, ValueError) as exc:
        raise FetchError(f"{address}: TLS handshake failed: {exc}", reason="unavailable") from None
    ident = identity_of(x509.load_der_x509_certificate(der)) if der else None
    if ident is None or ident.kind != "agent":
        raise FetchError(f"{address}: the certificate served there names no agent", reason="identity")
    return ident
