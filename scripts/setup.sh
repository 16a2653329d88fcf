#!/usr/bin/env bash
# Create .venv and install resilient-mtl into it (idempotent). `--dev` adds the test/lint tools.
#
# torch is installed first and pinned (2.13.0) so that pip takes the CPU build where one is
# available locally, instead of resolving the newest release with GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extras}"
echo "setup: $(python -c 'import torch, grpc; print("torch", torch.__version__, "grpcio", grpc.__version__)')"
