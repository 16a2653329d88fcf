#!/usr/bin/env bash
# Build the agent image (resilient-mtl-node) with no container registry, offline except for the
# package mirrors apt and pip already use.
#
#   1. base:   debootstrap a Debian bookworm minbase (+ python3, python3-venv, tini) from the mirror
#              apt is configured with, `docker import` it as resilient-mtl-base:bookworm.
#              Done once: reused while its recipe (this script's BASE_RECIPE) is unchanged.
#   2. wheels: `pip wheel` the project and its runtime dependencies into a local wheelhouse (torch
#              comes from pip's configured find-links, e.g. the local CPU wheel).
#   3. image:  `docker build` deploy/Dockerfile on a small staged context; the image installs
#              everything with `pip install --no-index`.
#
# The image carries a label with a hash of every input (Dockerfile, health check, pyproject, the
# package sources, the base image id); when an image with the same hash exists nothing is rebuilt.
#
# Usage: bash deploy/build-image.sh [--force] [--tag NAME:TAG]
# Environment: MTL_IMAGE (default resilient-mtl-node:latest), MTL_BASE_IMAGE,
#              MTL_DEBIAN_MIRROR (default: read from /etc/apt/sources.list*), PYTHON (for pip).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MTL_IMAGE:-resilient-mtl-node:latest}
BASE=${MTL_BASE_IMAGE:-resilient-mtl-base:bookworm}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,tini
BASE_RECIPE="debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE; docs/man/apt-lists removed; v1"
CACHE=deploy/.cache
LABEL=org.resilient-mtl.inputs
FORCE=0

while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --tag) IMAGE="$2"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument $1 (use --force, --tag NAME:TAG)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "build-image: $*"; }
die() { echo "build-image: error: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd, or see .ci/run for how CI does it)"

label_of() { docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------- base
recipe_hash=$(printf '%s' "$BASE_RECIPE" | sha256sum | cut -c1-16)
if [ "$(label_of "$BASE" org.resilient-mtl.base-recipe)" != "$recipe_hash" ]; then
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to build the base image $BASE (run as root once)"
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
    mirror=${MTL_DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
        # The first Debian archive apt uses (deb822 "URIs:" or one-line "deb URL SUITE ..."), not -security.
        mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true) \
            | sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
            | grep -E '/debian/?$' | head -n1 || true)
    fi
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*; set MTL_DEBIAN_MIRROR"
    rootfs="$CACHE/rootfs"
    rm -rf "$rootfs"; mkdir -p "$rootfs"
    say "debootstrap $SUITE minbase from $mirror (once; a few minutes)"
    started=$(date +%s)
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change "LABEL org.resilient-mtl.base-recipe=$recipe_hash" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE" >/dev/null
    rm -rf "$rootfs"
    say "base image $BASE imported in $(( $(date +%s) - started ))s"
else
    say "base image $BASE is up to date"
fi
base_id=$(docker image inspect --format '{{.Id}}' "$BASE")

# ------------------------------------------------------------------------------- inputs hash
inputs_hash=$(
    {
        echo "$base_id"
        find deploy/Dockerfile deploy/healthcheck.py pyproject.toml README.md mtl_node orchestrator attacks \
            -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-32
)
if [ "$FORCE" = 0 ] && [ "$(label_of "$IMAGE" "$LABEL")" = "$inputs_hash" ]; then
    say "image $IMAGE is up to date (inputs $inputs_hash); nothing to build"
    exit 0
fi

# ----------------------------------------------------------------------------------- wheels
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ctx="$CACHE/context"
rm -rf "$ctx" "$CACHE/wheelhouse"
mkdir -p "$ctx/wheels/deps" "$ctx/wheels/app" "$CACHE/wheelhouse"
say "wheelhouse: pip wheel the project and its runtime dependencies"
# Build from a copy of exactly the hashed sources, so setuptools' build/ and *.egg-info stay out of
# the work tree.
rm -rf "$CACHE/src"; mkdir -p "$CACHE/src"
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md mtl_node orchestrator attacks | tar -x -C "$CACHE/src"
"$PYTHON" -m pip wheel -q --wheel-dir "$CACHE/wheelhouse" "$CACHE/src" >"$CACHE/pip-wheel.log" 2>&1 \
    || { tail -n 30 "$CACHE/pip-wheel.log" >&2; die "pip wheel failed (log: $CACHE/pip-wheel.log)"; }
for whl in "$CACHE"/wheelhouse/*.whl; do
    case "$(basename "$whl")" in
        resilient_mtl-*) cp "$whl" "$ctx/wheels/app/" ;;
        *) cp -p "$whl" "$ctx/wheels/deps/" ;;
    esac
done
ls "$ctx"/wheels/app/*.whl >/dev/null 2>&1 || die "pip wheel did not produce the project's wheel"
cp deploy/Dockerfile deploy/healthcheck.py "$ctx/"

# ------------------------------------------------------------------------------------ image
say "docker build $IMAGE (inputs $inputs_hash)"
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
# The dependency stage first, under a tag of its own: the final build reuses it from the cache,
# and the stage it replaces (when dependencies changed) becomes untagged and is pruned below.
build_log="$CACHE/docker-build.log"
docker build -q --target deps --build-arg "BASE=$BASE" -t "${IMAGE%:*}:deps-cache" "$ctx" \
    >"$build_log" 2>&1 || { cat "$build_log" >&2; die "docker build (dependency stage) failed"; }
docker build -q \
    --build-arg "BASE=$BASE" \
    --label "$LABEL=$inputs_hash" \
    --label "org.opencontainers.image.title=resilient-mtl-node" \
    --label "org.opencontainers.image.source=resilient-mtl" \
    -t "$IMAGE" "$ctx" >"$build_log" 2>&1 || { cat "$build_log" >&2; die "docker build failed"; }
# Earlier builds of this image, now untagged (the dependency stage's cache is kept: no such label).
docker image prune -f --filter "label=$LABEL" >/dev/null || true
docker image prune -f --filter "label=org.resilient-mtl.stage=deps" >/dev/null || true
say "built $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
