#!/usr/bin/env bash
# The test command: install, then the whole suite. With no GPU, kernels run under TRITON_INTERPRET=1
# against their references and the GPU tests are skipped; on a GPU machine they run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
"${PYTHON:-python3}" -m ruff check .            # lint (rules: pyproject.toml)
"${PYTHON:-python3}" -m ruff format --check .   # the formatter's layout, 120 columns
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
