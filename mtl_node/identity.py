"""Who is who: SPIFFE-style X.509 identities for agents and operators (DESIGN §5 "Identity").

An identity is the URI SAN of a certificate: ``spiffe://<trust-domain>/agent/<id>`` for an agent,
``spiffe://<trust-domain>/operator/<name>`` for a person or tool. The layout, not this module, is
the contract: certificates from openssl, cfssl, cert-manager or SPIRE with the same SAN work the
same (tests/integration/test_tls.py makes some with the openssl CLI).

This module loads and checks a daemon's own material at start and reads the identity out of a
peer's certificate; mtl_node.ca makes CAs and certificates (``mtl-orchestrate certs``). It imports neither
torch nor grpc: the orchestrator's ``certs`` command runs where no agent does.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from mtl_node.core.errors import ConfigError

DEFAULT_TRUST_DOMAIN = "resilient-mtl"
KINDS = ("agent", "operator")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
CERTS_HINT = "make them with `mtl-orchestrate certs TOPOLOGY.yaml --out DIR`, or pass --insecure"


@dataclass(frozen=True)
class SpiffeId:
    """``spiffe://<trust_domain>/<kind>/<name>``; kind is ``agent`` or ``operator``."""

    trust_domain: str
    kind: str
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def dns(self) -> str:
        """The identity as a DNS SAN, ``<name>.<kind>.<trust-domain>``: what a gRPC client checks
        the server's certificate against (gRPC verifies server names against DNS and IP SANs only,
        never URI SANs; channel.py)."""
        return f"{self.name}.{self.kind}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId | None:
        """The identity a URI names, or None when it is not one of ours."""
        m = re.match(r"^spiffe://([^/]+)/(agent|operator)/([^/]+)$", uri)
        if not m or not _TRUST_DOMAIN.match(m.group(1)) or not _NAME.match(m.group(3)):
            return None
        return cls(m.group(1), m.group(2), m.group(3))


def agent_id(agent: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
    return SpiffeId(trust_domain, "agent", agent)


def operator_id(name: str = "operator", trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
    return SpiffeId(trust_domain, "operator", name)


def check_trust_domain(value: str, field: str = "trust_domain") -> str:
    if not _TRUST_DOMAIN.match(value):
        raise ConfigError(
            field, f"{value!r} is not a trust domain", "lowercase letters, digits, '.', '-', '_'"
        )
    return value


# ------------------------------------------------------------------------------- reading certs


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.DNSName))


def identity_of(cert: x509.Certificate) -> SpiffeId | None:
    """The one SPIFFE identity of ``cert``; None when it has none or several (ambiguous)."""
    ids = {i for i in map(SpiffeId.parse, uri_sans(cert)) if i is not None}
    return ids.pop() if len(ids) == 1 else None


@functools.lru_cache(maxsize=1024)
def identity_from_pem(pem: bytes) -> SpiffeId | None:
    """The identity of a peer certificate in PEM (what gRPC's auth context carries); cached, since
    one peer presents the same certificate on every call of a connection."""
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


# --------------------------------------------------------------------------- own TLS material


@dataclass(frozen=True)
class TlsMaterial:
    """A party's PEM bytes, checked: the CA bundle it trusts, its certificate chain and key."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: SpiffeId
    not_after: dt.datetime
    paths: tuple[Path, Path, Path] | None = None  # (ca, cert, key) files, when read from files

    @property
    def trust_domain(self) -> str:
        return self.identity.trust_domain


def _read(path: Path, field: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}", CERTS_HINT) from None


def _load_certs(data: bytes, path: Path, field: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(field, f"{path} holds no PEM certificate", CERTS_HINT)
    return certs


def _verifies(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_material(
    ca: Path,
    cert: Path,
    key: Path,
    *,
    expect: SpiffeId | None = None,
    kind: str | None = None,
    now: dt.datetime | None = None,
) -> TlsMaterial:
    """Read and check a party's CA, certificate and key; every problem is one ConfigError.

    Checks: the certificate has exactly one SPIFFE URI SAN (equal to ``expect``, or of ``kind``),
    is within its validity, chains to a certificate in ``ca``, and the key matches it.
    """
    ca_pem, cert_pem, key_pem = _read(ca, "--ca"), _read(cert, "--cert"), _read(key, "--key")
    roots = _load_certs(ca_pem, ca, "--ca")
    chain = _load_certs(cert_pem, cert, "--cert")
    leaf = chain[0]
    ident = identity_of(leaf)
    if ident is None:
        raise ConfigError(
            "--cert",
            f"{cert} has no single SPIFFE URI SAN (spiffe://<trust-domain>/<agent|operator>/<name>)",
            CERTS_HINT,
        )
    if ident.kind == "agent" and ident.dns.lower() not in (d.lower() for d in dns_sans(leaf)):
        raise ConfigError(
            "--cert",
            f"{cert} lacks the DNS SAN {ident.dns} that clients check (gRPC verifies server names "
            "against DNS SANs only)",
            f"add DNS:{ident.dns} next to URI:{ident.uri}",
        )
    if expect is not None and ident != expect:
        raise ConfigError("--cert", f"{cert} names {ident}, not {expect}", "use this agent's own certificate")
    if kind is not None and ident.kind != kind:
        raise ConfigError(
            "--cert", f"{cert} is an {ident.kind} certificate ({ident})", f"use an {kind} certificate"
        )
    now = now or dt.datetime.now(dt.UTC)
    if now < leaf.not_valid_before_utc:
        raise ConfigError(
            "--cert", f"{cert} is not valid yet (from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)"
        )
    if now > leaf.not_valid_after_utc:
        raise ConfigError(
            "--cert",
            f"{cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            "issue a new certificate",
        )
    # Walk up the presented chain, then into the trusted bundle.
    issued, ok = leaf, False
    for parent in [*chain[1:], None]:
        if any(_verifies(root, issued) for root in roots):
            ok = True
            break
        if parent is None or not _verifies(parent, issued):
            break
        issued = parent
    if not ok:
        raise ConfigError("--cert", f"{cert} is not issued by the CA in {ca}", "use certificates of one CA")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("--key", f"{key} is not an unencrypted PEM private key ({exc})") from None
    if _public_bytes(private.public_key()) != _public_bytes(leaf.public_key()):
        raise ConfigError("--key", f"{key} does not match the certificate {cert}", "use the key made with it")
    return TlsMaterial(
        ca_pem, cert_pem, key_pem, ident, leaf.not_valid_after_utc, (Path(ca), Path(cert), Path(key))
    )


# ------------------------------------------------------------------------------ who uses what


_warned_insecure = False


def party_tls(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    *,
    insecure: bool,
    expect: SpiffeId | None = None,
    kind: str | None = None,
    who: str = "this agent",
) -> TlsMaterial | None:
    """The checked TLS material of a daemon or tool, or None with ``insecure`` (warned once per
    process). Missing material without ``insecure`` is a ConfigError saying how to make it."""
    global _warned_insecure
    if insecure:
        if any((ca, cert, key)):
            raise ConfigError("--insecure", "given together with --ca/--cert/--key", "use one or the other")
        if not _warned_insecure:
            logging.getLogger(__name__).warning(
                "--insecure: plaintext gRPC; anyone who can reach the port reads every model and may "
                "pose as any agent"
            )
            _warned_insecure = True
        return None
    missing = [flag for flag, value in (("--ca", ca), ("--cert", cert), ("--key", key)) if value is None]
    if missing:
        raise ConfigError(
            missing[0],
            f"no TLS certificate for {who} (mutual TLS is the default)",
            f"{CERTS_HINT}; then --ca DIR/ca.pem --cert DIR/<id>.pem --key DIR/<id>.key",
        )
    assert ca is not None and cert is not None and key is not None
    return load_material(ca, cert, key, expect=expect, kind=kind)
