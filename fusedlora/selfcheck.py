"""`python -m fusedlora.selfcheck`: every registered kernel against its plain-torch reference.

On a GPU each kernel runs through the best path the loader finds (prebuilt cubin, else triton.jit);
on a machine with no GPU, through Triton's CPU interpreter (said in the output). Prints a table —
kernel, path, max error, tolerance, pass/fail, time — and exits 1 if any kernel fails or a registered
kernel has no check.
"""

from __future__ import annotations

import importlib
import os
import sys
import time


def _check_of(spec):
    """The function a kernel's registry entry names as its self-check ("module:function", beside the op's naive
    reference): check(device, dtype) -> {kernel: (error, tolerance)} for every kernel it covers."""
    if not spec.check:
        return None
    module, _, function = spec.check.partition(":")
    return getattr(importlib.import_module(module), function)


def run(verbose: bool = True) -> list[dict]:
    import torch

    from . import registry
    from .loader import get_loader

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's bf16 is slow and its dots wrong
    rows, done = [], {}
    for name, spec in sorted(registry.all_kernels().items()):
        check = _check_of(spec)
        if check is None:
            rows.append(
                {
                    "kernel": name,
                    "path": "-",
                    "error": float("nan"),
                    "tol": 0.0,
                    "ok": False,
                    "ms": 0.0,
                    "note": "no self-check registered",
                }
            )
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
        "interpreter. FUSEDLORA_AOT_ONLY=1 fails a kernel that has no prebuilt cubin.",
    ).parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are imported
        print("fusedlora selfcheck: no CUDA GPU here; running every kernel in Triton's CPU interpreter (fp32)")
    else:
        print(f"fusedlora selfcheck on {torch.cuda.get_device_name()} (bf16)")
    rows = run()
    print(f"{'kernel':<24} {'path':<22} {'rel. error':>11} {'tolerance':>10} {'result':>7} {'ms':>9}")
    for r in rows:
        print(
            f"{r['kernel']:<24} {r['path']:<22} {r['error']:>11.3e} {r['tol']:>10.1e} "
            f"{'PASS' if r['ok'] else 'FAIL':>7} {r['ms']:>9.1f} {r['note']}"
        )
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
