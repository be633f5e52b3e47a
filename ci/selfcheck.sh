#!/usr/bin/env bash
# The main job (for now): install, then check every registered kernel against its reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
"${PYTHON:-python3}" -m fusedlora.info
exec "${PYTHON:-python3}" -m fusedlora.selfcheck
