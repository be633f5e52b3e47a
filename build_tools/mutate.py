"""Mutation check of the kernel tests: apply one small fault at a time to a kernel source (a sign, a dropped
cast, a dropped scale, an off-by-one mask...), run that kernel's tests under the interpreter, and report the
first test that fails - or SURVIVED. The source is restored after each run.

    python -m build_tools.mutate            # all mutations (a few minutes on 2 CPU cores)
    python -m build_tools.mutate rope ce    # those whose name starts with one of these
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SELECTIONS = {  # each op's reference, fuzz, fault and bad-input cases live in its own file (tests mirror the package)
    "rms_norm": ["tests/ops/test_rms_norm.py"],
    "rope": ["tests/ops/test_rope.py"],
    "cross_entropy": ["tests/ops/test_cross_entropy.py", "tests/ops/test_linear_loss.py"],
    "glu": ["tests/ops/test_glu.py"],
    "glu_lora": ["tests/ops/test_glu_lora.py", "tests/test_lora.py"],
    "_math": ["tests/ops/test_glu.py", "tests/ops/test_glu_lora.py"],
    "quant": ["tests/test_quant.py"],
    "moe_lora": ["tests/ops/test_moe_lora.py"],
}

# (name, kernel file, text, replacement)
MUTATIONS = [
    (
        "rms_norm: no Llama cast before the weight",
        "rms_norm",
        "y = xhat.to(X.dtype.element_ty).to(tl.float32) * w[None, :]",
        "y = xhat * w[None, :]",
    ),
    ("rms_norm: eps dropped", "rms_norm", "tl.sum(x * x, axis=1) / n_cols + eps)", "tl.sum(x * x, axis=1) / n_cols)"),
    (
        "rms_norm: backward sign",
        "rms_norm",
        "dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))",
        "dx = rstd * (g + xhat * (tl.sum(g * xhat, axis=0) / n_cols))",
    ),
    (
        "rms_norm: backward ignores the offset",
        "rms_norm",
        "w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset\n    dw = tl.zeros",
        "w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)\n    dw = tl.zeros",
    ),
    (
        "rope: first half reads the second half of cos",
        "rope",
        "c1 = tl.load(COS + crow + d, mask",
        "c1 = tl.load(COS + crow + half + d, mask",
    ),
    ("rope: forward rotation sign", "rope", "y1 = x1 * c1 - x2 * s1", "y1 = x1 * c1 + x2 * s1"),
    (
        "rope: backward rotates forwards",
        "rope",
        "y1 = x1 * c1 + x2 * s2\n        y2 = x2 * c2 - x1 * s1",
        "y1 = x1 * c1 - x2 * s1\n        y2 = x2 * c2 + x1 * s2",
    ),
    (
        "rope: partial-rotary tail zeroed",
        "rope",
        "tl.store(oq, tl.load(xq, mask=mp, other=0.0), mask=mp)",
        "tl.store(oq, 0.0 * tl.load(xq, mask=mp, other=0.0), mask=mp)",
    ),
    (
        "ce: last column of rows wider than 1000 dropped",
        "cross_entropy",
        "ok = start + cols < n_cols",
        "ok = start + cols < tl.where(n_cols > 1000, n_cols - 1, n_cols)",
    ),
    ("ce: softcap gradient factor dropped", "cross_entropy", "g = g * (1.0 - t * t)", "g = g * 1.0"),
    ("ce: label smoothing's mean term dropped", "cross_entropy", " - label_smoothing * (sum_x / n_cols)", ""),
    ("ce: mean counts ignored labels", "cross_entropy", "count += used.to(tl.int32)", "count += 1"),
    (
        "glu: silu derivative sign",
        "_math",
        "return g * s, s * (1.0 + g * (1.0 - s))",
        "return g * s, s * (1.0 - g * (1.0 - s))",
    ),
    (
        "glu: forward drops up",
        "glu",
        "(a * u).to(OUT.dtype.element_ty), mask=mask)",
        "(a * 1.0).to(OUT.dtype.element_ty), mask=mask)",
    ),
    (
        "glu: LoRA dots lose the accumulator",
        "glu_lora",
        'return tl.dot(a, b, acc, input_precision="ieee")',
        'return tl.dot(a, b, input_precision="ieee")',
    ),
    ("quant: GPTQ zero offset dropped", "quant", "& MASK) + zero_offset", "& MASK)"),
    (
        "quant: GPTQ scale of the wrong group",
        "quant",
        "s = tl.load(SCALES + g[:, None].to(tl.int64) * s_stride",
        "s = tl.load(SCALES + (g * 0)[:, None].to(tl.int64) * s_stride",
    ),
    (
        "quant: NF4 nibbles swapped",
        "quant",
        "tl.reshape(tl.interleave(hi, lo), [PB])",
        "tl.reshape(tl.interleave(lo, hi), [PB])",
    ),
    (
        "moe_lora: every expert reads expert 0's weights",
        "moe_lora",
        "flat = w_e.to(tl.int64) * n_out * n_in + out_idx.to(tl.int64) * n_in + in_idx",
        "flat = (w_e * 0).to(tl.int64) * n_out * n_in + out_idx.to(tl.int64) * n_in + in_idx",
    ),
    ("moe_lora: SwiGLU without the sigmoid", "moe_lora", "return gate * tl.sigmoid(gate) * up", "return gate * up"),
    ("moe_lora: LoRA scale dropped", "moe_lora", "return scale * mma(small,", "return mma(small,"),
]


def run_one(name, kernel, text, replacement) -> str:
    path = ROOT / "csrc_triton" / (f"{kernel}.py" if kernel.startswith("_") else f"{kernel}/kernel.py")
    original = path.read_text()
    if original.count(text) != 1:
        return f"NOT APPLIED (the text occurs {original.count(text)} times)"
    try:
        path.write_text(original.replace(text, replacement))
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *SELECTIONS[kernel]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    finally:
        path.write_text(original)
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", proc.stdout, re.M)
    if failed:
        return f"caught by {failed[0]}"
    return "SURVIVED" if proc.returncode == 0 else f"error (exit {proc.returncode}): {proc.stdout[-300:]}"


def main(argv=None) -> int:
    prefixes = (argv if argv is not None else sys.argv[1:]) or [""]
    rows = [(m, run_one(*m)) for m in MUTATIONS if any(m[0].startswith(p) for p in prefixes)]
    print("| mutation | result |\n|---|---|")
    for (name, *_), result in rows:
        print(f"| {name} | {result} |")
    return 1 if any(r == "SURVIVED" or r.startswith("NOT") for _, r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
