#!/usr/bin/env bash
# The end-to-end GPU session (device machine): carried wheels (.whl: bitsandbytes, liger-kernel...), the built
# fusedlora wheel (dist/) installed apart from the checkout, then: the patch tests on the GPU (checkout, JIT),
# the demo and the e2e benchmark from the wheel (prebuilt cubins). Results under $OUT (or ./gpu_out).
# Usage: bash ci/gpu_e2e.sh [suite|tests|compile|graphs|wheel|demo|bench|context|moe|moe48]...   (default: tests demo bench);
# suite: the whole test suite against the installed wheel, SUITE_PROCS (4) pytest-xdist workers when .whl carries pytest-xdist and execnet (else processes over files); each failure written as it happens to $OUT/suite_failures.txt;
# PART_TIMEOUT, BENCH_ARGS, CONTEXT_ARGS, MOE_ARGS, MOE48_ARGS pass options to the benchmarks. moe: the MoE rows at
# reduced depth (Qwen3-30B-A3B, Mixtral-8x7B layers; HF+PEFT grouped_mm, Unsloth, fusedlora; batch 4 x 2048, LoRA);
# moe48: fusedlora's QLoRA memory row, all 48 Qwen3-30B-A3B layers, NF4 experts, batch 1 x 4096, checkpointed
# (the 642 M fp32 LoRA parameters with their gradients and AdamW states are 9.6 GiB beside 15.7 GiB of frozen
# weights: unchecked activations, ~8 GiB, would pass the issue's 30 GiB). compile: the torch.compile, checkpoint and
# long-context tests; graphs: the CUDA-graph tests; wheel: the installed wheel's self-check with prebuilt cubins
# only (FUSEDLORA_AOT_ONLY=1: a kernel without one fails), then the fuzz tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .whl/unsloth_bundle.tar.xz ]; then  # (python -m build_tools.peer_bundle): only the unsloth variant's process
  mkdir -p /tmp/unsloth_site && tar -xJf .whl/unsloth_bundle.tar.xz -C /tmp/unsloth_site  # reads it
  export FUSEDLORA_UNSLOTH_PATH=/tmp/unsloth_site
fi
WHEEL_PYTHONPATH=$PYTHONPATH
REPO=$PWD  # benchmarks/ is not installed: the benchmarks run with the wheel first on the path, this checkout after it
if ls dist/fusedlora-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/flwheel dist/fusedlora-*.whl
  WHEEL_PYTHONPATH=/tmp/flwheel:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/env.txt"
# PART_TIMEOUT (seconds, 0 = none) stops one part's python alone: its log under $OUT and what the benchmarks
# wrote after each variant survive (a whole pipeline killed by the device's limit returns nothing).
T="timeout -k 20 ${PART_TIMEOUT:-0}"  # (-k: a pytest-xdist controller that outlives the signal, and its workers, killed)
# the ops' and LoRA functions' torch.compile cases, which stand in their own files (tests/ops/, test_lora, test_quant)
COMPILE_CASES="(compile or unadapted_projection or some_projections_and_no_input_grad or outputs_alias_nothing"
# suite: every test file against the installed wheel (its prebuilt cubins; the checkout's tests and benchmarks after
# it on the path) in SUITE_PROCS workers (pytest-xdist when carried, else processes over files), each test's result
# written as it finishes (-v), so a part cut by PART_TIMEOUT still names what failed; one summary at the end.
suite_from_wheel() {
  local procs=${SUITE_PROCS:-4} i=0 f
  rm -f "$OUT/suite_failures.txt"  # (the failure log appends)
  if python3 -c "import xdist" 2>/dev/null; then  # pytest-xdist carried in .whl: tests dealt out one at a time
    (cd /tmp && FUSEDLORA_FAILURE_LOG=$OUT/suite_failures.txt PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m pytest \
       -v -rfE --durations=30 -p no:cacheprovider \
       -n "$procs" $REPO/tests > "$OUT/suite_0.txt" 2>&1)
    procs=1
  else  # files dealt out largest first to SUITE_PROCS processes
    local -a groups
    for f in $(ls -S tests/test_*.py tests/*/test_*.py); do groups[$((i % procs))]+=" $REPO/$f"; i=$((i + 1)); done
    for i in $(seq 0 $((procs - 1))); do
      (cd /tmp && FUSEDLORA_FAILURE_LOG=$OUT/suite_failures.txt PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m pytest \
         -v -p no:cacheprovider ${groups[$i]} \
         > "$OUT/suite_$i.txt" 2>&1) &
    done
    wait
  fi
  for i in $(seq 0 $((procs - 1))); do
    echo "== part $i: $(grep -c ' PASSED' "$OUT/suite_$i.txt") passed; $(tail -1 "$OUT/suite_$i.txt" | cut -c1-160)"
    grep -E ' (FAILED|ERROR)' "$OUT/suite_$i.txt" | sed 's/ - .*//' | head -40
  done | tee "$OUT/suite_summary.txt"
}
COMPILE_CASES="$COMPILE_CASES or op_names_a_bad_activation) and not test_torch_compile_fullgraph_matches_eager"
for part in "${@:-tests demo bench}"; do
  for p in $part; do
    case $p in
      suite) suite_from_wheel ;;
      tests) $T python3 -m pytest -q tests/hf/test_apply.py tests/test_lora.py tests/test_cuda_graphs.py -x 2>&1 | tee "$OUT/pytest_hf.txt" | tail -15 ;;
      compile) { $T python3 -m pytest -q tests/test_compile.py tests/test_checkpoint.py tests/test_context_search.py
                 $T python3 -m pytest -q tests/ops tests/test_lora.py tests/test_quant.py -k "$COMPILE_CASES"; } 2>&1 \
                 | tee "$OUT/pytest_compile.txt" | tail -15 ;;
      graphs) $T python3 -m pytest -q tests/test_cuda_graphs.py "tests/test_compile.py::test_gpu_compile_layers_reduce_overhead" 2>&1 | tee "$OUT/pytest_graphs.txt" | tail -15 ;;
      wheel) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH FUSEDLORA_AOT_ONLY=1 $T python3 -m fusedlora.selfcheck) 2>&1 \
               | tee "$OUT/selfcheck_aot_only.txt" | tail -8
             $T python3 -m pytest -q tests/ops tests/test_lora.py tests/test_quant.py -k fuzz 2>&1 | tee "$OUT/pytest_fuzz.txt" | tail -5 ;;
      context) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m benchmarks.context --out "$OUT/context.md" \
                 ${CONTEXT_ARGS:-}) 2>&1 | grep -v "it/s\]\|s/it\]" | tee "$OUT/context_log.txt" | tail -20 ;;
      demo) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH $T python3 -m fusedlora.demo --out "$OUT/demo" ${DEMO_ARGS:-}) 2>"$OUT/demo_log.txt" | tail -30 ;;
      bench) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m benchmarks.e2e --out "$OUT/e2e.md" ${BENCH_ARGS:-}) 2>&1 \
               | grep -v "it/s\]\|s/it\]" | tee "$OUT/bench_log.txt" | tail -40 ;;
      moe) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m benchmarks.e2e --models qwen3moe,mixtral --modes lora \
              --variants hf,unsloth,fusedlora --steps 12 --out "$OUT/moe.md" ${MOE_ARGS:-}) 2>&1 \
              | grep -v "it/s\]\|s/it\]" | tee "$OUT/moe_log.txt" | tail -40 ;;
      moe48) (cd /tmp && PYTHONPATH=$WHEEL_PYTHONPATH:$REPO $T python3 -m benchmarks.e2e --models qwen3moe48 --modes qlora \
                --variants fusedlora --batch 1 --seq 4096 --gc on --steps 12 --out "$OUT/moe48.md" ${MOE48_ARGS:-}) 2>&1 \
                | grep -v "it/s\]\|s/it\]" | tee "$OUT/moe48_log.txt" | tail -40 ;;
    esac
  done
done
