#!/usr/bin/env bash
# Installs rlkit for development on a fresh machine (python3 only).
# torch: kept as installed; where none is installed, the CPU build 2.13.0 is taken (never a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" >/dev/null 2>&1; then
  # PyPI's Linux wheel of torch is the CUDA build: on Linux take the CPU one (+cpu), from PyTorch's CPU index or a
  # local wheel folder (pip's find-links) where that index cannot be reached; elsewhere PyPI's wheel is the CPU build
  if [ "$(uname -s)" = Linux ]; then
    python3 -m pip install --quiet --retries 1 --timeout 20 "torch==2.13.0+cpu" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  else
    python3 -m pip install --quiet "torch==2.13.0"
  fi
fi
python3 -m pip install --quiet -e ".[dev]"
