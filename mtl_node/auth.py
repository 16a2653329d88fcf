"""Who may call what on an agent (DESIGN §5 "Identity"): pure rules over authenticated identities.

With mutual TLS the TLS layer has already refused anyone without a certificate from our CA; what is
left is which authenticated identity may do what:

- an **operator** (``spiffe://<td>/operator/<name>``) may read everything: GetInfo, GetStatus,
  WatchStatus, and GetModel with an empty ``requester`` (the model as served to nobody in
  particular, what ``mtl-node fetch`` downloads);
- an **agent** (``spiffe://<td>/agent/<id>``) may call GetInfo and GetModel *as itself*: the
  ``requester`` field must be its own id. A different one is PERMISSION_DENIED, so nobody can
  collect the model a two-faced attack node crafts for another victim, or pose as another agent;
- anything else (another trust domain, a certificate without our SAN layout) is refused.

The requester an attack node keys its answer on is the authenticated one (``Decision.requester``).
Without TLS (``--insecure``) every call is allowed and the requester is whatever the client wrote:
that is what the opt-out gives up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtl_node.identity import SpiffeId, identity_from_pem

log = logging.getLogger(__name__)

OPERATOR_METHODS = frozenset({"GetInfo", "GetStatus", "WatchStatus", "GetModel"})
AGENT_METHODS = frozenset({"GetInfo", "GetModel"})
MAX_SHOWN = 64  # characters of a client-chosen string that go into a log line


@dataclass(frozen=True)
class Decision:
    allowed: bool
    requester: str = ""  # the requester to serve (authenticated), when allowed
    code: str = "OK"  # grpc.StatusCode name when refused
    reason: str = ""


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> SpiffeId | None:
    """The SPIFFE identity of the client's certificate, from a gRPC auth context."""
    pems = auth_context.get("x509_pem_cert") or ()
    return identity_from_pem(bytes(pems[0])) if pems else None


def authorize(
    method: str, peer: SpiffeId | None, requester: str, *, tls: bool, trust_domain: str
) -> Decision:
    """May ``peer`` call ``method`` (with GetModel's ``requester`` field)?"""
    if not tls:
        return Decision(True, requester)
    if peer is None:
        return Decision(False, code="UNAUTHENTICATED", reason="the client certificate has no SPIFFE identity")
    if peer.trust_domain != trust_domain:
        return Decision(
            False, code="PERMISSION_DENIED", reason=f"{peer} is not of trust domain {trust_domain}"
        )
    shown = requester[:MAX_SHOWN] + ("..." if len(requester) > MAX_SHOWN else "")
    if peer.kind == "operator":
        if method not in OPERATOR_METHODS:
            return Decision(False, code="PERMISSION_DENIED", reason=f"{method} is not allowed to {peer}")
        if method == "GetModel" and requester:
            return Decision(
                False,
                code="PERMISSION_DENIED",
                reason=f"operator {peer.name} asked as requester {shown!r} (operators ask as nobody)",
            )
        return Decision(True, "")
    if method not in AGENT_METHODS:
        return Decision(False, code="PERMISSION_DENIED", reason=f"{method} is for operators, not {peer}")
    if method == "GetModel" and requester != peer.name:
        return Decision(
            False,
            code="PERMISSION_DENIED",
            reason=f"requester {shown!r} is not the caller's identity {peer}",
        )
    return Decision(True, peer.name)


class DenialLog:
    """Logs each refused (peer, method, reason) once at WARNING, then at DEBUG: a misbehaving peer
    that retries every round must not flood the log; bounded so it cannot grow without end."""

    def __init__(self, agent_id: str, limit: int = 1024) -> None:
        self.agent_id = agent_id
        self.limit = limit
        self._seen: set[tuple[str, str, str]] = set()

    def __call__(self, method: str, peer: SpiffeId | None, decision: Decision) -> None:
        key = (str(peer), method, decision.reason)
        first = key not in self._seen
        if first and len(self._seen) < self.limit:
            self._seen.add(key)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: refused %s from %s: %s (%s)",
            self.agent_id,
            method,
            peer or "a client without identity",
            decision.reason,
            decision.code,
        )
