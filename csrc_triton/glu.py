"""Gated linear units: h = act(gate) * up with act = SiLU (SwiGLU) or GELU (GeGLU, erf or tanh).

Elementwise over flattened contiguous tensors. n_elements is specialised on 16-divisibility only (so
masked loads stay 16-byte vectors; every LLM MLP size qualifies) and is otherwise a runtime length.
Backward recomputes the activation from gate instead of storing it.
"""
import triton
import triton.language as tl

from csrc_triton._math import gelu_and_grad

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        return gelu_and_grad(g, ACT == 2)


@triton.jit
def glu_fwd_kernel(GATE, UP, OUT, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, H, n_elements, ACT: tl.constexpr, STORE_H: tl.constexpr,
                   BLOCK: tl.constexpr):
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
