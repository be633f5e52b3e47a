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



# ------------------------------------------------- the LoRA MLP's GLU with its adapters on the fly
GLU_LORA_PROGRAMS_PER_SM = 4  # H100 sweep (T = I = 8192, r 16): 4 per SM 0.254 ms, 8 per SM 0.256 ms


@functools.lru_cache(maxsize=None)
def _lora_meta(kind: str, act: str, rank: int):
    m = (kernels.glu_lora_fwd_meta if kind == "fwd" else kernels.glu_lora_bwd_meta)(act, rank)
    return m, constexpr_key(m)


def _row_groups(T, bm, col_tiles, device):
    """(groups, rows_per_group): enough (column tile, row group) programs to fill the GPU; more groups only
    cost more partial sums. rows_per_group is a multiple of bm."""
    groups = max(1, min(cdiv(T, bm), round(GLU_LORA_PROGRAMS_PER_SM * sm_count(device) / col_tiles)))
    rows_per_group = max(1, cdiv(cdiv(T, groups), bm)) * bm
    return cdiv(T, rows_per_group), rows_per_group


def _check_lora_glu(op, gate, up, xa, adapters, ranks):
    """gate/up [T, I] with one stride; xa [T, *]; adapters: (name, tensor, expected shape)."""
    T, I = gate.shape
    if up.shape != gate.shape or up.stride() != gate.stride():
        raise ValueError(f"{op}: up must match gate's shape and strides")
    if gate.stride(1) != 1 or xa.stride(1) != 1 or xa.shape[0] != T:
        raise ValueError(f"{op}: gate/up and xa need a unit last stride and xa one row per token")
    for name, t, shape in adapters:
        if tuple(t.shape) != shape or not t.is_contiguous() or t.dtype != gate.dtype:
            raise ValueError(f"{op}: {name} must be a contiguous {gate.dtype} tensor of shape {shape}, got "
                             f"{t.dtype} {tuple(t.shape)}")


def glu_lora_forward(gate, up, xa, xa_up_offset, b_gate, b_up, a_down, ranks, scales, act: str):
    """The GLU of a LoRA MLP whose gate/up base GEMMs wrote E = X W_g^T and G = X W_u^T alone:
        h = act(E + s_g XA_g B_g^T) * (G + s_u XA_u B_u^T)   and   h A_d^T (down_proj's adapter input)
    in one pass over E and G. gate, up: [T, I] with one row stride; xa: [T, *] holding X A_g^T in columns
    [0, r_g) and X A_u^T in [xa_up_offset, xa_up_offset + r_u); b_gate, b_up: [I, r]; a_down: [r_d, I];
    ranks = (r_g, r_u, r_d); scales = (s_g, s_u). Returns (h [T, I] contiguous, h A_d^T [T, r_d])."""
    T, I = gate.shape
    rg, ru, rd = ranks
    _check_lora_glu("glu_lora_forward", gate, up, xa,
                    (("b_gate", b_gate, (I, rg)), ("b_up", b_up, (I, ru)), ("a_down", a_down, (rd, I))), ranks)
    meta, key = _lora_meta("fwd", act, max(ranks))
    R, bm, bn = meta["R"], meta["BLOCK_M"], meta["BLOCK_N"]
    col_tiles = cdiv(I, bn)
    groups, rows_per_group = _row_groups(T, bm, col_tiles, gate.get_device())
    h = gate.new_empty(T, I)
    part = torch.empty(col_tiles, T, R, dtype=torch.float32, device=gate.device)
    launcher("glu_lora_fwd")(
        (col_tiles, groups, 1),
        (gate, up, h, xa, b_gate, b_up, a_down, part, T, I, gate.stride(0), xa.stride(0), int(xa_up_offset),
         int(rg), int(ru), int(rd), rows_per_group, float(scales[0]), float(scales[1])),
        key)
    xad = (part[0] if col_tiles == 1 else part.sum(0))[:, :rd].to(gate.dtype)
    return h, xad


def glu_lora_backward(dout, gate, up, xa, xa_up_offset, dyb, b_gate, b_up, a_down, ranks, scales, act: str,
                      inplace: bool = True, out=None):
    """The GLU backward of a LoRA MLP (the pair of glu_lora_forward: gate/up are the base GEMMs' E and G,
    dout = dY W_d is down_proj's base dX; the adapters are added on the fly), with the adapter products that
    reduce over tokens, in one pass over dout, gate and up.

    dout: [T, I]; gate, up: [T, I] with one row stride; xa as in glu_lora_forward; dyb: [T, r_d] =
    s_d dY B_d; b_gate, b_up: [I, r]; a_down: [r_d, I]. h = act(e) * g is never stored.
    Returns (de, dg, Q) with Q [I, 3R] = [s_g de^T XA_g | s_u dg^T XA_u | h^T dyb] in fp32 (dB_gate,
    dB_up and dA_down^T), each rank zero-padded to R (`kernels.glu_lora_rank_pad`).
    de and dg go to `out` (two [T, I] views with one row stride), else over gate and up when inplace."""
    T, I = gate.shape
    rg, ru, rd = ranks
    _check_lora_glu("glu_lora_backward", gate, up, xa,
                    (("b_gate", b_gate, (I, rg)), ("b_up", b_up, (I, ru)), ("a_down", a_down, (rd, I))), ranks)
    if dout.shape != gate.shape or dout.stride(1) != 1 or dyb.stride(1) != 1 or dyb.shape[0] != T:
        raise ValueError("glu_lora_backward: dout must be [T, I] and dout, dyb need a unit last stride")
    if out is None:
        out = (gate, up) if inplace else (torch.empty_like(gate), torch.empty_like(up))
    dgate, dup = out
    if dgate.shape != gate.shape or dup.stride() != dgate.stride() or dgate.stride(1) != 1:
        raise ValueError("glu_lora_backward: out must be two [T, I] tensors with one row stride")
    meta, key = _lora_meta("bwd", act, max(ranks))
    R, bm, bn = meta["R"], meta["BLOCK_M"], meta["BLOCK_N"]
    col_tiles = cdiv(I, bn)
    groups, rows_per_group = _row_groups(T, bm, col_tiles, gate.get_device())
    q_part = torch.empty(groups, I, 3 * R, dtype=torch.float32, device=gate.device)
    launcher("glu_lora_bwd")(
        (col_tiles, groups, 1),
        (dout, gate, up, dgate, dup, xa, dyb, b_gate, b_up, a_down, q_part, T, I, dout.stride(0), gate.stride(0),
         dgate.stride(0), xa.stride(0), int(xa_up_offset), dyb.stride(0), int(rg), int(ru), int(rd),
         rows_per_group, float(scales[0]), float(scales[1])),
        key)
    return dgate, dup, q_part[0] if groups == 1 else q_part.sum(0)  # no groups (T = 0): zeros


@functools.lru_cache(maxsize=None)
def _dyb_meta(rank: int):
    m = kernels.glu_lora_dyb_meta(rank)
    return m, constexpr_key(m)


def glu_lora_dyb(de, dg, b_gate, b_up, scales, out=None):
    """[s_g de B_g | s_u dg B_u]  [T, r_g + r_u]: the LoRA MLP backward's adapter-input gradients of gate
    and up (the rank-r products that reduce over I), in one pass over de and dg. de, dg: [T, I] with one
    row stride; b_*: [I, r] of de's dtype; out: an optional [T, r_g + r_u] destination (unit last stride)."""
    if de.dim() != 2 or dg.shape != de.shape or dg.stride() != de.stride() or de.stride(1) != 1:
        raise ValueError(f"glu_lora_dyb: de and dg need one shape and one row stride with a unit last stride, "
                         f"got {tuple(de.shape)}/{tuple(de.stride())} and {tuple(dg.shape)}/{tuple(dg.stride())}")
    T, I = de.shape
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b.dim() != 2 or b.shape[0] != I:
            raise ValueError(f"glu_lora_dyb: {name} must be [{I}, r], got {tuple(b.shape)}")
        if b.dtype != de.dtype or b.device != de.device:
            raise TypeError(f"glu_lora_dyb: {name} is {b.dtype} on {b.device}; it must match de ({de.dtype} on "
                            f"{de.device})")
    rg, ru = b_gate.shape[1], b_up.shape[1]
    meta, key = _dyb_meta(max(rg, ru))
    rb = meta["RB"]
    # the kernel reads rows of RB contiguous values: only a rank that is not a power of two, or the
    # narrower of two unequal ranks (PEFT rank_pattern), needs a zero-padded copy
    b_gate, b_up = (b.contiguous() if b.shape[1] == rb else F.pad(b, (0, rb - b.shape[1])) for b in (b_gate, b_up))
    if out is None:
        out = de.new_empty(T, rg + ru)
    elif out.shape != (T, rg + ru) or out.stride(1) != 1 or out.dtype != de.dtype or out.device != de.device:
        raise ValueError(f"glu_lora_dyb: out must be a [{T}, {rg + ru}] {de.dtype} tensor with a unit last stride, "
                         f"got {out.dtype} {tuple(out.shape)}/{tuple(out.stride())}")
    launcher("glu_lora_dyb")(
        (cdiv(T, meta["BLOCK_M"]), 1, 1),
        (de, dg, b_gate, b_up, out, T, I, de.stride(0), rg, ru, out.stride(0), float(scales[0]), float(scales[1])),
        key)
    return out


def naive_glu_lora_dyb(de, dg, b_gate, b_up, scales):
    """float64 reference of glu_lora_dyb."""
    d = torch.float64
    return torch.cat([scales[0] * de.to(d) @ b_gate.to(d), scales[1] * dg.to(d) @ b_up.to(d)], 1)


def _naive_lora_gate_up(gate, up, xa_g, xa_u, b_gate, b_up, scales):
    d = torch.float64
    return (gate.to(d) + scales[0] * xa_g.to(d) @ b_gate.to(d).t(),
            up.to(d) + scales[1] * xa_u.to(d) @ b_up.to(d).t())


_NAIVE_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def naive_glu_lora_forward(gate, up, xa_g, xa_u, b_gate, b_up, a_down, scales, act: str):
    """float64 reference of glu_lora_forward: (h, h A_d^T)."""
    e, g = _naive_lora_gate_up(gate, up, xa_g, xa_u, b_gate, b_up, scales)
    h = _NAIVE_ACTS[act](e) * g
    return h, h @ a_down.to(torch.float64).t()


def naive_glu_lora_backward(dout, gate, up, xa_g, xa_u, dyb, b_gate, b_up, a_down, scales, act: str):
    """Plain-torch reference of glu_lora_backward in float64, unpadded: (de, dg, (s_g de^T XA_g,
    s_u dg^T XA_u, h^T dyb))."""
    d = torch.float64
    e, g = (t.requires_grad_() for t in _naive_lora_gate_up(gate, up, xa_g, xa_u, b_gate, b_up, scales))
    h = _NAIVE_ACTS[act](e) * g
    de, dg = torch.autograd.grad(h, (e, g), dout.to(d) + dyb.to(d) @ a_down.to(d))
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
