#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each): what CI runs.
#   bash tests/fuzz/run.sh [SECONDS]
# A finding stops the target with a non-zero exit and leaves crash-<hash> in tests/fuzz/findings/.
# FUZZ_SEED (default 1) fixes the order of the inputs tried; FUZZ_RUNS=N stops after N inputs
# instead of SECONDS, so that how far a run gets does not depend on the machine's speed: CI uses
# that (a longer exploration is for a person to start).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p tests/fuzz/findings
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
for target in tests/fuzz/fuzz_*.py; do
    echo "fuzz: $target for ${seconds}s"
    bound=(-max_total_time="$seconds")
    [ -n "${FUZZ_RUNS:-}" ] && bound=(-runs="$FUZZ_RUNS" -max_total_time="$seconds")
    "$python" "$target" "${bound[@]}" -seed="${FUZZ_SEED:-1}" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix=tests/fuzz/findings/ "$corpus" 2>&1 | tail -n 5
    # tail hides the status: take the target's own
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then echo "fuzz: $target found a problem (exit $status)" >&2; exit "$status"; fi
done
