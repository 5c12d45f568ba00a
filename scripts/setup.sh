#!/usr/bin/env bash
# Installs rlkit for development on a fresh machine (python3 only).
# torch: kept as installed; where none is installed, the CPU build 2.13.0 is taken (never a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" >/dev/null 2>&1; then
  # PyPI's Linux wheel is the CUDA build; PyTorch's CPU index has the CPU one. Where that index cannot be reached
  # (an offline machine with its own wheel house), pip's configured sources are asked instead.
  python3 -m pip install --quiet --retries 1 --timeout 20 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    || python3 -m pip install --quiet "torch==2.13.0"
fi
python3 -m pip install --quiet -e ".[dev]"
