"""`python -m fusedlora.selfcheck`: every registered kernel against its plain-torch reference.

On a GPU each kernel runs through the best path the loader finds (prebuilt cubin, else triton.jit);
on a machine with no GPU, through Triton's CPU interpreter (said in the output). Prints a table —
kernel, path, max error, tolerance, pass/fail, time — and exits 1 if any kernel fails or a registered
kernel has no check.
"""
from __future__ import annotations

import os
import sys
import time


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_rms_norm(device, dtype):
    """(rows, kernel -> (error, tolerance)) for RMSNorm forward and backward."""
    import torch

    from .ops.rms_norm import naive_rms_norm, rms_norm
    rows, n = (257, 4096) if device == "cuda" else (33, 2048)
    x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
    dy = torch.randn(rows, n, device=device, dtype=dtype)
    y = rms_norm(x, w, 1e-6)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    yr = naive_rms_norm(xr, wr, 1e-6)
    yr.backward(dy.double())
    # bf16 output rounding (2^-8 relative) bounds the forward; the gradients sum bf16 products.
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    return {"rms_norm_fwd": (_rel_err(y, yr), tol),
            "rms_norm_bwd": (max(_rel_err(x.grad, xr.grad), _rel_err(w.grad, wr.grad)), tol)}


def _grads(outs, grads, inputs):
    import torch
    return torch.autograd.grad(outs, inputs, grads)


def _check_glu(device, dtype):
    import torch

    from .ops.glu import geglu, glu_forward, naive_geglu, naive_swiglu, swiglu
    shape = (257, 14336) if device == "cuda" else (17, 1000)
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    fwd = bwd = 0.0
    for op, ref in ((swiglu, naive_swiglu), (lambda g, u: geglu(g, u, "tanh"), lambda g, u: naive_geglu(g, u, "tanh"))):
        g = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
        u = torch.randn(shape, device=device).to(dtype).requires_grad_()
        dy = torch.randn(shape, device=device).to(dtype)
        y = op(g, u)
        dg, du = _grads(y, dy, (g, u))
        g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
        y64 = ref(g64, u64)
        dg64, du64 = _grads(y64, dy.double(), (g64, u64))
        fwd = max(fwd, _rel_err(y, y64))
        bwd = max(bwd, _rel_err(dg, dg64), _rel_err(du, du64))
    # the forward on the LoRA MLP's layout: gate | up as the halves of one wider buffer
    buf = (2 * torch.randn(shape[0], 2 * shape[1] + 64, device=device)).to(dtype)
    g, u = buf[:, :shape[1]], buf[:, shape[1]:2 * shape[1]]
    fwd = max(fwd, _rel_err(glu_forward(g, u, "silu"), naive_swiglu(g.double(), u.double())))
    return {"glu_fwd": (fwd, tol), "glu_bwd": (bwd, tol)}



def _check_glu_lora(device, dtype):
    """The LoRA MLP's GLU kernels on its layout: e | g as the halves of one buffer with spare columns."""
    import torch

    from .ops.glu_lora import (glu_lora_backward, glu_lora_dyb, glu_lora_forward, glu_lora_rank_pad,
                               naive_glu_lora_backward, naive_glu_lora_dyb, naive_glu_lora_forward)
    (t, i), r = ((1000, 8192) if device == "cuda" else (40, 200)), 16
    eg = torch.randn(t, 2 * i + 64, device=device).to(dtype)
    gate, up = eg[:, :i], eg[:, i:2 * i]
    dout = torch.randn(t, i, device=device).to(dtype)
    xa, dyb = torch.randn(t, 2 * r, device=device).to(dtype), torch.randn(t, r, device=device).to(dtype)
    b_g, b_u = ((torch.randn(i, r, device=device) / r ** 0.5).to(dtype) for _ in range(2))
    a_d = (torch.randn(r, i, device=device) / r ** 0.5).to(dtype)
    lora = (xa[:, :r], xa[:, r:], b_g, b_u, (0.5, 2.0), "silu")
    err_fwd = _rel_err(glu_lora_forward(gate, up, xa, r, b_g, b_u, (0.5, 2.0), "silu"),
                       naive_glu_lora_forward(gate, up, *lora))
    ref = naive_glu_lora_backward(dout, gate, up, xa[:, :r], xa[:, r:], dyb, b_g, b_u, a_d, (0.5, 2.0), "silu")
    de, dg, Q = glu_lora_backward(dout, gate, up, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu")
    R = glu_lora_rank_pad(r)
    got = (de, dg, Q[:, :r], Q[:, R:R + r], Q[:, 2 * R:2 * R + r])
    err = max(_rel_err(a, b) for a, b in zip(got, (ref[0], ref[1], *ref[2])))
    dyb_got = glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=eg[:, 2 * i:2 * i + 2 * r])
    err_dyb = _rel_err(dyb_got, naive_glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0)))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    return {"glu_lora_fwd": (err_fwd, tol), "glu_lora_bwd": (err, tol), "glu_lora_dyb": (err_dyb, tol)}


def _check_cross_entropy(device, dtype):
    import torch

    from .ops.cross_entropy import cross_entropy, naive_cross_entropy
    t, v = (512, 128256) if device == "cuda" else (8, 4096)
    z = (3 * torch.randn(t, v, device=device)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (t,), device=device)
    y[::7] = -100
    loss = cross_entropy(z, y, label_smoothing=0.05)
    (dz,) = _grads(loss * 2.0, None, (z,))  # d loss = 2: exercises scale_by_scalar
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, label_smoothing=0.05)
    (dz64,) = _grads(ref * 2.0, None, (z64,))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    err_grad = _rel_err(dz, dz64)
    # the set-up kernel: the mean's 1/count over 3 blocks of labels (exact up to fp32 division)
    from .ops.cross_entropy import prepare_labels
    y = torch.randint(-1, 50, (5003,), device=device)
    inv = prepare_labels("selfcheck", y, 50, -1, "mean")
    err_prep = abs(inv.item() * float((y != -1).sum()) - 1.0)
    return {"cross_entropy": (max(_rel_err(loss, ref), err_grad), tol), "scale_by_scalar": (err_grad, tol),
            "ce_prepare": (err_prep, 1e-6)}


def _check_rope(device, dtype):
    import torch

    from .ops.rope import naive_rope, rope
    b, hq, hk, s, d = (2, 32, 8, 512, 128) if device == "cuda" else (1, 4, 2, 9, 64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    f = torch.outer(torch.arange(2 * s, device=device, dtype=torch.float64), inv)
    cos, sin = torch.cat([f, f], -1).cos().to(dtype), torch.cat([f, f], -1).sin().to(dtype)
    pos = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).to(device)[None].expand(b, s)  # packed
    q = torch.randn(b, s, hq, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hk, s, d, device=device).to(dtype).requires_grad_()
    qo, ko = rope(q, k, cos, sin, pos)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = _grads((qo, ko), (gq, gk), (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qr, kr = naive_rope(q64, k64, cos.double(), sin.double(), pos)
    dq64, dk64 = _grads((qr, kr), (gq.double(), gk.double()), (q64, k64))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    err = max(_rel_err(qo, qr), _rel_err(ko, kr), _rel_err(dq, dq64), _rel_err(dk, dk64))
    return {"rope": (err, tol)}


def _synthetic_nf4(shape, nested, device, dtype, blocksize=64):
    """A random bitsandbytes-format 4-bit weight and quant state (no bitsandbytes needed)."""
    import math
    from types import SimpleNamespace

    import torch
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    code = torch.sort(torch.rand(16, device=device) * 2 - 1).values
    if nested:
        s2 = SimpleNamespace(absmax=torch.rand(-(-n_blocks // 256), device=device) + 0.5,
                             code=torch.linspace(-1, 1, 256, device=device), blocksize=256)
        qs = SimpleNamespace(absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device), state2=s2,
                             offset=0.25, nested=True)
    else:
        qs = SimpleNamespace(absmax=torch.rand(n_blocks, device=device) + 0.1, nested=False)
    qs.code, qs.blocksize, qs.shape, qs.dtype, qs.quant_type = code, blocksize, torch.Size(shape), dtype, "nf4"
    return packed, qs


def _check_quant(device, dtype):
    import torch

    from .quant import dequantize_gptq, dequantize_nf4, naive_dequantize_gptq, naive_dequantize_nf4
    shape = (4096, 4096) if device == "cuda" else (33, 70)
    err_nf4 = 0.0
    exact = device == "cuda" or dtype != torch.bfloat16  # the interpreter truncates to bf16
    for nested in (False, True):
        packed, qs = _synthetic_nf4(shape, nested, device, dtype)
        ours, ref = dequantize_nf4(packed, qs), naive_dequantize_nf4(packed, qs)
        err_nf4 = max(err_nf4, 0.0 if torch.equal(ours, ref) else _rel_err(ours, ref) + (1.0 if exact else 0.0))
        # into the rows of a wider buffer (the LoRA MLP's [W | s B | 0]: the STRIDED variants)
        rows = (4096, 2048) if device == "cuda" else (9, 128)
        packed, qs = _synthetic_nf4(rows, nested, device, dtype)
        buf = torch.zeros(rows[0], rows[1] + 32, dtype=qs.dtype, device=device)
        ours, ref = dequantize_nf4(packed, qs, out=buf[:, :rows[1]]), naive_dequantize_nf4(packed, qs)
        spill = bool(buf[:, rows[1]:].any())  # the columns beside the block must stay untouched
        if spill or not torch.equal(ours, ref):
            err_nf4 = max(err_nf4, _rel_err(ours, ref) + (1.0 if exact or spill else 0.0))
    in_f, out_f = (4096, 4096) if device == "cuda" else (64, 48)
    qw = torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device=device).to(torch.int32)
    qz = torch.randint(-2**31, 2**31 - 1, (in_f // 32, out_f // 8), dtype=torch.int64, device=device).to(torch.int32)
    sc = (torch.rand(in_f // 32, out_f, device=device) * 0.01).half()
    g = (torch.randperm(in_f, device=device) // 32).to(torch.int32)
    ours = dequantize_gptq(qw, qz, sc, g, out_dtype=dtype)
    ref = naive_dequantize_gptq(qw, qz, sc, g, out_dtype=dtype)
    err_gptq = 0.0 if torch.equal(ours, ref) else _rel_err(ours, ref) + (1.0 if exact else 0.0)
    tol = 0.0 if exact else 8e-3  # bit-identical, except the interpreter's bf16 truncation (1 ulp)
    return {"nf4_dequant": (err_nf4, tol), "gptq_dequant": (err_gptq, tol)}


CHECKS = {"nf4_dequant": _check_quant, "gptq_dequant": _check_quant, "rms_norm_fwd": _check_rms_norm, "rms_norm_bwd": _check_rms_norm, "glu_fwd": _check_glu,
          "glu_bwd": _check_glu, "glu_lora_fwd": _check_glu_lora, "glu_lora_bwd": _check_glu_lora, "glu_lora_dyb": _check_glu_lora, "cross_entropy": _check_cross_entropy, "scale_by_scalar": _check_cross_entropy,
          "ce_prepare": _check_cross_entropy,
          "rope": _check_rope}


def run(verbose: bool = True) -> list[dict]:
    import torch

    from . import registry
    from .loader import get_loader
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's bf16 is slow and its dots wrong
    rows, done = [], {}
    for name in sorted(registry.all_kernels()):
        check = CHECKS.get(name)
        if check is None:
            rows.append({"kernel": name, "path": "-", "error": float("nan"), "tol": 0.0, "ok": False,
                         "ms": 0.0, "note": "no self-check registered"})
            continue
        if check not in done:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            results = check(device, dtype)
            if on_gpu:
                torch.cuda.synchronize()
            done[check] = (results, (time.perf_counter() - t0) * 1e3)
        results, ms = done[check]
        err, tol = results[name]
        path = get_loader().paths.get(name, "?") if on_gpu else "interpreter (CPU)"
        rows.append({"kernel": name, "path": path, "error": err, "tol": tol, "ok": err <= tol, "ms": ms, "note": ""})
    return rows


def main(argv=None) -> int:
    import argparse
    argparse.ArgumentParser(
        prog="python -m fusedlora.selfcheck",
        description="Run every registered kernel once against its plain-torch reference and print one row per kernel "
                    "(its path: prebuilt cubin or triton.jit). With no CUDA GPU the kernels run in Triton's CPU "
                    "interpreter. FUSEDLORA_AOT_ONLY=1 fails a kernel that has no prebuilt cubin.").parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are imported
        print("fusedlora selfcheck: no CUDA GPU here; running every kernel in Triton's CPU interpreter (fp32)")
    else:
        print(f"fusedlora selfcheck on {torch.cuda.get_device_name()} (bf16)")
    rows = run()
    print(f"{'kernel':<24} {'path':<22} {'rel. error':>11} {'tolerance':>10} {'result':>7} {'ms':>9}")
    for r in rows:
        print(f"{r['kernel']:<24} {r['path']:<22} {r['error']:>11.3e} {r['tol']:>10.1e} "
              f"{'PASS' if r['ok'] else 'FAIL':>7} {r['ms']:>9.1f} {r['note']}")
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
