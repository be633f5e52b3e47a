"""The LoRA MLP's GLU kernels (csrc_triton/glu_lora/kernel.py): launchers and float64 references.

glu_lora_forward: h = act(e) * g with the gate/up adapter terms added to the base GEMM outputs per tile;
glu_lora_backward: the GLU gradients with the adapter products that reduce over tokens (h never stored);
glu_lora_dyb: [s_g de B_g | s_u dg B_u], the rank-r products that reduce over I. Used by fusedlora.lora.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csrc_triton.glu_lora import GLU_LORA_BWD, GLU_LORA_DYB, GLU_LORA_FWD, GLU_LORA_PROGRAMS_PER_SM, glu_lora_rank_pad

from ..loader import launch
from ._common import cdiv, rel_err, sm_count, wide_rows

__all__ = [
    "glu_lora_forward",
    "glu_lora_backward",
    "glu_lora_dyb",
    "row_groups",
    "glu_lora_rank_pad",
    "naive_glu_lora_forward",
    "naive_glu_lora_backward",
    "naive_glu_lora_dyb",
]


def _empty_rows_like(t):
    """A new tensor of t's shape and row stride (a column block of a new buffer if t is one)."""
    return wide_rows(t, t.shape[0], t.stride(0))[:, : t.shape[1]]


def row_groups(T, I, meta, device, per_sm=None):
    """(groups, rows_per_group) for a (column tile, row group) grid: enough programs to fill the GPU (per_sm
    per SM, default GLU_LORA_PROGRAMS_PER_SM); more groups only cost the backward's [I, 3R] partials."""
    per_sm = GLU_LORA_PROGRAMS_PER_SM if per_sm is None else per_sm
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    col_tiles = cdiv(I, bn)
    if not isinstance(T, int):  # a custom op's fake (torch.compile): nothing launches, no guard on T
        return max(1, round(per_sm * sm_count(device) / col_tiles)), bm
    groups = max(1, min(cdiv(T, bm), round(per_sm * sm_count(device) / col_tiles)))
    rows_per_group = max(1, cdiv(cdiv(T, groups), bm)) * bm
    return cdiv(T, rows_per_group), rows_per_group


def _check_lora_operands(op, gate, up, xa, xa_up_offset, ranks, factors):
    """gate / up layout, XA's columns, and the rank-r factors ((name, tensor, expected shape), ...)."""
    if gate.dim() != 2 or up.shape != gate.shape or up.stride() != gate.stride():
        raise ValueError(
            f"{op}: gate and up must be 2-D with one shape and strides, got {tuple(gate.shape)}/"
            f"{tuple(gate.stride())} and {tuple(up.shape)}/{tuple(up.stride())}"
        )
    if gate.stride(1) != 1 or xa.stride(1) != 1:
        raise ValueError(f"{op}: gate, up and xa need a unit last stride")
    rg, ru = ranks[0], ranks[1]
    if xa.dim() != 2 or xa.shape[0] != gate.shape[0] or rg > xa_up_offset or xa_up_offset + ru > xa.shape[1]:
        raise ValueError(
            f"{op}: xa {tuple(xa.shape)} must hold X A_g^T in columns [0, {rg}) and X A_u^T in "
            f"[{xa_up_offset}, {xa_up_offset + ru}) for {gate.shape[0]} rows"
        )
    for name, t, shape in factors:
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(
                f"{op}: {name} must be a contiguous {list(shape)}, got {tuple(t.shape)} strides {tuple(t.stride())}"
            )
        if t.dtype != gate.dtype or t.device != gate.device:
            raise TypeError(
                f"{op}: {name} is {t.dtype} on {t.device}; it must match gate ({gate.dtype} on {gate.device})"
            )


def glu_lora_forward(gate, up, xa, xa_up_offset, b_gate, b_up, scales, act: str):
    """h = act(e) * g of a LoRA MLP with e = gate + s_g XA_g B_g^T and g = up + s_u XA_u B_u^T, as a new
    contiguous [T, I] tensor, in one pass over gate and up.

    gate, up: the base GEMM outputs X W_g^T, X W_u^T, [T, I] with one row stride (e.g. the halves of one
    [T, 2I] buffer); xa: [T, *] holding X A_g^T in columns [0, r_g) and X A_u^T in [xa_up_offset,
    xa_up_offset + r_u); b_gate, b_up: [I, r] contiguous, gate's dtype; scales = (s_g, s_u). e and g are
    summed in fp32 (not rounded to the dtype first) and h is rounded once."""
    T, I = gate.shape
    rg, ru = b_gate.shape[1], b_up.shape[1]
    _check_lora_operands(
        "glu_lora_forward", gate, up, xa, xa_up_offset, (rg, ru), (("b_gate", b_gate, (I, rg)), ("b_up", b_up, (I, ru)))
    )
    out = gate.new_empty(T, I)
    shape = dict(act=act, rank=max(rg, ru))
    meta = GLU_LORA_FWD.constexprs(**shape)
    groups, rows_per_group = row_groups(T, I, meta, gate.get_device())
    launch(
        GLU_LORA_FWD,
        (cdiv(I, meta["BLOCK_N"]), groups, 1),
        (
            gate,
            up,
            xa,
            b_gate,
            b_up,
            out,
            T,
            I,
            gate.stride(0),
            xa.stride(0),
            int(xa_up_offset),
            rg,
            ru,
            rows_per_group,
            float(scales[0]),
            float(scales[1]),
        ),
        **shape,
    )
    return out


def glu_lora_backward(
    dout, gate, up, xa, xa_up_offset, dyb, b_gate, b_up, a_down, scales, act: str, inplace: bool = True, out=None
):
    """The GLU backward of a LoRA MLP with the adapter products that reduce over tokens, in one pass over
    dout, gate and up.

    gate, up, xa, b_gate, b_up, scales: as glu_lora_forward's (e and g are recomputed the same way);
    dout: [T, I] = dY W_d (own row stride), to which the kernel adds dyb A_d: dyb [T, r_d] = s_d dY B_d,
    a_down [r_d, I] contiguous. h = act(e) * g is never stored.
    Returns (de, dg, Q) with Q [I, 3R] = [s_g de^T XA_g | s_u dg^T XA_u | h^T dyb] in fp32 (dB_gate,
    dB_up and dA_down^T), each rank zero-padded to R (`glu_lora_rank_pad`).
    de and dg go to `out` = (de, dg) when given (gate's shape and strides), else over gate and up when
    inplace, else to new tensors."""
    T, I = gate.shape
    rg, ru, rd = b_gate.shape[1], b_up.shape[1], a_down.shape[0]
    _check_lora_operands(
        "glu_lora_backward",
        gate,
        up,
        xa,
        xa_up_offset,
        (rg, ru),
        (("b_gate", b_gate, (I, rg)), ("b_up", b_up, (I, ru)), ("a_down", a_down, (rd, I))),
    )
    for name, t, shape in (("dout", dout, (T, I)), ("dyb", dyb, (T, rd))):
        if tuple(t.shape) != shape or t.stride(1) != 1 or t.dtype != gate.dtype:
            raise ValueError(
                f"glu_lora_backward: {name} must be {gate.dtype} {list(shape)} with a unit last "
                f"stride, got {t.dtype} {tuple(t.shape)} strides {tuple(t.stride())}"
            )
    if out is not None:
        dgate, dup = out
        if any(t.shape != gate.shape or t.stride() != gate.stride() for t in out):
            raise ValueError("glu_lora_backward: out tensors must match gate's shape and strides")
    elif inplace:
        dgate, dup = gate, up
    else:
        dgate, dup = _empty_rows_like(gate), _empty_rows_like(up)
    shape = dict(act=act, rank=max(rg, ru, rd))
    meta = GLU_LORA_BWD.constexprs(**shape)
    R = meta["R"]
    groups, rows_per_group = row_groups(T, I, meta, gate.get_device())
    q_part = torch.empty(groups, I, 3 * R, dtype=torch.float32, device=gate.device)
    launch(
        GLU_LORA_BWD,
        (cdiv(I, meta["BLOCK_N"]), groups, 1),
        (
            dout,
            gate,
            up,
            dgate,
            dup,
            xa,
            dyb,
            b_gate,
            b_up,
            a_down,
            q_part,
            T,
            I,
            dout.stride(0),
            gate.stride(0),
            xa.stride(0),
            int(xa_up_offset),
            dyb.stride(0),
            rg,
            ru,
            rd,
            rows_per_group,
            float(scales[0]),
            float(scales[1]),
        ),
        **shape,
    )
    return dgate, dup, q_part[0] if groups == 1 else q_part.sum(0)  # no groups (T = 0): zeros


def glu_lora_dyb(de, dg, b_gate, b_up, scales, out=None):
    """[s_g de B_g | s_u dg B_u]  [T, r_g + r_u]: the LoRA MLP backward's adapter-input gradients of gate
    and up (the rank-r products that reduce over I), in one pass over de and dg. de, dg: [T, I] with one
    row stride; b_*: [I, r] of de's dtype; out (optional): where to write, [T, r_g + r_u] with a unit last
    stride (e.g. the columns after de | dg in one buffer, so dX is one GEMM)."""
    if de.dim() != 2 or dg.shape != de.shape or dg.stride() != de.stride() or de.stride(1) != 1:
        raise ValueError(
            f"glu_lora_dyb: de and dg need one shape and one row stride with a unit last stride, "
            f"got {tuple(de.shape)}/{tuple(de.stride())} and {tuple(dg.shape)}/{tuple(dg.stride())}"
        )
    T, I = de.shape
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b.dim() != 2 or b.shape[0] != I:
            raise ValueError(f"glu_lora_dyb: {name} must be [{I}, r], got {tuple(b.shape)}")
        if b.dtype != de.dtype or b.device != de.device:
            raise TypeError(
                f"glu_lora_dyb: {name} is {b.dtype} on {b.device}; it must match de ({de.dtype} on {de.device})"
            )
    rg, ru = b_gate.shape[1], b_up.shape[1]
    meta = GLU_LORA_DYB.constexprs(rank=max(rg, ru))
    rb = meta["RB"]
    # the kernel reads rows of RB contiguous values: only a rank that is not a power of two, or the
    # narrower of two unequal ranks (PEFT rank_pattern), needs a zero-padded copy
    b_gate, b_up = (b.contiguous() if b.shape[1] == rb else F.pad(b, (0, rb - b.shape[1])) for b in (b_gate, b_up))
    if out is None:
        out = de.new_empty(T, rg + ru)
    elif out.shape != (T, rg + ru) or out.stride(1) != 1 or out.dtype != de.dtype or out.device != de.device:
        raise ValueError(
            f"glu_lora_dyb: out must be [{T}, {rg + ru}] {de.dtype} with a unit last stride, got "
            f"{tuple(out.shape)} {out.dtype} strides {tuple(out.stride())}"
        )
    launch(
        GLU_LORA_DYB,
        (cdiv(T, meta["BLOCK_M"]), 1, 1),
        (de, dg, b_gate, b_up, out, T, I, de.stride(0), rg, ru, out.stride(0), float(scales[0]), float(scales[1])),
        rank=max(rg, ru),
    )
    return out


def naive_glu_lora_dyb(de, dg, b_gate, b_up, scales):
    """float64 reference of glu_lora_dyb."""
    d = torch.float64
    return torch.cat([scales[0] * de.to(d) @ b_gate.to(d), scales[1] * dg.to(d) @ b_up.to(d)], 1)


_NAIVE_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _naive_e_g(gate, up, xa_g, xa_u, b_gate, b_up, scales):
    d = torch.float64
    return (gate.to(d) + scales[0] * xa_g.to(d) @ b_gate.to(d).t(), up.to(d) + scales[1] * xa_u.to(d) @ b_up.to(d).t())


def naive_glu_lora_forward(gate, up, xa_g, xa_u, b_gate, b_up, scales, act: str):
    """float64 reference of glu_lora_forward."""
    e, g = _naive_e_g(gate, up, xa_g, xa_u, b_gate, b_up, scales)
    return _NAIVE_ACTS[act](e) * g


def naive_glu_lora_backward(dout, gate, up, xa_g, xa_u, dyb, b_gate, b_up, a_down, scales, act: str):
    """Plain-torch reference of glu_lora_backward in float64, unpadded: (de, dg, (s_g de^T XA_g,
    s_u dg^T XA_u, h^T dyb))."""
    d = torch.float64
    e, g = (t.requires_grad_() for t in _naive_e_g(gate, up, xa_g, xa_u, b_gate, b_up, scales))
    h = _NAIVE_ACTS[act](e) * g
    de, dg = torch.autograd.grad(h, (e, g), dout.to(d) + dyb.to(d) @ a_down.to(d))
    sg, su = scales
    return de, dg, (sg * de.t() @ xa_g.to(d), su * dg.t() @ xa_u.to(d), h.detach().t() @ dyb.to(d))


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    """The LoRA MLP's GLU kernels on its layout: e | g as the halves of one buffer with spare columns."""
    (t, i), r = ((1000, 8192) if device == "cuda" else (40, 200)), 16
    eg = torch.randn(t, 2 * i + 64, device=device).to(dtype)
    gate, up = eg[:, :i], eg[:, i : 2 * i]
    dout = torch.randn(t, i, device=device).to(dtype)
    xa, dyb = torch.randn(t, 2 * r, device=device).to(dtype), torch.randn(t, r, device=device).to(dtype)
    b_g, b_u = ((torch.randn(i, r, device=device) / r**0.5).to(dtype) for _ in range(2))
    a_d = (torch.randn(r, i, device=device) / r**0.5).to(dtype)
    lora = (xa[:, :r], xa[:, r:], b_g, b_u, (0.5, 2.0), "silu")
    err_fwd = rel_err(
        glu_lora_forward(gate, up, xa, r, b_g, b_u, (0.5, 2.0), "silu"), naive_glu_lora_forward(gate, up, *lora)
    )
    ref = naive_glu_lora_backward(dout, gate, up, xa[:, :r], xa[:, r:], dyb, b_g, b_u, a_d, (0.5, 2.0), "silu")
    de, dg, Q = glu_lora_backward(dout, gate, up, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu")
    R = glu_lora_rank_pad(r)
    got = (de, dg, Q[:, :r], Q[:, R : R + r], Q[:, 2 * R : 2 * R + r])
    err = max(rel_err(a, b) for a, b in zip(got, (ref[0], ref[1], *ref[2])))
    dyb_got = glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=eg[:, 2 * i : 2 * i + 2 * r])
    err_dyb = rel_err(dyb_got, naive_glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0)))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    return {"glu_lora_fwd": (err_fwd, tol), "glu_lora_bwd": (err, tol), "glu_lora_dyb": (err_dyb, tol)}
