"""SwiGLU and GeGLU: `act(gate) * up` (kernels: csrc_triton/glu.py).

The kernels compute in fp32 and round once; HF's eager MLP rounds `act(gate)` to the input dtype
before the multiply, so fp16/bf16 results may differ from it by one rounding step.
`inplace=True` lets the backward write d(gate) and d(up) into the saved gate/up buffers (saves two
activation-sized allocations); only use it when nothing else reads gate/up after the forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import kernels
from ..loader import constexpr_key, launcher
from ._common import cdiv, check_tensor, sm_count

_APPROX = {"none": "gelu", "tanh": "gelu_tanh"}


def _naive_act(act: str):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]


def naive_swiglu(gate, up):
    return F.silu(gate) * up


def naive_geglu(gate, up, approximate="none"):
    return F.gelu(gate, approximate=approximate) * up


@functools.lru_cache(maxsize=None)
def _meta(act: str, store_h: bool | None = None):
    m = kernels.glu_meta(act) if store_h is None else kernels.glu_bwd_meta(act, store_h)
    return m, constexpr_key(m)


def glu_forward(gate, up, act: str):
    out = torch.empty_like(gate)
    n = gate.numel()
    meta, key = _meta(act)
    launcher("glu_fwd")(((n + meta["BLOCK"] - 1) // meta["BLOCK"], 1, 1), (gate, up, out, n), key)
    return out


def glu_backward(dout, gate, up, act: str, inplace: bool, store_h: bool = False):
    """(d gate, d up), plus h = act(gate) * up written over `dout` when store_h (then returns 3 tensors)."""
    dgate = gate if inplace else torch.empty_like(gate)
    dup = up if inplace else torch.empty_like(up)
    n = gate.numel()
    meta, key = _meta(act, bool(store_h))
    launcher("glu_bwd")(((n + meta["BLOCK"] - 1) // meta["BLOCK"], 1, 1), (dout, gate, up, dgate, dup, dout, n), key)
    return (dgate, dup, dout) if store_h else (dgate, dup)



# --------------------------------------------------------------- the LoRA MLP's GLU backward
GLU_LORA_PROGRAMS_PER_SM = 4  # H100 sweep (T = I = 8192, r 16): 4 per SM 0.254 ms, 8 per SM 0.256 ms


@functools.lru_cache(maxsize=None)
def _lora_meta(act: str, rank: int):
    m = kernels.glu_lora_bwd_meta(act, rank)
    return m, constexpr_key(m)


def glu_lora_backward(dout, gate, up, xa, xa_up_offset, dyb, ranks, scales, act: str, inplace: bool = True):
    """The GLU backward of a LoRA MLP with the adapter products that reduce over tokens, in one pass over
    dout, gate and up.

    dout, gate, up: [T, I] with one row stride; xa: [T, *] holding X A_g^T in columns [0, r_g) and X A_u^T
    in [xa_up_offset, xa_up_offset + r_u); dyb: [T, r_d] = s_d dY B_d; ranks = (r_g, r_u, r_d); scales =
    (s_g, s_u). h = act(gate) * up is never stored.
    Returns (de, dg, Q) with Q [I, 3R] = [s_g de^T XA_g | s_u dg^T XA_u | h^T dyb] in fp32 (dB_gate,
    dB_up and dA_down^T), each rank zero-padded to R (`kernels.glu_lora_rank_pad`).
    de and dg overwrite gate and up when inplace."""
    T, I = gate.shape
    for name, t in (("dout", dout), ("up", up)):
        if t.shape != gate.shape or t.stride() != gate.stride():
            raise ValueError(f"glu_lora_backward: {name} must match gate's shape and strides")
    if gate.stride(1) != 1 or xa.stride(1) != 1 or dyb.stride(1) != 1:
        raise ValueError("glu_lora_backward: every operand needs a unit last stride")
    meta, key = _lora_meta(act, max(ranks))
    R, bm, bn = meta["R"], meta["BLOCK_M"], meta["BLOCK_N"]
    col_tiles = cdiv(I, bn)
    # Enough (column tile, row group) programs to fill the GPU; more groups only cost [I, 3R] partials.
    groups = max(1, min(cdiv(T, bm), round(GLU_LORA_PROGRAMS_PER_SM * sm_count(gate.get_device()) / col_tiles)))
    rows_per_group = max(1, cdiv(cdiv(T, groups), bm)) * bm
    groups = cdiv(T, rows_per_group)
    dgate = gate if inplace else torch.empty_like(gate)
    dup = up if inplace else torch.empty_like(up)
    q_part = torch.empty(groups, I, 3 * R, dtype=torch.float32, device=gate.device)
    launcher("glu_lora_bwd")(
        (col_tiles, groups, 1),
        (dout, gate, up, dgate, dup, xa, dyb, q_part, T, I, gate.stride(0), xa.stride(0), int(xa_up_offset),
         dyb.stride(0), int(ranks[0]), int(ranks[1]), int(ranks[2]), rows_per_group, float(scales[0]),
         float(scales[1])),
        key)
    return dgate, dup, q_part[0] if groups == 1 else q_part.sum(0)  # no groups (T = 0): zeros


@functools.lru_cache(maxsize=None)
def _rows_meta(act: str, rank: int, fwd: bool):
    m = kernels.glu_lora_rows_meta(act, rank, fwd)
    return m, constexpr_key(m)


def _check_rows_operands(op, x1, x2, ws):
    if x1.dim() != 2 or x2.shape != x1.shape or x2.stride() != x1.stride() or x1.stride(1) != 1:
        raise ValueError(f"{op}: the two [T, I] operands need one shape and one row stride with a unit last "
                         f"stride, got {tuple(x1.shape)}/{tuple(x1.stride())} and {tuple(x2.shape)}/{tuple(x2.stride())}")
    for name, w in ws:
        if w.dtype != x1.dtype or w.device != x1.device:
            raise TypeError(f"{op}: {name} is {w.dtype} on {w.device}; it must match the activations "
                            f"({x1.dtype} on {x1.device})")


def glu_lora_forward(gate, up, a_down, act: str):
    """(h, h @ a_down^T) of a LoRA MLP in one pass: h = act(gate) * up is written once and its rank-r
    product with down_proj's A [r, I] taken from registers (no GEMM re-reading h). gate, up: [T, I]."""
    _check_rows_operands("glu_lora_forward", gate, up, (("a_down", a_down),))
    T, I = gate.shape
    r = a_down.shape[0]
    if a_down.shape[1] != I or a_down.stride(1) != 1:
        raise ValueError(f"glu_lora_forward: a_down must be [r, {I}] with a unit last stride, got "
                         f"{tuple(a_down.shape)}")
    h = torch.empty_like(gate)
    xa = gate.new_empty(T, r)
    meta, key = _rows_meta(act, r, True)
    launcher("glu_lora_rows")(
        (cdiv(T, meta["BLOCK_M"]), 1, 1),
        (gate, up, h, a_down, a_down, xa, T, I, gate.stride(0), 1, a_down.stride(0), r, r, r, 0, 1.0, 1.0), key)
    return h, xa


def glu_lora_dyb(de, dg, b_gate, b_up, scales):
    """[s_g de B_g | s_u dg B_u]  [T, r_g + r_u]: the backward's adapter-input gradients of gate and up
    (the rank-r products that reduce over I), one pass over de and dg. b_*: [I, r]."""
    _check_rows_operands("glu_lora_dyb", de, dg, (("b_gate", b_gate), ("b_up", b_up)))
    T, I = de.shape
    rg, ru = b_gate.shape[1], b_up.shape[1]
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b.shape[0] != I or not b.is_contiguous():
            raise ValueError(f"glu_lora_dyb: {name} must be a contiguous [{I}, r], got {tuple(b.shape)}")
    meta, key = _rows_meta("silu", max(rg, ru), False)
    R = meta["R"]
    # the kernel reads R columns of both (vector loads): zero-pad a narrower rank (r < 16, rank_pattern)
    b_gate, b_up = (b if b.shape[1] == R else F.pad(b, (0, R - b.shape[1])) for b in (b_gate, b_up))
    out = de.new_empty(T, rg + ru)
    launcher("glu_lora_rows")(
        (cdiv(T, meta["BLOCK_M"]), 1, 1),
        (de, dg, de, b_gate, b_up, out, T, I, de.stride(0), R, 1, rg, ru, rg + ru, rg,
         float(scales[0]), float(scales[1])), key)
    return out


def naive_glu_lora_forward(gate, up, a_down, act: str):
    """float64 reference of glu_lora_forward."""
    d = torch.float64
    a = _naive_act(act)(gate.to(d))
    h = a * up.to(d)
    return h, h @ a_down.to(d).t()


def naive_glu_lora_dyb(de, dg, b_gate, b_up, scales):
    """float64 reference of glu_lora_dyb."""
    d = torch.float64
    return torch.cat([scales[0] * de.to(d) @ b_gate.to(d), scales[1] * dg.to(d) @ b_up.to(d)], 1)


def naive_glu_lora_backward(dout, gate, up, xa_g, xa_u, dyb, scales, act: str):
    """Plain-torch reference of glu_lora_backward in float64, unpadded: (de, dg, (s_g de^T XA_g,
    s_u dg^T XA_u, h^T dyb))."""
    d = torch.float64
    e = gate.to(d).requires_grad_()
    g = up.to(d).requires_grad_()
    a = _naive_act(act)(e)
    h = a * g
    de, dg = torch.autograd.grad(h, (e, g), dout.to(d))
    sg, su = scales
    return de, dg, (sg * de.t() @ xa_g.to(d), su * dg.t() @ xa_u.to(d), h.detach().t() @ dyb.to(d))

class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, inplace):
        out = glu_forward(gate, up, act)
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.inplace = act, inplace
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dout.contiguous(), gate, up, ctx.act, ctx.inplace)
        return dgate, dup, None, None


def _glu(op, gate, up, act, inplace):
    check_tensor(op, "gate", gate)
    check_tensor(op, "up", up, like=gate, like_name="gate")
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate is {gate.dtype} but up is {up.dtype}; they must match")
    gate, up = gate.contiguous(), up.contiguous()
    return GLUFunction.apply(gate, up, act, bool(inplace))


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(gate) * up, differentiable in both."""
    return _glu("swiglu", gate, up, "silu", inplace)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    """gelu(gate, approximate) * up, differentiable in both; approximate is "none" (erf) or "tanh"."""
    if approximate not in _APPROX:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu("geglu", gate, up, _APPROX[approximate], inplace)
