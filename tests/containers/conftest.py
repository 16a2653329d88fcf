"""Container tests: the real node image on a real Docker engine.

Without a Docker engine these tests skip and say why — except in CI (``CI=true``), where a missing
engine is a failure: CI must prove they ran (.ci/run installs and starts one). The image is built
(or found up to date) by deploy/build-image.sh, the same offline build users run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# testcontainers' reaper (ryuk) is an image from a registry, which cannot be pulled here; every
# test removes what it started itself (fixtures below), so the reaper is not needed.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/cli_helpers.py

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IMAGE = os.environ.get("MTL_IMAGE", "resilient-mtl-node:latest")


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the container tests, but: {reason}", pytrace=False)
    pytest.skip(f"container tests need a Docker engine: {reason}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    if os.environ.get("MTL_SKIP_CONTAINER_TESTS") == "1":
        unavailable("MTL_SKIP_CONTAINER_TESTS=1 is set")
    try:
        import docker
    except ImportError:
        unavailable("the docker Python package is missing (pip install -e '.[dev]')")
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # docker.errors.DockerException and socket errors alike
        unavailable(f"no engine answers ({type(exc).__name__}: {exc}); start dockerd")
    yield client
    client.close()


@pytest.fixture(scope="session")
def node_image(docker_client: Any) -> str:
    """The node image, built from the current sources (a no-op when its input hash is unchanged)."""
    if os.environ.get("MTL_SKIP_IMAGE_BUILD") != "1":
        done = subprocess.run(
            ["bash", str(ROOT / "deploy" / "build-image.sh"), "--tag", IMAGE],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            pytest.fail(f"deploy/build-image.sh failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
    docker_client.images.get(IMAGE)
    return IMAGE
