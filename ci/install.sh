#!/usr/bin/env bash
# Installs what fusedlora's tests and self-check need on a fresh machine (idempotent, quiet).
# torch comes from the configured package index as torch==2.13.0 (CI's index serves the CPU build; plain PyPI
# serves the CUDA build, which runs the CPU tests too); on a machine without a GPU the kernels run in Triton's
# interpreter. A torch already installed is kept when it is in pyproject.toml's tested range.
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
pip_install "setuptools>=64" wheel
# The package itself, editable (no AOT build: tests build what they need), with its [test] extra: pyproject.toml
# is the one list of what the tests import and of the tested version ranges (torch and triton above are in them).
pip_install --no-build-isolation -e ".[test]"
# Every requirement of the package and its [test] extra, installed and in range: a missing one fails CI here
# rather than skipping tests silently (the ops' fuzz cases in tests/ops/ without hypothesis).
"$PY" - <<'CHECK'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

problems = []
for line in md.requires("fusedlora") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name} is not installed")
        continue
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} is outside the tested range {req.specifier}")
if problems:
    sys.exit("ci/install.sh: fusedlora[test] is not installed as the tests need it: " + "; ".join(problems))
CHECK
