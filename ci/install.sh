#!/usr/bin/env bash
# Installs what fusedlora's tests and self-check need on a fresh machine (idempotent, quiet).
# torch comes from the configured package index as torch==2.13.0 (CI's index serves the CPU build; plain PyPI
# serves the CUDA build, which runs the CPU tests too); on a machine without a GPU the kernels run in Triton's
# interpreter. A torch already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  pip_install "triton==3.9.0"
fi
pip_install numpy "pytest>=8" hypothesis "pytest-benchmark>=4" tqdm matplotlib "setuptools>=64" wheel "bitsandbytes>=0.50" "peft>=0.13" "transformers>=4.45" accelerate trl datasets
# The package itself, editable (no AOT build: tests build what they need).
pip_install --no-build-isolation --no-deps -e .
