#!/usr/bin/env bash
# The main job: install, then the training demo (HF+PEFT vs fusedlora, each in a fresh process; table + PNG).
# GPU: the Llama-3.2-1B shape, QLoRA. No GPU: the tiny shape under the Triton interpreter (a few minutes).
# Extra arguments go to the demo (python -m fusedlora.demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
exec "${PYTHON:-python3}" -m fusedlora.demo "$@"
