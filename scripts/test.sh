#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, format, types, generated-code freshness, tests.
#
# The container tests (tests/containers: the node image on a real Docker engine) run last, in
# their own pytest run that lists every test with its outcome, so a log shows they executed. With
# no Docker engine they skip with the reason (CI=true makes that a failure instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
ruff check .
ruff format --check .
mypy mtl_node attacks orchestrator
lint-imports  # the layering contracts in pyproject.toml ([tool.importlinter])
python -m pytest --ignore=tests/containers "$@"
echo "== container tests: tests/containers (Docker engine, image resilient-mtl-node) =="
python -m pytest tests/containers -rfEsxp "$@"
