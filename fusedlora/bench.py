"""`python -m fusedlora.bench`: the project's plain benchmark script (needs a CUDA GPU).

Measures, side by side in one run, on fresh random inputs, medians of many runs:
- host time per launch: the prebuilt path's ctypes launch vs Triton's own launch of the same kernel;
- first call of a prebuilt kernel in a fresh process vs the JIT path's first call (compile included);
- op timings fwd+bwd against eager torch, torch.compile and Liger-Kernel (when installed).
Prints a Markdown report (and writes it to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _env_line():
    import torch
    import triton
    return (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")


def host_launch_us(n_calls: int = 20000, reps: int = 7) -> dict:
    """Host time per launch of rms_norm_fwd on a tiny problem: our launcher vs Triton's launcher."""
    import torch

    from . import kernels, registry
    from .loader import constexpr_key, get_loader
    n_cols, rows = 2048, 4
    x = torch.randn(rows, n_cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_cols, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device="cuda")
    meta = kernels.rms_norm_meta(n_cols, False)
    key = constexpr_key(meta)
    args = (x, w, y, rstd, n_cols, n_cols, rows, n_cols, 1e-6, 0.0)
    spec = registry.get("rms_norm_fwd")
    arch = get_loader().arch(0)
    num_warps, num_stages = spec.config(arch, meta)
    ours = get_loader().launcher(spec)
    fn = spec.fn
    grid = (rows, 1, 1)

    def run_ours():
        for _ in range(n_calls):
            ours(grid, args, key)

    def run_triton():
        for _ in range(n_calls):
            fn[grid](*args, **meta, num_warps=num_warps, num_stages=num_stages)

    ours(grid, args, key)
    aot = next(iter(ours.memo.values()))
    raw = aot.cuLaunchKernel
    aot(grid, args, ours.bind(*args)[1])
    buf, params, stream = aot.tls.state
    stream.value = torch.cuda.current_stream().cuda_stream
    func, block, shared = aot.func, aot.block, aot.shared

    def run_floor():  # the driver call alone, everything prepared: what no Python launcher can beat
        for _ in range(n_calls):
            raw(func, 4, 1, 1, block, 1, 1, shared, stream, params, None)

    out = {}
    for name, f in (("fusedlora prebuilt (ctypes cuLaunchKernel)", run_ours), ("triton JIT launcher", run_triton),
                    ("floor", run_floor)):
        f()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            times.append((t1 - t0) / n_calls * 1e6)
        out[name] = statistics.median(times)
    y_ref = torch.empty_like(y)
    ours(grid, (x, w, y_ref, rstd) + args[4:], key)
    fn[grid](x, w, y, rstd, *args[4:], **meta, num_warps=num_warps, num_stages=num_stages)
    torch.cuda.synchronize()
    assert torch.equal(y, y_ref)
    out["path"] = get_loader().paths.get("rms_norm_fwd")
    return out


_FIRST_CALL = r"""
import json, time, torch
torch.empty(1, device="cuda"); torch.cuda.synchronize()
from fusedlora.ops import rms_norm
x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16); w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); t0 = time.perf_counter(); rms_norm(x, w); torch.cuda.synchronize(); t1 = time.perf_counter()
rms_norm(x, w); torch.cuda.synchronize(); t2 = time.perf_counter(); rms_norm(x, w); torch.cuda.synchronize(); t3 = time.perf_counter()
from fusedlora import loader
print(json.dumps({"first_ms": (t1 - t0) * 1e3, "warm_ms": (t3 - t2) * 1e3, "path": loader.get_loader().paths}))
"""


def first_call_ms() -> dict:
    res = {}
    for mode, extra in (("prebuilt", {"FUSEDLORA_AOT_ONLY": "1"}), ("jit (empty Triton cache)", {"FUSEDLORA_JIT": "1"})):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache, **extra)
            for k in ("FUSEDLORA_JIT", "FUSEDLORA_AOT_ONLY"):
                if k not in extra:
                    env.pop(k, None)
            r = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, timeout=600)
            if r.returncode:
                res[mode] = {"error": r.stderr[-500:]}
            else:
                res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


def _bench_fwd_bwd(fn, inputs_fn, grad_fn, warmup=25, rep=200):
    """(GPU ms from CUDA-graph replay, ms per eager step) of forward+backward, median, rotating among 4
    fresh random input sets. The graph number is the kernels' time without host launch gaps; the eager
    number is what a training loop sees on this host."""
    import torch
    from triton.testing import do_bench, do_bench_cudagraph
    sets = [inputs_fn() for _ in range(4)]
    grads = [grad_fn() for _ in range(4)]
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % 4
        out = fn(*sets[i])
        torch.autograd.backward(out, grads[i])
        for t in sets[i]:
            if isinstance(t, torch.Tensor):
                t.grad = None
    eager = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            graph = do_bench_cudagraph(step, rep=rep, return_mode="median")
    except Exception as e:  # an implementation that cannot be captured keeps its eager number only
        print(f"  (no CUDA-graph timing: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        graph = float("nan")
    return graph, eager


def _peak_mib(fn, inputs_fn, grad_fn):
    import torch
    args = inputs_fn()
    g = grad_fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.autograd.backward(out, g)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rms_norm_table(rows=8192, n=4096) -> list[dict]:
    import torch

    from .ops.rms_norm import naive_rms_norm, rms_norm
    dt = torch.bfloat16

    def inputs():
        return (torch.randn(rows, n, device="cuda", dtype=dt, requires_grad=True),
                (1 + 0.1 * torch.randn(n, device="cuda", dtype=dt)).requires_grad_())

    def grad():
        return torch.randn(rows, n, device="cuda", dtype=dt)

    impls = {"fusedlora": lambda x, w: rms_norm(x, w, 1e-6),
             "eager torch": lambda x, w: naive_rms_norm(x, w, 1e-6)}
    compiled = torch.compile(lambda x, w: naive_rms_norm(x, w, 1e-6))
    impls["torch.compile"] = compiled
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        impls["Liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)
    except Exception:
        pass
    out = []
    for name, f in impls.items():
        graph_ms, eager_ms = _bench_fwd_bwd(f, inputs, grad)
        out.append({"work": f"RMSNorm {rows}x{n} bf16 fwd+bwd", "impl": name, "ms": graph_ms, "eager_ms": eager_ms,
                    "peak_mib": _peak_mib(f, inputs, grad)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedlora.bench")
    ap.add_argument("--out", default=None, help="write the Markdown report here too")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: launch,first,ops")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("fusedlora.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {_env_line()}.", ""]
    if "launch" not in skip:
        h = host_launch_us()
        ours = h["fusedlora prebuilt (ctypes cuLaunchKernel)"]
        theirs = h["triton JIT launcher"]
        lines += ["### Host time per launch (rms_norm_fwd, 4x2048 bf16, median of 7 x 20000 launches)", "",
                  "| launcher | µs / launch |", "|---|---|",
                  f"| fusedlora prebuilt (path: {h['path']}) | {ours:.2f} |", f"| Triton's own launcher | {theirs:.2f} |",
                  f"| bare ctypes `cuLaunchKernel`, all prepared (floor) | {h['floor']:.2f} |",
                  f"| ratio Triton / fusedlora | {theirs / ours:.2f}x |", ""]
    if "first" not in skip:
        f = first_call_ms()
        lines += ["### First call in a fresh process (rms_norm 64x4096 bf16, CUDA already initialised)", "",
                  "| path | first call ms | warm call ms |", "|---|---|---|"]
        for mode, r in f.items():
            if "error" in r:
                lines.append(f"| {mode} | error: {r['error'][-200:]!r} | |")
            else:
                lines.append(f"| {mode} | {r['first_ms']:.2f} | {r['warm_ms']:.3f} |")
        lines.append("")
    if "ops" not in skip:
        rows = rms_norm_table()
        lines += ["### Ops, forward + backward (median, fresh random inputs)", "",
                  "GPU ms: CUDA-graph replay (kernel time, no launch gaps). Eager ms: `do_bench` of the plain "
                  "Python step (includes host overhead where the host is the bottleneck).", "",
                  "| work | implementation | GPU ms | ratio vs fusedlora | eager ms | peak extra MiB |",
                  "|---|---|---|---|---|---|"]
        base = {r["work"]: r["ms"] for r in rows if r["impl"] == "fusedlora"}
        for r in rows:
            lines.append(f"| {r['work']} | {r['impl']} | {r['ms']:.3f} | {r['ms'] / base[r['work']]:.2f}x | "
                         f"{r['eager_ms']:.3f} | {r['peak_mib']:.0f} |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
