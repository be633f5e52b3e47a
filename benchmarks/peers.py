"""`python -m benchmarks.peers` (or `python -m fusedlora.bench` from a checkout): the kernel-level benchmark
against the peers (needs a CUDA GPU). Kept out of the installed package: run it with the wheel first on PYTHONPATH
and this repository after it, so that the prebuilt path is what is measured.

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

    return (
        f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )


def host_launch_us(n_calls: int = 20000, reps: int = 7) -> dict:
    """Host time per launch of rms_norm_fwd on a tiny problem: our launcher vs Triton's launcher."""
    import torch

    from fusedlora import registry
    from fusedlora.loader import constexpr_key, get_loader

    n_cols, rows = 2048, 4
    x = torch.randn(rows, n_cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_cols, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device="cuda")
    meta = registry.get("rms_norm_fwd").constexprs(n_cols=n_cols, gemma_cast=False)
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
    for name, f in (
        ("fusedlora prebuilt (ctypes cuLaunchKernel)", run_ours),
        ("triton JIT launcher", run_triton),
        ("floor", run_floor),
    ):
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
    for mode, extra in (
        ("prebuilt", {"FUSEDLORA_AOT_ONLY": "1"}),
        ("jit (empty Triton cache)", {"FUSEDLORA_JIT": "1"}),
    ):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache, **extra)
            for k in ("FUSEDLORA_JIT", "FUSEDLORA_AOT_ONLY"):
                if k not in extra:
                    env.pop(k, None)
            r = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, timeout=600
            )
            if r.returncode:
                res[mode] = {"error": r.stderr[-500:]}
            else:
                res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


def _bench_fwd_bwd(fn, inputs_fn, grad_fn, warmup=25, rep=200, graph=True):
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
    if not graph:
        return float("nan"), eager
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


def _liger(module, name):
    try:
        mod = __import__(f"liger_kernel.ops.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception:
        return None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def op_cases():
    """name -> (inputs(), grad(), {implementation: fn(*inputs)}). bf16 throughout, fresh random inputs."""
    import torch
    import torch.nn.functional as F

    from fusedlora.ops import (
        cross_entropy,
        fused_linear_cross_entropy,
        naive_rms_norm,
        naive_rope,
        naive_swiglu,
        rms_norm,
        rope,
        swiglu,
    )

    dt, dev = torch.bfloat16, "cuda"
    cases = {}

    # RMSNorm 8192 x 4096
    def rn_in():
        return (
            torch.randn(8192, 4096, device=dev, dtype=dt, requires_grad=True),
            (1 + 0.1 * torch.randn(4096, device=dev, dtype=dt)).requires_grad_(),
        )

    impls = {
        "fusedlora": lambda x, w: rms_norm(x, w, 1e-6),
        "eager torch": lambda x, w: naive_rms_norm(x, w, 1e-6),
        "torch.compile": torch.compile(lambda x, w: naive_rms_norm(x, w, 1e-6)),
    }
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    if liger:
        impls["Liger"] = lambda x, w, f=liger: f.apply(x, w, 1e-6, 0.0, "llama", False)
    cases["RMSNorm 8192x4096"] = (rn_in, lambda: torch.randn(8192, 4096, device=dev, dtype=dt), impls)

    # SwiGLU 8192 x 14336
    def sw_in():
        return (
            torch.randn(8192, 14336, device=dev, dtype=dt, requires_grad=True),
            torch.randn(8192, 14336, device=dev, dtype=dt, requires_grad=True),
        )

    impls = {"fusedlora": swiglu, "eager torch": naive_swiglu, "torch.compile": torch.compile(naive_swiglu)}
    liger = _liger("swiglu", "LigerSiLUMulFunction")
    if liger:
        impls["Liger"] = lambda a, b, f=liger: f.apply(a, b)
    cases["SwiGLU 8192x14336"] = (sw_in, lambda: torch.randn(8192, 14336, device=dev, dtype=dt), impls)

    # RoPE B4 S2048 Hq32 Hk8 D128 with position_ids (packed sequences: positions restart mid-row)
    b, hq, hk, sq, d = 4, 32, 8, 2048, 128
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(8192, device=dev, dtype=torch.float32), inv)
    cos_cache, sin_cache = torch.cat([f, f], -1).cos().to(dt), torch.cat([f, f], -1).sin().to(dt)
    pos = torch.cat([torch.arange(1000), torch.arange(sq - 1000)]).to(dev)[None].expand(b, sq).contiguous()

    def rp_in():
        return (
            torch.randn(b, sq, hq, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(),
            torch.randn(b, sq, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(),
        )

    def rp_grad():
        return (torch.randn(b, hq, sq, d, device=dev, dtype=dt), torch.randn(b, hk, sq, d, device=dev, dtype=dt))

    impls = {
        "fusedlora": lambda q, k: rope(q, k, cos_cache, sin_cache, pos),
        "eager torch": lambda q, k: naive_rope(q, k, cos_cache, sin_cache, pos),
        "torch.compile": torch.compile(lambda q, k: naive_rope(q, k, cos_cache, sin_cache, pos)),
    }
    liger = _liger("rope", "LigerRopeFunction")
    if liger:  # given HF's gathered cos/sin: Liger cannot gather by position_ids itself
        cos_g, sin_g = cos_cache[pos], sin_cache[pos]
        impls["Liger (pre-gathered cos/sin)"] = lambda q, k, f=liger: f.apply(q, k, cos_g, sin_g)
    cases["RoPE B4 S2048 Hq32 Hk8 D128, position_ids"] = (rp_in, rp_grad, impls)

    # Cross-entropy 8192 x 128256
    t, v, hdim = 8192, 128256, 4096
    labels = torch.randint(0, v, (t,), device=dev)

    def ce_in():
        return (torch.randn(t, v, device=dev, dtype=dt, requires_grad=True),)

    def scalar_grad():
        return torch.ones((), device=dev)

    impls = {
        "fusedlora": lambda z: cross_entropy(z, labels),
        "eager torch (fp32 upcast, as HF)": lambda z: F.cross_entropy(z.float(), labels),
        "torch.compile": torch.compile(lambda z: F.cross_entropy(z.float(), labels)),
    }
    liger = _liger("cross_entropy", "LigerCrossEntropyFunction")
    if liger:
        impls["Liger"] = lambda z, f=liger: _first(f.apply(z * 1, labels, None))
    cases["CE 8192x128256"] = (ce_in, scalar_grad, impls)

    # Fused linear + CE, T8192 H4096 V128256, frozen lm_head (LoRA)
    w = (0.02 * torch.randn(v, hdim, device=dev)).to(dt)

    def fl_in():
        return (torch.randn(t, hdim, device=dev, dtype=dt, requires_grad=True),)

    impls = {
        "fusedlora": lambda h: fused_linear_cross_entropy(h, w, labels),
        "eager torch": lambda h: F.cross_entropy(F.linear(h, w).float(), labels),
    }
    liger = _liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    if liger:
        impls["Liger"] = lambda h, f=liger: _first(f.apply(h, w, labels))
    cases["linear+CE T8192 H4096 V128256 (frozen W)"] = (fl_in, scalar_grad, impls)
    return cases


def op_table(only: str = "") -> list[dict]:
    out = []
    for work, (inputs, grad, impls) in op_cases().items():
        if only and only.lower() not in work.lower():
            continue
        rep = 1000 if "linear" in work else 300
        for name, f in impls.items():
            try:
                # Liger's CE / FLCE break CUDA-graph capture (and leave torch's RNG unusable): eager only.
                graph_ms, eager_ms = _bench_fwd_bwd(
                    f, inputs, grad, rep=rep, graph=not ("Liger" in name and "CE" in work)
                )
                peak = _peak_mib(f, inputs, grad)
            except Exception as e:
                print(f"  {work} / {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            out.append({"work": work, "impl": name, "ms": graph_ms, "eager_ms": eager_ms, "peak_mib": peak})
            print(
                f"  {work:<45} {name:<32} {graph_ms:8.3f} ms (graph) {eager_ms:8.3f} ms (eager) {peak:9.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
        import torch

        torch.cuda.empty_cache()
    return out


def quant_section() -> list[str]:
    """NF4 and GPTQ dequantisation vs bitsandbytes, side by side (bitsandbytes needed for its rows)."""
    import torch
    from triton.testing import do_bench

    from fusedlora.quant import dequantize_gptq, dequantize_nf4

    lines = ["### Dequantisation (median; effective GB/s = packed weight + absmax/scales + output bytes / time)", ""]
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:
        bnbf = None
        lines.append(f"(bitsandbytes unavailable: {e}; its rows are missing)")
    lines += ["| work | implementation | µs | GB/s | ratio bnb / fusedlora |", "|---|---|---|---|---|"]
    if bnbf is not None:
        for shape in ((4096, 4096), (28672, 8192)):
            w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            out = torch.empty_like(w)
            assert torch.equal(dequantize_nf4(q, qs), bnbf.dequantize_4bit(q, qs)), "not bit-identical"
            nbytes = q.numel() * q.element_size() + qs.absmax.numel() + 2 * w.numel()
            ours = do_bench(lambda: dequantize_nf4(q, qs, out=out), rep=300, return_mode="median")
            theirs = do_bench(lambda: bnbf.dequantize_4bit(q, qs, out=out), rep=300, return_mode="median")
            work = f"NF4 {shape[0]}x{shape[1]} bf16 (nested, blocksize 64)"
            lines.append(
                f"| {work} | fusedlora | {ours * 1e3:.1f} | {nbytes / ours / 1e6:.0f} | {theirs / ours:.2f}x |"
            )
            lines.append(f"| {work} | bitsandbytes | {theirs * 1e3:.1f} | {nbytes / theirs / 1e6:.0f} | |")
        # The seed puzzle's harness: an MLP's gate, up and down weights, synchronising after each, 1000 times.
        mlp = []
        for hd, m, dt in ((4096, 14336, torch.bfloat16), (2048, 8192, torch.float16), (1024, 4096, torch.bfloat16)):
            for shape in ((m, hd), (m, hd), (hd, m)):
                w = torch.randn(*shape, device="cuda", dtype=dt)
                mlp.append(bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        res = {}
        for name, fn in (
            ("fusedlora", lambda q, qs: dequantize_nf4(q, qs)),
            ("bitsandbytes", lambda q, qs: bnbf.dequantize_4bit(q, qs)),
        ):
            for q, qs in mlp:
                fn(q, qs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(1000):
                for q, qs in mlp:
                    fn(q, qs)
                    torch.cuda.synchronize()
            res[name] = time.perf_counter() - t0
        lines.append(
            f"| seed harness: 3 MLPs x (gate, up, down), sync after each, 1000 iterations | fusedlora | "
            f"{res['fusedlora'] * 1e6 / 9000:.1f} per weight | total {res['fusedlora']:.3f} s | "
            f"{res['bitsandbytes'] / res['fusedlora']:.2f}x |"
        )
        lines.append(
            f"| seed harness | bitsandbytes | {res['bitsandbytes'] * 1e6 / 9000:.1f} per weight | "
            f"total {res['bitsandbytes']:.3f} s | |"
        )
    in_f = out_f = 8192
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device="cuda").to(torch.int32)
    qz = torch.randint(-(2**31), 2**31 - 1, (in_f // 128, out_f // 8), dtype=torch.int64, device="cuda").to(torch.int32)
    sc = (torch.rand(in_f // 128, out_f, device="cuda") * 0.01).half()
    for dt in (torch.float16, torch.bfloat16):
        for transpose in (False, True):
            out = torch.empty((in_f, out_f) if transpose else (out_f, in_f), device="cuda", dtype=dt)
            ms = do_bench(
                lambda: dequantize_gptq(qw, qz, sc, group_size=128, out_dtype=dt, transpose=transpose, out=out),
                rep=300,
                return_mode="median",
            )
            nbytes = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2 + out.numel() * 2
            layout = "[in, out]" if transpose else "[out, in]"
            lines.append(
                f"| GPTQ 4-bit 8192x8192 g128 -> {str(dt).replace('torch.', '')} {layout} | fusedlora | "
                f"{ms * 1e3:.1f} | {nbytes / ms / 1e6:.0f} | |"
            )
    return lines + [""]


LORA_SHAPES = {"hidden": 2048, "inter": 8192, "q_out": 2048, "kv_out": 512, "r": 16, "tokens": 8192}


def lora_modules(nf4: bool) -> dict:
    """PEFT-wrapped Llama-3.2-1B attention q/k/v and MLP modules on the GPU (bf16 or NF4 base weights; bf16
    adapters with random B so every term is live)."""
    import peft
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    sz = LORA_SHAPES
    hidden, inter, r = sz["hidden"], sz["inter"], sz["r"]

    def linear(i, o):
        if nf4:
            import bitsandbytes as bnb

            return bnb.nn.Linear4bit(
                i, o, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
            )
        return nn.Linear(i, o, bias=False)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (
                linear(hidden, sz["q_out"]),
                linear(hidden, sz["kv_out"]),
                linear(hidden, sz["kv_out"]),
            )

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = linear(hidden, inter), linear(hidden, inter)
            self.down_proj = linear(inter, hidden)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    )
    mods = {"MLP": MLP(), "QKV": Attn()}
    for name, m in mods.items():
        m = m.to(torch.bfloat16) if not nf4 else m
        m = peft.inject_adapter_in_model(cfg, m.cuda()).cuda()
        for n_, p in m.named_parameters():
            p.requires_grad_("lora_" in n_)
            if "lora_" in n_:
                p.data = p.data.to(torch.bfloat16)
                if "lora_B" in n_:
                    p.data.normal_(0, 0.02)
        mods[name] = m
    return mods


def lora_cases(mods: dict) -> dict:
    """work -> (PEFT fn, fusedlora fn); each maps x to a tuple of outputs."""
    from fusedlora import lora

    qkv, mlp = mods["QKV"], mods["MLP"]
    return {
        "LoRA_MLP": (lambda x: (mlp(x),), lambda x: (lora.apply_lora_mlp_swiglu(mlp, x),)),
        "LoRA_QKV": (lambda x: (qkv.q_proj(x), qkv.k_proj(x), qkv.v_proj(x)), lambda x: lora.apply_lora_qkv(qkv, x)),
    }


def lora_section() -> list[str]:
    """Fused LoRA vs PEFT eager on Llama-3.2-1B layer shapes (hidden 2048, intermediate 8192, 32/8 heads of
    64), T = 8192 tokens, r = 16, bf16; plain and NF4 (bitsandbytes Linear4bit) base weights."""
    import torch

    try:
        import peft  # noqa: F401
    except Exception as e:
        return [f"(peft unavailable: {e}; no LoRA section)", ""]
    lines = [
        "### Fused LoRA vs PEFT eager (Llama-3.2-1B layer shapes, T=8192, r=16, bf16; fwd+bwd, median)",
        "",
        "Eager: a training loop's step time (do_bench, host launches included). GPU: CUDA-graph replay of the same step.",
        "",
        "| work | base | PEFT ms | fusedlora ms | speed-up | PEFT GPU ms | fusedlora GPU ms | GPU speed-up | "
        "PEFT MiB kept for bwd (beyond outputs) | fusedlora MiB | saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for nf4 in (False, True):
        try:
            cases = lora_cases(lora_modules(nf4))
        except Exception as e:
            lines.append(f"| (setup failed for {'NF4' if nf4 else 'bf16'} base: {type(e).__name__}: {e}) |")
            continue

        def new_x():
            return (
                torch.randn(
                    4,
                    LORA_SHAPES["tokens"] // 4,
                    LORA_SHAPES["hidden"],
                    device="cuda",
                    dtype=torch.bfloat16,
                    requires_grad=True,
                ),
            )

        x0 = new_x()[0]
        for work, (peft_fn, ours_fn) in cases.items():
            with torch.no_grad():
                shapes = [t.shape for t in peft_fn(x0)]

            def new_grads():  # fresh random upstream gradients for every output
                return [torch.randn(sh, device="cuda", dtype=torch.bfloat16) for sh in shapes]

            res = {}
            for name, fn in (("peft", peft_fn), ("ours", ours_fn)):
                gms, ms = _bench_fwd_bwd(fn, new_x, new_grads, warmup=10, rep=300)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                out = fn(x0)
                torch.cuda.synchronize()
                kept = (torch.cuda.memory_allocated() - before - sum(t.numel() * t.element_size() for t in out)) / 2**20
                del out
                res[name] = (ms, kept, gms)
            (pm, pk, _), (om, ok, _) = res["peft"], res["ours"]
            saved = f"{1 - ok / pk:.0%}" if pk > 1 else "-"
            lines.append(
                f"| {work} | {'NF4 (bnb)' if nf4 else 'bf16'} | {pm:.3f} | {om:.3f} | {pm / om:.2f}x | "
                f"{res['peft'][2]:.3f} | {res['ours'][2]:.3f} | {res['peft'][2] / res['ours'][2]:.2f}x | "
                f"{pk:.0f} | {ok:.0f} | {saved} |"
            )
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    ap.add_argument("--out", default=None, help="write the Markdown report here too")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: launch,first,ops,quant,lora")
    ap.add_argument("--only", default="", help="only op cases whose name contains this")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.peers needs a CUDA GPU", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {_env_line()}.", ""]
    if "launch" not in skip:
        h = host_launch_us()
        ours = h["fusedlora prebuilt (ctypes cuLaunchKernel)"]
        theirs = h["triton JIT launcher"]
        lines += [
            "### Host time per launch (rms_norm_fwd, 4x2048 bf16, median of 7 x 20000 launches)",
            "",
            "| launcher | µs / launch |",
            "|---|---|",
            f"| fusedlora prebuilt (path: {h['path']}) | {ours:.2f} |",
            f"| Triton's own launcher | {theirs:.2f} |",
            f"| bare ctypes `cuLaunchKernel`, all prepared (floor) | {h['floor']:.2f} |",
            f"| ratio Triton / fusedlora | {theirs / ours:.2f}x |",
            "",
        ]
    if "first" not in skip:
        f = first_call_ms()
        lines += [
            "### First call in a fresh process (rms_norm 64x4096 bf16, CUDA already initialised)",
            "",
            "| path | first call ms | warm call ms |",
            "|---|---|---|",
        ]
        for mode, r in f.items():
            if "error" in r:
                lines.append(f"| {mode} | error: {r['error'][-200:]!r} | |")
            else:
                lines.append(f"| {mode} | {r['first_ms']:.2f} | {r['warm_ms']:.3f} |")
        lines.append("")
    if "quant" not in skip:
        lines += quant_section()
    if "lora" not in skip:
        lines += lora_section()
    if "ops" not in skip:
        rows = op_table(args.only)
        lines += [
            "### Ops, forward + backward (median, fresh random inputs)",
            "",
            "GPU ms: CUDA-graph replay (kernel time, no launch gaps). Eager ms: `do_bench` of the plain "
            "Python step (includes host overhead where the host is the bottleneck).",
            "",
            "| work | implementation | GPU ms | ratio vs fusedlora | eager ms | peak extra MiB |",
            "|---|---|---|---|---|---|",
        ]
        base = {r["work"]: (r["ms"] if r["ms"] == r["ms"] else r["eager_ms"]) for r in rows if r["impl"] == "fusedlora"}
        for r in rows:
            lines.append(
                f"| {r['work']} | {r['impl']} | {r['ms']:.3f} | {r['ms'] / base.get(r['work'], float('nan')):.2f}x | "
                f"{r['eager_ms']:.3f} | {r['peak_mib']:.0f} |"
            )
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
