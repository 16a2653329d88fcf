"""Making certificates in the identity layout (mtl_node.identity): a CA, leaf certificates with the
SPIFFE URI SAN (and its DNS form), and the directory ``mtl-orchestrate certs`` writes.

Any CA that issues the same SAN layout serves as well (openssl, cert-manager, SPIRE); this one is
for runs and tests that have none. Keys are EC P-256, written 0600 from the start. No torch, no
grpc: the orchestrator's ``certs`` command runs where no agent does.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtl_node.core.errors import ConfigError
from mtl_node.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, agent_id, check_trust_domain, operator_id


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _validity(days: float, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # clock skew
    return start, start + dt.timedelta(days=days)


def make_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN, days: float = 3650, not_before: dt.datetime | None = None
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"resilient-mtl CA ({trust_domain})")])
    start, end = _validity(days, not_before)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    identity: SpiffeId,
    days: float = 365,
    not_before: dt.datetime | None = None,
    dns_names: Iterable[str] = (),
) -> Issued:
    """A leaf certificate for ``identity`` (client and server use), signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri), x509.DNSName(identity.dns)]
    for dns in dns_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(dns)))
        except ValueError:
            sans.append(x509.DNSName(dns))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def write_private(path: Path, data: bytes, force: bool = False) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, not even briefly)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes, force: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_ca(directory: Path) -> Issued:
    """The CA certificate and key of a directory made by ``make_certs`` (to issue more)."""
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("--certs", f"{directory / 'ca.key'} is not an EC key made by mtl-orchestrate certs")
    return Issued(cert, key)


def make_certs(
    out: Path,
    agents: Iterable[str],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: float = 365,
    force: bool = False,
    operator: str = "operator",
) -> list[Path]:
    """``ca.pem``/``ca.key``, ``<id>.pem``/``<id>.key`` per agent, ``operator.pem``/``.key`` in
    ``out``; keys 0600. An existing file is an error unless ``force``; returns the files written."""
    check_trust_domain(trust_domain, "--trust-domain")
    agents = list(agents)
    names = ["ca", *agents, "operator"]
    out.mkdir(parents=True, exist_ok=True)
    if not force:
        existing = [p for n in names for p in (out / f"{n}.pem", out / f"{n}.key") if p.exists()]
        if existing:
            raise ConfigError(
                "--out", f"{existing[0]} exists", "use --force to replace the certificates in it"
            )
    ca = make_ca(trust_domain, days=max(days, 1) * 2)
    written: list[Path] = []

    def save(name: str, issued: Issued) -> None:
        write_public(out / f"{name}.pem", issued.cert_pem(), force)
        write_private(out / f"{name}.key", issued.key_pem(), force)
        written.extend([out / f"{name}.pem", out / f"{name}.key"])

    save("ca", ca)
    for a in agents:
        save(a, issue(ca, agent_id(a, trust_domain), days=days))
    save("operator", issue(ca, operator_id(operator, trust_domain), days=days))
    return written
