"""The ssh backend ships keys in a tar extracted under umask 077: modes are set in the archive."""

from __future__ import annotations

import io
import tarfile

from orchestrator.backends.ssh_remote import tar_bundle


def test_certificate_tar_keeps_keys_private() -> None:
    data = tar_bundle(
        {
            "host-0.json": (b"{}", 0o644),
            "certs/ca.pem": (b"ca", 0o644),
            "certs/a0.key": (b"key", 0o600),
        }
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["certs"].isdir() and members["certs"].mode == 0o700
    assert members["certs/a0.key"].mode == 0o600
    assert members["certs/ca.pem"].mode == 0o644
