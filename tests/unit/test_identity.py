"""X.509 identities (mtl_node.identity), authorization rules (mtl_node.auth), and the certs CLI."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mtl_node.auth import authorize
from mtl_node.ca import issue, make_ca, make_certs, write_private, write_public
from mtl_node.core.errors import ConfigError
from mtl_node.identity import SpiffeId, agent_id, identity_from_pem, load_material, operator_id, party_tls

REPO = Path(__file__).resolve().parents[2]


def test_make_certs_writes_the_layout_with_private_keys(tmp_path: Path) -> None:
    written = make_certs(tmp_path, ["a", "b_1"], trust_domain="example.org", days=2)
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["ca.pem", "ca.key", "a.pem", "a.key", "b_1.pem", "b_1.key", "operator.pem", "operator.key"]
    )
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), (path, oct(mode))
    material = load_material(tmp_path / "ca.pem", tmp_path / "b_1.pem", tmp_path / "b_1.key")
    assert material.identity == SpiffeId("example.org", "agent", "b_1")
    assert material.identity.uri == "spiffe://example.org/agent/b_1"
    cert = x509.load_pem_x509_certificate((tmp_path / "b_1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["b_1.agent.example.org"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 2
    op = load_material(
        tmp_path / "ca.pem", tmp_path / "operator.pem", tmp_path / "operator.key", kind="operator"
    )
    assert op.identity == operator_id("operator", "example.org")
    # Never overwritten without force.
    before = (tmp_path / "a.key").read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        make_certs(tmp_path, ["a"])
    assert (tmp_path / "a.key").read_bytes() == before
    make_certs(tmp_path, ["a"], force=True)
    assert (tmp_path / "a.key").read_bytes() != before


def test_load_material_says_what_is_wrong(tmp_path: Path) -> None:
    make_certs(tmp_path, ["a", "b"])
    ca, a, a_key, b_key = tmp_path / "ca.pem", tmp_path / "a.pem", tmp_path / "a.key", tmp_path / "b.key"
    with pytest.raises(
        ConfigError, match="names spiffe://resilient-mtl/agent/a, not spiffe://resilient-mtl/agent/b"
    ):
        load_material(ca, a, a_key, expect=agent_id("b"))
    with pytest.raises(ConfigError, match="does not match the certificate"):
        load_material(ca, a, b_key)
    other = tmp_path / "other"
    make_certs(other, [])
    with pytest.raises(ConfigError, match="is not issued by the CA"):
        load_material(other / "ca.pem", a, a_key)
    with pytest.raises(ConfigError, match="cannot read"):
        load_material(ca, tmp_path / "nope.pem", a_key)
    with pytest.raises(ConfigError, match="an agent certificate"):
        load_material(ca, a, a_key, kind="operator")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(ConfigError, match="expired on"):
        load_material(ca, a, a_key, now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with pytest.raises(ConfigError, match="not valid yet"):
        load_material(ca, a, a_key, now=earlier)


def test_agent_certificate_without_dns_form_is_refused_with_the_fix(tmp_path: Path) -> None:
    """gRPC clients check server names against DNS SANs only: say which SAN to add."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = make_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://resilient-mtl/agent/a")]),
            critical=True,
        )
        .sign(ca.key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    write_public(tmp_path / "ca.pem", ca.cert_pem())
    write_public(tmp_path / "a.pem", cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(tmp_path / "a.key", pem)
    with pytest.raises(ConfigError, match=r"add DNS:a\.agent\.resilient-mtl"):
        load_material(tmp_path / "ca.pem", tmp_path / "a.pem", tmp_path / "a.key")


def test_identity_from_pem() -> None:
    ca = make_ca()
    assert identity_from_pem(issue(ca, agent_id("k")).cert_pem()) == agent_id("k")
    assert identity_from_pem(ca.cert_pem()) is None  # no SPIFFE SAN
    assert identity_from_pem(b"not a certificate") is None
    assert SpiffeId.parse("spiffe://td/agent/../x") is None
    assert SpiffeId.parse("spiffe://td/other/x") is None
    assert SpiffeId.parse("spiffe://td/operator/ops") == operator_id("ops", "td")


def test_party_tls_requires_material_or_insecure() -> None:
    with pytest.raises(ConfigError, match="mtl-orchestrate certs"):
        party_tls(None, None, None, insecure=False)
    assert party_tls(None, None, None, insecure=True) is None
    with pytest.raises(ConfigError, match="one or the other"):
        party_tls(Path("ca.pem"), None, None, insecure=True)


@pytest.mark.parametrize(
    ("method", "peer", "requester", "allowed", "served"),
    [
        ("GetModel", agent_id("a"), "a", True, "a"),
        ("GetModel", agent_id("a"), "b", False, ""),
        ("GetModel", agent_id("a"), "", False, ""),
        ("GetInfo", agent_id("a"), "", True, "a"),
        ("GetStatus", agent_id("a"), "", False, ""),
        ("WatchStatus", agent_id("a"), "", False, ""),
        ("GetModel", operator_id(), "", True, ""),
        ("GetModel", operator_id(), "a", False, ""),
        ("GetStatus", operator_id(), "", True, ""),
        ("WatchStatus", operator_id(), "", True, ""),
        ("GetModel", agent_id("a", "elsewhere"), "a", False, ""),
        ("GetModel", None, "a", False, ""),
    ],
)
def test_authorize(method: str, peer: SpiffeId | None, requester: str, allowed: bool, served: str) -> None:
    decision = authorize(method, peer, requester, tls=True, trust_domain="resilient-mtl")
    assert decision.allowed is allowed
    if allowed:
        assert decision.requester == served
    else:
        assert decision.code in ("PERMISSION_DENIED", "UNAUTHENTICATED") and decision.reason


def test_insecure_allows_everything_and_trusts_the_requester_field() -> None:
    decision = authorize("GetModel", None, "anyone", tls=False, trust_domain="")
    assert decision.allowed and decision.requester == "anyone"


def test_certs_command(tmp_path: Path) -> None:
    out = tmp_path / "certs"

    def certs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "certs",
                str(REPO / "examples/quickstart.yaml"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )

    done = certs("--out", str(out), "--days", "30", "--trust-domain", "lab.example")
    assert done.returncode == 0, done.stderr
    assert load_material(out / "ca.pem", out / "a0.pem", out / "a0.key").identity == agent_id(
        "a0", "lab.example"
    )
    again = certs("--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert certs("--out", str(out), "--force").returncode == 0
    bad = certs("--out", str(tmp_path / "x"), "--trust-domain", "Bad Domain")
    assert bad.returncode == 2 and "trust domain" in bad.stderr
