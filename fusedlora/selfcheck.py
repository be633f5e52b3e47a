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


CHECKS = {"rms_norm_fwd": _check_rms_norm, "rms_norm_bwd": _check_rms_norm}


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
