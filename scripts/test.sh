#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, format, types, generated-code freshness, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
ruff check .
ruff format --check .
mypy mtl_node attacks orchestrator
python -m pytest "$@"
