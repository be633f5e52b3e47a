"""Gated linear units: h = act(gate) * up with act = SiLU (SwiGLU) or GELU (GeGLU, erf or tanh).

Elementwise over flattened contiguous tensors (the forward also over row blocks of a wider buffer). Lengths
and strides are specialised on 16-divisibility only (so masked loads stay 16-byte vectors; every LLM MLP
size qualifies) and are otherwise runtime values.
Backward recomputes the activation from gate instead of storing it.
"""

import triton
import triton.language as tl

from csrc_triton._math import _act_and_grad


@triton.jit
def glu_fwd_kernel(GATE, UP, OUT, n_cols, stride_in, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # One program per BLOCK columns of one row. gate and up may be column blocks of a wider buffer (row
    # stride stride_in: the LoRA MLP's one [T, 2I] gate|up GEMM output); OUT is contiguous. A contiguous
    # input of any shape is one row of n_cols = numel elements.
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(n_cols, BLOCK)
    row = pid // col_blocks
    cols = (pid - row * col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * stride_in + cols
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(OUT + row.to(tl.int64) * n_cols + cols, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP, H, n_elements, ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr
):
    # DGATE / DUP may alias GATE / UP and H may alias DOUT (in-place backward): each element is read
    # before it is written. STORE_H also writes h = act(gate) * up, bit-identical to the forward's, for a
    # caller that needs h again (LoRA down_proj's dA) without a separate recompute pass.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dh = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DGATE + offs, (dh * u * da).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * a).to(DUP.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)
