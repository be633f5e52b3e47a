#!/usr/bin/env bash
# One full GPU session (device machine): install the carried wheel in a fresh venv, self-check and info
# from outside the repo (prebuilt path), the whole test suite on the GPU, then the benchmarks.
# Usage: bash ci/gpu_session.sh [pytest args, default: tests]; results under $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
WHEEL_PY="env PYTHONPATH=/tmp/flwheel:${PYTHONPATH:-} python3"
if ls dist/fusedlora-*.whl >/dev/null 2>&1; then
  # The built wheel, installed on its own (not the checkout): the prebuilt path as users get it.
  python3 -m pip install -q --no-index --no-deps --target /tmp/flwheel dist/fusedlora-*.whl
  (cd /tmp && $WHEEL_PY -m fusedlora.info && FUSEDLORA_AOT_ONLY=1 $WHEEL_PY -m fusedlora.selfcheck) 2>&1 | tee "$OUT/wheel_selfcheck.txt"
fi
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q "${@:-tests}" 2>&1 | tee "$OUT/pytest.txt" | tail -25
if [ "${SKIP_BENCH:-0}" != 1 ] && [ -d /tmp/flwheel ]; then
  # the wheel first on the path, the checkout after it (benchmarks/ is not installed)
  (REPO=$PWD; cd /tmp && env PYTHONPATH=/tmp/flwheel:$REPO:${PYTHONPATH:-} python3 -m benchmarks.peers \
     --out "$OUT/bench.md" ${BENCH_ARGS:-}) 2>"$OUT/bench_log.txt" | tail -40
fi
