#!/usr/bin/env bash
# Installs rlkit for development on a fresh machine (python3 only).
# torch: kept as installed; where none is installed, the CPU build 2.13.0 is taken (never a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" >/dev/null 2>&1; then
  python3 -m pip install --quiet "torch==2.13.0"
fi
python3 -m pip install --quiet -e ".[dev]"
