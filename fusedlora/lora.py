"""Fused LoRA autograd functions with the seed API (`kernels.lora`): LoRA_MLP, LoRA_QKV, LoRA_O.

This module holds the Functions (tensors and plain scalars in, gradients by named slots out), their
torch.library custom ops for torch.compile (`lora_o`, `lora_qkv`, `lora_mlp`, which `fusedlora.lora_ops` also
names) and the entry points that run a PEFT module through them (`apply_lora_*`). Reading PEFT modules
(`get_lora_parameters`, UnsupportedLoRA) is `fusedlora.peft_layers`, whose names are reachable here too; the
base-weight dispatch (plain / NF4 / GPTQ, `GPTQState`, `dequantize_base`) is `fusedlora.quant`.

Per projection: Y = X W^T (+ bias) + s * (drop(X) A^T) B^T, W a plain, bitsandbytes 4-bit or GPTQ weight.
- Quantised weights are dequantised by fusedlora's one-launch kernels in the forward and again in the
  backward; no dequantised weight is kept. Each activation is kept once; the MLP's gate/up activations
  are overwritten by their gradients in the backward (inplace=True) when autograd frees the graph after it
  (a retained graph's next backward reads them again: then new buffers).
- Dropout follows PEFT: each projection applies its own `nn.Dropout` to its input, drawn in PEFT's
  order (q, k, v / gate, up, down), so with the same RNG state the masks equal PEFT's.
- Weights are read from the module at call time (FSDP2 swaps them); every Function takes tensors and
  plain scalars only.
- A rank-r GEMM writes an output first and the base GEMM adds into it in its epilogue (beta = 1), rather
  than a second read-modify-write pass after the base GEMM.
- LoRA_QKV without active dropout takes a stacked path: one adapter-input GEMM X [A_q; A_k; A_v]^T,
  and one dX GEMM [dQ, dK, dV, s dY B...] @ [W_q; W_k; W_v; A...] (these layers are launch-bound).
- LoRA_MLP: gate and up share one adapter-input GEMM X [A_g; A_u]^T. On the fused path (adapters on all
  three, our activation, no dropout) the base GEMMs X W_g^T | X W_u^T (K = H, no widened input) write one
  buffer; the GLU kernels add the rank-r terms per tile (glu_lora_forward: e, g; glu_lora_backward: e, g
  and down_proj's dh term), the backward kernel writes de | dg over e | g and takes dB_gate, dB_up and
  dA_down from registers (h is never stored, de, dg, h are not re-read for them), one more pass
  (glu_lora_dyb) puts s de B_g | s dg B_u in the buffer's spare columns, and dX is one GEMM over the
  buffer. Other configurations (dropout, custom activations, adapters on some projections) take
  [X, X A_g^T, X A_u^T] @ [W | s B | 0]^T GEMMs (an NF4 weight dequantised straight into its block), get h
  back from the GLU backward kernel (written over dh) and accumulate the gate and up dX in the GEMM
  epilogues.

Status: tested against PEFT's own LoRA layers (float64 reference) in fp32 on CPU (interpreter) and on an
H100, and under bf16 / fp16 autocast on the H100 (hidden 64 and 5120, plain and NF4 bases); GPTQ bases under
PEFT's GPTQLoraLinear with a stand-in for gptqmodel's TorchQuantLinear (gptqmodel itself is not installed
in CI); FSDP2 (fully_shard) in two processes, gloo on CPU and NCCL on two GPUs (tests/test_fsdp.py). See
BENCHMARKS.md for speed against PEFT.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops import _custom
from .ops._common import autocast_dtype, cdiv, check_tensor, saved_tensors_writable, wide_rows
from .ops.glu import glu_backward, glu_forward, refuse_double_backward
from .ops.glu_lora import glu_lora_backward, glu_lora_dyb, glu_lora_forward, glu_lora_rank_pad
from .ops.rms_norm import norm_source
from .peft_layers import (GPTQ_PLAIN_LAYOUT_KERNELS, UnsupportedLoRA, dropout_p, fused_parameters,  # noqa: F401
                          get_lora_parameters, layer_bias, use_custom_ops)
from .quant import (GPTQState, _dequantize_nf4, decode_base, dequantize_base, encode_base, is_nf4,  # noqa: F401
                    nf4_writes_into, weight_shape)


# ------------------------------------------------------------------------------------------- weights
def _compute_dtype(X: torch.Tensor) -> torch.dtype:
    """The autocast dtype of X's device type when autocast is on there (CUDA or CPU), else X's dtype."""
    return autocast_dtype(X) or X.dtype


def _check_adapter(name, W_out, W_in, A, B, s):
    if A is None:
        return
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != W_in or B.shape[0] != W_out or A.shape[0] != B.shape[1]:
        raise ValueError(f"{name}: LoRA A {tuple(A.shape)} / B {tuple(B.shape)} do not match a [{W_out}, {W_in}] "
                         f"weight (expected A [r, {W_in}], B [{W_out}, r])")


def _check_input(name, X, W, quant, in_f, kernels: bool):
    """X as the fused functions take it, or an error in the caller's terms: a float tensor whose last
    dimension is the weight's input size, on a device the kernels run on (when this call launches kernels),
    and (without autocast, on a plain base weight) in the weight's dtype, as PEFT's own layer requires."""
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        raise TypeError(f"{name}: the input X must be a float tensor, got "
                        f"{X.dtype if isinstance(X, torch.Tensor) else type(X).__name__}")
    if X.dim() < 1 or X.shape[-1] != in_f:
        raise ValueError(f"{name}: the input X has shape {tuple(X.shape)} but the weight takes {in_f} input "
                         f"features; expected X [..., {in_f}]")
    if kernels:
        check_tensor(name, "X", X)
    if quant is None and W.is_floating_point() and X.dtype != W.dtype and autocast_dtype(X) is None:
        raise TypeError(f"{name}: the input X is {X.dtype} but the base weight is {W.dtype} and autocast is off "
                        "(PEFT's layer raises here too): cast the input or run under torch.autocast")


def _mm_scaled(a, b, s):
    """s * (a @ b) as one GEMM into a fresh tensor (alpha = s; beta = 0 never reads its old contents)."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=s)


def _base_plus_lora(X, Wt, XA, Bt, s):
    """X @ Wt + s XA @ Bt: the rank-r GEMM writes the output and the base GEMM adds to it in its epilogue
    (beta = 1), instead of a second read-modify-write pass of the output after the base GEMM."""
    return _mm_scaled(XA, Bt, s).addmm_(X, Wt)


# ---------------------------------------------------------------------------------- one projection
class _Proj(NamedTuple):
    W: torch.Tensor
    quant: object
    A: torch.Tensor | None
    B: torch.Tensor | None
    s: float
    bias: torch.Tensor | None = None
    dropout: float = 0.0
    mask: torch.Tensor | None = None  # the dropout mask drawn before the call (the custom-op path)
    Ac: torch.Tensor | None = None    # A and B in the compute dtype, cast once per call (_in_dtype): the
    Bc: torch.Tensor | None = None    # forward and the backward share them (each cast is a kernel launch)


def _in_dtype(prs, dtype):
    """prs with each adapter's A and B cast to the compute dtype once (contiguous: the GLU kernels read B_g,
    B_u and A_d by rows)."""
    return tuple(pr if pr.A is None else pr._replace(Ac=pr.A.to(dtype).contiguous(), Bc=pr.B.to(dtype).contiguous())
                 for pr in prs)


def _dropout(X2, pr: _Proj, training):
    """PEFT's nn.Dropout on the adapter input: (dropped input, mask scale or None)."""
    p = pr.dropout
    if p == 0.0 or not training:
        return X2, None
    if pr.mask is not None:
        return X2 * pr.mask, pr.mask
    # F.dropout of a ones tensor of X's shape draws exactly the mask F.dropout(X) would (the mask does not
    # depend on the values), so with PEFT's call order the masks are PEFT's.
    scale = torch.nn.functional.dropout(torch.ones_like(X2), p, True)
    return X2 * scale, scale


def _proj_forward(X2, pr: _Proj, dtype, training):
    W = dequantize_base(pr.W, pr.quant, dtype)
    XA = Xd = mask = None
    if pr.A is None:
        Y = X2 @ W.t()
    else:
        Xd, mask = _dropout(X2, pr, training)
        XA = Xd @ pr.Ac.t()
        if W.shape[1] <= W.shape[0]:
            # Widening projection (gate/up): one GEMM over [X, XA] @ [W, s B]^T costs a copy of the narrow
            # input instead of a second pass over the wide output.
            Y = torch.cat([X2, XA], 1) @ torch.cat([W, pr.Bc * pr.s], 1).t()
        else:
            Y = _base_plus_lora(X2, W.t(), XA, pr.Bc.t(), pr.s)
    if pr.bias is not None:
        Y += pr.bias.to(dtype)
    return Y, (XA, Xd if mask is not None else None, mask)


def _proj_backward_input(dY, pr: _Proj, saved, dtype, needs):
    """(dX, s dY B, dB, dbias) of one projection: all but dA, which needs the projection's input."""
    XA, Xd, mask = saved
    out_f, in_f = weight_shape(pr.W, pr.quant)
    dB = dYBs = None
    if pr.A is None:
        dX = dY @ dequantize_base(pr.W, pr.quant, dtype)
    else:
        A, B = pr.Ac, pr.Bc
        dYBs = _mm_scaled(dY, B, pr.s)  # [T, r]
        if needs["B"]:
            dB = _mm_scaled(dY.t(), XA, pr.s).to(pr.B.dtype)
        if mask is not None:
            dX = dY @ dequantize_base(pr.W, pr.quant, dtype)
            dX += (dYBs @ A) * mask
        elif out_f <= in_f:
            # widening dX (down_proj's): one GEMM over [dY, s dYB] @ [W; A], an NF4 weight dequantised
            # straight into the stacked rows
            dX = torch.cat([dY, dYBs], 1) @ _stack_rows([pr], A, dtype, dY.device)
        else:
            dX = _base_plus_lora(dY, dequantize_base(pr.W, pr.quant, dtype), dYBs, A, 1.0)
    dbias = dY.sum(0).to(pr.bias.dtype) if (pr.bias is not None and needs["bias"]) else None
    return dX, dYBs, dB, dbias


def _lora_dA(dYBs, X2, pr: _Proj, saved, needs):
    if pr.A is None or not needs["A"]:
        return None
    Xd = saved[1]
    return (dYBs.t() @ (X2 if Xd is None else Xd)).to(pr.A.dtype)


def _proj_backward(dY, X2, pr: _Proj, saved, dtype, needs):
    """(dX contribution, dA, dB, dbias) of one projection."""
    dX, dYBs, dB, dbias = _proj_backward_input(dY, pr, saved, dtype, needs)
    return dX, _lora_dA(dYBs, X2, pr, saved, needs), dB, dbias


def _flat(X):
    return X.reshape(-1, X.shape[-1])


def _unflat(Y, X):
    """Y [T, n] as [*X.shape[:-1], n] with no view relation to Y: FSDP2 warns about (and would skip its hooks
    after an in-place op on) a module output that is a view."""
    return torch.ops.aten._unsafe_view(Y, (*X.shape[:-1], Y.shape[-1]))


class _Slots:
    """A Function's forward arguments by name: which need a gradient, and backward's return tuple built from
    named gradients (None for the rest), instead of positions."""

    def __init__(self, *names: str):
        self.names = names

    def needs(self, ctx) -> dict:
        """name -> ctx.needs_input_grad, False for trailing arguments the caller left to their defaults."""
        flags = ctx.needs_input_grad
        return {n: i < len(flags) and bool(flags[i]) for i, n in enumerate(self.names)}

    def grads(self, **named) -> tuple:
        unknown = set(named) - set(self.names)
        if unknown:
            raise KeyError(f"no forward argument named {sorted(unknown)}")
        return tuple(named.get(n) for n in self.names)


def _proj_slots(prefix):
    return tuple(prefix + n for n in ("W", "Q", "A", "B", "S"))


O_SLOTS = _Slots("X", "W", "W_quant", "A", "B", "S", "bias", "dropout", "training")
QKV_SLOTS = _Slots("X", *_proj_slots("q"), *_proj_slots("k"), *_proj_slots("v"), "inplace", "q_bias", "k_bias",
                   "v_bias", "dropouts", "training")
MLP_SLOTS = _Slots("X", *_proj_slots("g"), *_proj_slots("u"), *_proj_slots("d"), "activation_fn",
                   "activation_fn_backward", "inplace", "dropouts", "training")


def _stack_rows(prs, extra, dtype, device):
    """[W_1; ...; W_n; extra] (extra may be None) as one [sum(out) + extra rows, in] tensor; NF4 weights
    are dequantised straight into their rows (no per-weight temporary)."""
    if all(pr.quant is None for pr in prs):
        return torch.cat([pr.W.to(dtype) for pr in prs] + ([] if extra is None else [extra]), 0)
    shapes = [weight_shape(pr.W, pr.quant) for pr in prs]
    rows = sum(o for o, _ in shapes)
    buf = torch.empty(rows + (0 if extra is None else extra.shape[0]), shapes[0][1], dtype=dtype, device=device)
    row = 0
    for pr, (o, _) in zip(prs, shapes):
        dequantize_base(pr.W, pr.quant, dtype, out=buf[row:row + o])
        row += o
    if extra is not None:
        buf[rows:].copy_(extra)
    return buf


def _qkv_fusable(prs, training):
    """One stacked LoRA path serves q, k and v when each has an adapter and no dropout is active (dropout
    masks differ per projection, as in PEFT)."""
    return all(pr.A is not None and (pr.dropout == 0.0 or not training) for pr in prs)


def _qkv_stacked_forward(X2, prs, dtype):
    """Q, K, V with one adapter-input GEMM (X [A_q; A_k; A_v]^T) shared by the three projections."""
    A_cat = torch.cat([pr.Ac for pr in prs], 0)
    XA = X2 @ A_cat.t()
    outs, col = [], 0
    for pr in prs:
        W = dequantize_base(pr.W, pr.quant, dtype)
        Y = X2 @ W.t() if pr.bias is None else torch.addmm(pr.bias.to(dtype), X2, W.t())
        r = pr.A.shape[0]
        Y.addmm_(XA[:, col:col + r], pr.Bc.t(), alpha=pr.s)
        outs.append(Y)
        col += r
    return outs, XA


def _qkv_stacked_backward(dYs, X2, XA, prs, dtype):
    """dX, [(dA, dB, dbias)] for the stacked path: dX = [dQ, dK, dV, s dY B...] @ [W_q; W_k; W_v; A...] in
    one GEMM, dA of all three in another."""
    dYBs, dBs, col = [], [], 0
    for pr, dY in zip(prs, dYs):
        r = pr.A.shape[0]
        dYBs.append(_mm_scaled(dY, pr.Bc, pr.s))  # s dY B  [T, r]
        dBs.append(_mm_scaled(dY.t(), XA[:, col:col + r], pr.s).to(pr.B.dtype))
        col += r
    G = torch.cat(list(dYs) + dYBs, 1)
    A_cat = torch.cat([pr.Ac for pr in prs], 0)
    dX = G @ _stack_rows(prs, A_cat, dtype, X2.device)
    n_out = sum(dY.shape[1] for dY in dYs)
    dA_cat = G[:, n_out:].t() @ X2
    grads, row = [], 0
    for pr, dY, dB in zip(prs, dYs, dBs):
        r = pr.A.shape[0]
        db = dY.sum(0).to(pr.bias.dtype) if pr.bias is not None else None
        grads.append((dA_cat[row:row + r].to(pr.A.dtype), dB, db))
        row += r
    return dX, grads


def _gate_up_shareable(pg, pu, training):
    """gate and up can share one adapter-input GEMM and one [X, XA] copy: both have adapters, no active
    dropout, no bias, and both widen (the [X, XA] @ [W, s B]^T form of _proj_forward)."""
    def ok(pr):
        o, i = weight_shape(pr.W, pr.quant)
        return pr.A is not None and (pr.dropout == 0.0 or not training) and pr.bias is None and i <= o
    return ok(pg) and ok(pu)


def _gate_up_forward(X2, pg, pu, dtype):
    """e, g = [X, X A_g^T, X A_u^T] @ [W_g, s_g B_g, 0]^T and [...] @ [W_u, 0, s_u B_u]^T: one adapter-input
    GEMM and one copy of X for both projections (the zero blocks cost K + r extra columns, ~1 %)."""
    XA = X2 @ torch.cat([pg.Ac, pu.Ac], 0).t()
    Xc = torch.cat([X2, XA], 1)
    rg = pg.A.shape[0]
    outs = [Xc @ _gate_up_weight(pg, pu, which, dtype).t() for which in (0, 1)]
    return outs, ((XA[:, :rg], None, None), (XA[:, rg:], None, None))


def _gate_up_weight(pg, pu, which, dtype):
    """[W_g | s_g B_g | 0] (which = 0) or [W_u | 0 | s_u B_u] (which = 1), [I, H + r_g + r_u]: the weight of
    the shared [X, X A_g^T, X A_u^T] input, an NF4 weight dequantised straight into its block."""
    pr = (pg, pu)[which]
    out_f, in_f = weight_shape(pr.W, pr.quant)
    rg, ru = pg.A.shape[0], pu.A.shape[0]
    buf = torch.empty(out_f, in_f + rg + ru, dtype=dtype, device=pr.A.device)
    if nf4_writes_into(pr.quant, dtype, buf[:, :in_f]):
        _dequantize_nf4(pr.W, pr.quant, buf[:, :in_f], dtype)  # no temporary, no copy
        buf[:, in_f:].zero_()
        mine = in_f if which == 0 else in_f + rg
        torch.mul(pr.Bc, pr.s, out=buf[:, mine:mine + pr.A.shape[0]])
        return buf
    # other weights: one cat into the buffer (a strided copy_ into the block is slower than cat)
    W, sB = dequantize_base(pr.W, pr.quant, dtype), pr.Bc * pr.s
    zeros = sB.new_zeros(out_f, ru if which == 0 else rg)
    return torch.cat([W, sB, zeros] if which == 0 else [W, zeros, sB], 1, out=buf)


def _mlp_fusable(pg, pu, pd, training, act, act_bwd):
    """The MLP takes the fused path (_mlp_fused_forward / _mlp_fused_backward): gate and up can share one
    adapter-input GEMM, down has an adapter with no active dropout, and the activation is one of ours in
    both directions (the backward's kernel takes the adapter products, glu_lora_backward; the forward reads
    e | g in place from one buffer)."""
    glu_act = getattr(act_bwd, "glu_act", None)
    return bool(_gate_up_shareable(pg, pu, training) and glu_act and getattr(act, "glu_act", None) == glu_act
                and pd.A is not None and not (pd.dropout != 0.0 and training))


def _gate_up_base(X2, pg, pu, out, dtype):
    """out[:, :I] | out[:, I:2I] = X W_g^T | X W_u^T: one N = 2I GEMM over [W_g; W_u] when both are NF4
    (dequantised straight into one buffer), else one GEMM per weight into its half (no copy of a plain
    weight; two N = I GEMMs measured as fast as one N = 2I on an H100)."""
    I = weight_shape(pg.W, pg.quant)[0]
    if is_nf4(pg.quant) and is_nf4(pu.quant):
        torch.mm(X2, _stack_rows([pg, pu], None, dtype, X2.device).t(), out=out[:, :2 * I])
    else:
        for k, pr in enumerate((pg, pu)):
            torch.mm(X2, dequantize_base(pr.W, pr.quant, dtype).t(), out=out[:, k * I:(k + 1) * I])


def _mlp_fused_forward(X2, pg, pu, pd, dtype, act):
    """(Y, EG, XA, h A_d^T). EG [T, 2I + r_g + r_u rounded up to 64] holds the base GEMM outputs X W_g^T |
    X W_u^T (K = H: the adapter terms s XA B^T are added per tile by glu_lora_forward and again by
    glu_lora_backward, instead of widening K to H + r_g + r_u, which cost ~6 % of the GEMM), and spare
    columns where the backward puts s_g de B_g | s_u dg B_u after de | dg, so that dX is one GEMM over the
    buffer. Rows start 128-byte aligned: with 64-byte aligned rows each 128-byte row segment of the GLU tiles
    splits over two cache lines (slower; docs/perf-notes.md). XA = X [A_g; A_u]^T. h = act(e) * g is not kept; h A_d^T is kept (down_proj's dB)."""
    I, rg = weight_shape(pg.W, pg.quant)[0], pg.A.shape[0]
    XA = X2 @ torch.cat([pg.Ac, pu.Ac], 0).t()
    EG = wide_rows(X2, X2.shape[0], cdiv(2 * I + rg + pu.A.shape[0], 64) * 64)
    _gate_up_base(X2, pg, pu, EG, dtype)
    h = glu_lora_forward(EG[:, :I], EG[:, I:2 * I], XA, rg, pg.Bc, pu.Bc,
                         (pg.s, pu.s), act)
    hA = h @ pd.Ac.t()
    Y = _base_plus_lora(h, dequantize_base(pd.W, pd.quant, dtype).t(), hA, pd.Bc.t(), pd.s)
    return Y, EG, XA, hA


def _mlp_fused_backward(ctx, need, X2, EG, XA, hA, dY):
    """LoRA_MLP.backward on the fused path. dh = dY W_d (K = H; its adapter term s_d dY B_d A_d is added in
    the GLU kernel), then one kernel gives de, dg, dB_gate, dB_up and dA_down (the products that would
    re-read de, dg and h; h is never stored), one more pass s de B_g | s dg B_u into the columns after
    de | dg, and dX is one GEMM [de | dg | s de B_g | s dg B_u] @ [W_g; W_u; A_g; A_u]."""
    pg, pu, pd = ctx.prs
    dtype = ctx.dtype
    I, rg, ru, rd = weight_shape(pg.W, pg.quant)[0], pg.A.shape[0], pu.A.shape[0], pd.A.shape[0]
    dYBs_d = _mm_scaled(dY, pd.Bc, pd.s)  # s_d dY B_d  [T, r_d]
    ddB = _mm_scaled(dY.t(), hA, pd.s).to(pd.B.dtype) if need["dB"] else None
    dh = dY @ dequantize_base(pd.W, pd.quant, dtype)
    D = EG if _overwrites_saved(ctx) else wide_rows(EG, *EG.shape)  # de | dg | G, over e | g when inplace
    B_g, B_u = pg.Bc, pu.Bc
    de, dg, Q = glu_lora_backward(dh, EG[:, :I], EG[:, I:2 * I], XA, rg, dYBs_d, B_g, B_u, pd.Ac,
                                  (pg.s, pu.s), ctx.act_bwd.glu_act, out=(D[:, :I], D[:, I:2 * I]))
    del dh
    R = glu_lora_rank_pad(max(rg, ru, rd))
    # (s de B_g / s dg B_u as extra output columns of the dX GEMM, de [W_g | s_g B_g | 0], is slower: N = H + 2r
    # tiles badly, costing more than this pass.)
    G = glu_lora_dyb(de, dg, B_g, B_u, (pg.s, pu.s), out=D[:, 2 * I:2 * I + rg + ru])
    dX = None
    if need["X"]:  # (the first layer's input often needs no gradient: no dX GEMM then)
        A_cat = torch.cat([pg.Ac, pu.Ac])
        dX = (D[:, :2 * I + rg + ru] @ _stack_rows([pg, pu], A_cat, dtype, X2.device)).view(ctx.x_shape)
    dA_cat = G.t() @ X2 if (need["gA"] or need["uA"]) else None
    dgA = dA_cat[:rg].to(pg.A.dtype) if need["gA"] else None
    duA = dA_cat[rg:].to(pu.A.dtype) if need["uA"] else None
    dgB = Q[:, :rg].to(pg.B.dtype) if need["gB"] else None
    duB = Q[:, R:R + ru].to(pu.B.dtype) if need["uB"] else None
    ddA = Q[:, 2 * R:2 * R + rd].t().to(pd.A.dtype) if need["dA"] else None
    return dict(X=dX, gA=dgA, gB=dgB, uA=duA, uB=duB, dA=ddA, dB=ddB)


# ------------------------------------------------------------------------------------ Functions
# Each Function is a thin shell over three functions of (ctx, tensors, _Proj list, scalars): *_plan sets the
# ctx attributes the backward reads, *_forward computes and saves, *_backward returns gradients by name. The
# custom ops of fusedlora.lora_ops (torch.compile) call the same three.
def _save_input_and(ctx, X2, source, *rest):
    """ctx.save_for_backward(X2, *rest); with `source` (X is a recomputable rms_norm output: the Function
    found its NormSource) the norm's input and weight take X2's place, which the norm's backward keeps anyway,
    and _saved_input_and recomputes X2 from them. The custom ops of fusedlora.lora_ops pass no source (what
    they save are op outputs)."""
    if source is None:
        ctx.input_norm = None
        ctx.save_for_backward(X2, *rest)
    else:
        # no tensor on ctx itself: saved-tensor hooks (HF's non-reentrant checkpointing) must see them all
        ctx.input_norm = (source._replace(x2d=None, weight=None), X2.dtype)
        ctx.save_for_backward(source.x2d, source.weight, *rest)


def _saved_input_and(ctx):
    """(X2, *rest) as _save_input_and saved them."""
    saved = ctx.saved_tensors
    if getattr(ctx, "input_norm", None) is None:
        return saved
    recipe, dtype = ctx.input_norm
    return (recipe.recompute(saved[0], saved[1]).to(dtype), *saved[2:])


def _o_plan(ctx, X, prs, dtype, training):
    ctx.pr, ctx.dtype, ctx.x_shape = _in_dtype(prs, dtype)[0], dtype, X.shape


def _o_forward(ctx, X, prs, dtype, training):
    _o_plan(ctx, X, prs, dtype, training)
    X2 = _flat(X).to(dtype)
    Y, saved = _proj_forward(X2, ctx.pr, dtype, training)
    ctx.save_for_backward(X2, *saved)
    return (_unflat(Y, X),)


def _o_backward(ctx, need, dY):
    X2, XA, Xd, mask = ctx.saved_tensors
    needs = {"A": need["A"], "B": need["B"], "bias": need["bias"]}
    dX, dA, dB, dbias = _proj_backward(_flat(dY).to(ctx.dtype), X2, ctx.pr, (XA, Xd, mask), ctx.dtype, needs)
    return dict(X=dX.view(ctx.x_shape), A=dA, B=dB, bias=dbias)


def _qkv_plan(ctx, X, prs, dtype, training):
    ctx.prs, ctx.dtype, ctx.x_shape = _in_dtype(prs, dtype), dtype, X.shape
    ctx.stacked = _qkv_fusable(prs, training)


def _qkv_forward(ctx, X, prs, dtype, training, source=None):
    _qkv_plan(ctx, X, prs, dtype, training)
    X2 = _flat(X).to(dtype)
    prs = ctx.prs
    if ctx.stacked:  # few launches: these layers are often host-bound
        outs, XA = _qkv_stacked_forward(X2, prs, dtype)
        _save_input_and(ctx, X2, source, XA)
    else:
        outs, saved = [], []
        for pr in prs:
            Y, sv = _proj_forward(X2, pr, dtype, training)
            outs.append(Y)
            saved.extend(sv)
        _save_input_and(ctx, X2, source, *saved)
    return tuple(_unflat(Y, X) for Y in outs)


def _qkv_backward(ctx, need, dQ, dK, dV):
    named = {}
    if ctx.stacked:
        X2, XA = _saved_input_and(ctx)
        dYs = [_flat(d).to(ctx.dtype) if d is not None else
               X2.new_zeros(X2.shape[0], weight_shape(pr.W, pr.quant)[0]) for d, pr in zip((dQ, dK, dV), ctx.prs)]
        dX, grads = _qkv_stacked_backward(dYs, X2, XA, ctx.prs, ctx.dtype)
        for p, (dA, dB, db) in zip("qkv", grads):
            named.update({f"{p}A": dA, f"{p}B": dB, f"{p}_bias": db})
        named["X"] = dX.view(ctx.x_shape)
        return named
    X2, *saved = _saved_input_and(ctx)
    dX = None
    for i, (p, pr, dY) in enumerate(zip("qkv", ctx.prs, (dQ, dK, dV))):
        if dY is None:
            continue
        needs = {"A": need[f"{p}A"], "B": need[f"{p}B"], "bias": need[f"{p}_bias"]}
        d, dA, dB, db = _proj_backward(_flat(dY).to(ctx.dtype), X2, pr, saved[3 * i: 3 * i + 3], ctx.dtype, needs)
        dX = d if dX is None else dX.add_(d)
        named.update({f"{p}A": dA, f"{p}B": dB, f"{p}_bias": db})
    named["X"] = dX.view(ctx.x_shape)
    return named


def _overwrites_saved(ctx):
    """The MLP backward writes de, dg over its saved e, g: asked for (inplace) and safe now (autograd frees
    the graph after this backward; a retained graph's next backward reads e, g again)."""
    return ctx.inplace and saved_tensors_writable()


def _mlp_plan(ctx, X, prs, dtype, training, act, act_bwd, inplace):
    ctx.prs, ctx.dtype, ctx.x_shape = _in_dtype(prs, dtype), dtype, X.shape
    ctx.act, ctx.act_bwd, ctx.inplace = act, act_bwd, inplace
    ctx.fused_glu = _mlp_fusable(*prs, training, act, act_bwd)


def _mlp_forward(ctx, X, prs, dtype, training, act, act_bwd, inplace, source=None):
    _mlp_plan(ctx, X, prs, dtype, training, act, act_bwd, inplace)
    pg, pu, pd = ctx.prs
    X2 = _flat(X).to(dtype)
    if ctx.fused_glu:
        Y, EG, XA, hA = _mlp_fused_forward(X2, pg, pu, pd, dtype, act.glu_act)
        _save_input_and(ctx, X2, source, EG, XA, hA)
    else:
        if _gate_up_shareable(pg, pu, training):
            (e, g), (sg, su) = _gate_up_forward(X2, pg, pu, dtype)
        else:
            e, sg = _proj_forward(X2, pg, dtype, training)
            g, su = _proj_forward(X2, pu, dtype, training)
        Y, sd = _proj_forward(act(e, g), pd, dtype, training)
        # h is not kept: the backward recomputes it from e and g
        _save_input_and(ctx, X2, source, e, g, *sg, *su, *sd)
    return (_unflat(Y, X),)


def _mlp_backward(ctx, need, dY):
    pg, pu, pd = ctx.prs
    dtype = ctx.dtype
    if ctx.fused_glu:
        return _mlp_fused_backward(ctx, need, *_saved_input_and(ctx), _flat(dY).to(dtype))
    nd = {"A": need["dA"], "B": need["dB"], "bias": False}
    X2, e, g, *saved = _saved_input_and(ctx)
    dh, dYBs_d, ddB, _ = _proj_backward_input(_flat(dY).to(dtype), pd, saved[6:9], dtype, nd)
    inplace = _overwrites_saved(ctx)
    if getattr(ctx.act_bwd, "stores_h", False):  # h comes back over dh: no recompute pass
        de, dg, h = ctx.act_bwd(dh, e, g, inplace, store_h=True)
    else:
        h = ctx.act(e, g)
        de, dg = ctx.act_bwd(dh, e, g, inplace)
    ddA = _lora_dA(dYBs_d, h, pd, saved[6:9], nd)
    del h, dh
    sg, su = saved[0:3], saved[3:6]
    ngate = {"A": need["gA"], "B": need["gB"], "bias": False}
    nup = {"A": need["uA"], "B": need["uB"], "bias": False}
    if sg[2] is None and su[2] is None:
        # No dropout masks: dX accumulates both projections in the GEMMs' epilogues (beta = 1).
        dX = de @ dequantize_base(pg.W, pg.quant, dtype)
        dX.addmm_(dg, dequantize_base(pu.W, pu.quant, dtype))
        lora = [(d, pr, sv, need) for d, pr, sv, need in ((de, pg, sg, ngate), (dg, pu, su, nup)) if pr.A is not None]
        dYBs = [_mm_scaled(d, pr.Bc, pr.s) for d, pr, _, _ in lora]
        dBs = [_mm_scaled(d.t(), sv[0], pr.s).to(pr.B.dtype) if need["B"] else None for d, pr, sv, need in lora]
        grads = {id(pg): (None, None), id(pu): (None, None)}
        if lora:
            G = dYBs[0] if len(lora) == 1 else torch.cat(dYBs, 1)
            dX.addmm_(G, torch.cat([pr.Ac for _, pr, _, _ in lora], 0))
            dA_cat = G.t() @ X2
            row = 0
            for (_, pr, _, _), dB in zip(lora, dBs):
                r = pr.A.shape[0]
                grads[id(pr)] = (dA_cat[row:row + r].to(pr.A.dtype), dB)
                row += r
        (dgA, dgB), (duA, duB) = grads[id(pg)], grads[id(pu)]
    else:
        dX, dgA, dgB, _ = _proj_backward(de, X2, pg, sg, dtype, ngate)
        dXu, duA, duB, _ = _proj_backward(dg, X2, pu, su, dtype, nup)
        dX += dXu
    return dict(X=dX.view(ctx.x_shape), gA=dgA, gB=dgB, uA=duA, uB=duB, dA=ddA, dB=ddB)


def _projections(fn, entry, specs, X, kernels):
    """_Proj per (label, W, quant, A, B, S, bias, dropout), the input and the adapter shapes checked; errors
    name the Function `fn` (and the projection) and the public `entry` that calls it. A base weight that
    requires grad under grad mode is refused here for the custom ops' callers (fusedlora.lora_ops); inside a
    Function's forward grad mode is off, and its backward refuses it (_backward_checks)."""
    W, Q = specs[0][1], specs[0][2]
    _check_input(f"{fn} ({entry})", X, W, Q, weight_shape(W, Q)[1], kernels)
    prs = []
    for label, W, Q, A, B, S, bias, p in specs:
        arg = f"{label[:1]}W"  # the argument's name in the Functions and the custom ops: W, qW, gW, uW...
        _refuse_base_grad(fn, arg, torch.is_grad_enabled() and W.requires_grad)
        out_f, in_f = weight_shape(W, Q)
        _check_adapter(f"{fn} ({label})" if label else fn, out_f, in_f, A, B, S)
        prs.append(_Proj(W, Q, A, B, float(S or 0.0), bias, float(p)))
    return prs


def _refuse_base_grad(fn, arg, wanted):
    """A base weight asked for a gradient is refused: the fused functions give it none (autograd would leave
    its .grad None, silently)."""
    if wanted:
        raise ValueError(f"{fn}: the base weight {arg} requires grad, but {fn} gives base weights no gradient "
                         f"(it trains the LoRA A and B, and biases): freeze it ({arg}.requires_grad_(False)) or "
                         f"pass {arg}.detach()")


def _backward_checks(fn, need):
    """In a Function's backward: refuse a double backward (refuse_double_backward) and a base weight argument
    (W, qW, kW, vW, gW, uW, dW) asked for a gradient."""
    refuse_double_backward(fn)
    for arg, wanted in need.items():
        if arg.endswith("W"):
            _refuse_base_grad(fn, arg, wanted)


def _o_projections(X, W, W_quant, A, B, S, bias, dropout):
    return _projections("LoRA_O", "apply_lora_o", [("", W, W_quant, A, B, S, bias, dropout)], X,
                        kernels=W_quant is not None)


def _qkv_projections(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, q_bias, k_bias, v_bias, dropouts):
    specs = [(n, *proj, b, p) for n, proj, b, p in zip(
        "qkv", ((qW, qQ, qA, qB, qS), (kW, kQ, kA, kB, kS), (vW, vQ, vA, vB, vS)), (q_bias, k_bias, v_bias), dropouts)]
    return _projections("LoRA_QKV", "apply_lora_qkv", specs, X, kernels=any(q is not None for q in (qQ, kQ, vQ)))


def _mlp_projections(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, dropouts):
    specs = [(n, *proj, None, p) for n, proj, p in zip(
        ("gate", "up", "down"), ((gW, gQ, gA, gB, gS), (uW, uQ, uA, uB, uS), (dW, dQ, dA, dB, dS)), dropouts)]
    return _projections("LoRA_MLP", "apply_lora_mlp_*", specs, X, kernels=True)


class LoRA_O(torch.autograd.Function):
    """LoRA_O.apply(X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False) -> X W^T + S (X A^T) B^T."""

    @staticmethod
    def forward(ctx, X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False):
        prs = _o_projections(X, W, W_quant, A, B, S, bias, dropout)
        return _o_forward(ctx, X, prs, _compute_dtype(X), training)[0]

    @staticmethod
    def backward(ctx, dY):
        need = O_SLOTS.needs(ctx)
        _backward_checks("LoRA_O", need)
        return O_SLOTS.grads(**_o_backward(ctx, need, dY))


class LoRA_QKV(torch.autograd.Function):
    """LoRA_QKV.apply(X, q_weight, q_quant, q_A, q_B, q_scale, k_..., v_..., inplace=True,
    q_bias=None, k_bias=None, v_bias=None, dropouts=(0, 0, 0), training=False) -> (Q, K, V).

    `inplace` is accepted for the seed API's signature and has no effect: the backward has no buffer of
    its own that an in-place update would save (dQ, dK, dV belong to autograd)."""

    @staticmethod
    def forward(ctx, X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, inplace=True,
                q_bias=None, k_bias=None, v_bias=None, dropouts=(0.0, 0.0, 0.0), training=False):
        prs = _qkv_projections(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, q_bias, k_bias, v_bias,
                               dropouts)
        return _qkv_forward(ctx, X, prs, _compute_dtype(X), training, norm_source(X))

    @staticmethod
    def backward(ctx, dQ, dK, dV):
        need = QKV_SLOTS.needs(ctx)
        _backward_checks("LoRA_QKV", need)
        return QKV_SLOTS.grads(**_qkv_backward(ctx, need, dQ, dK, dV))


class LoRA_MLP(torch.autograd.Function):
    """LoRA_MLP.apply(X, gate_weight, gate_quant, gate_A, gate_B, gate_scale, up_..., down_...,
    activation_fn, activation_fn_backward, inplace=True, dropouts=(0, 0, 0), training=False).

    activation_fn(e, g) -> h; activation_fn_backward(dh, e, g, inplace) -> (de, dg)."""

    @staticmethod
    def forward(ctx, X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, activation_fn,
                activation_fn_backward, inplace=True, dropouts=(0.0, 0.0, 0.0), training=False):
        prs = _mlp_projections(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, dropouts)
        return _mlp_forward(ctx, X, prs, _compute_dtype(X), training, activation_fn, activation_fn_backward,
                            inplace, norm_source(X))[0]

    @staticmethod
    def backward(ctx, dY):
        need = MLP_SLOTS.needs(ctx)
        _backward_checks("LoRA_MLP", need)
        return MLP_SLOTS.grads(**_mlp_backward(ctx, need, dY))


# ------------------------------------------------------------------------------ activations (MLP)
def swiglu_fg(e, g):
    return glu_forward(e, g, "silu")


swiglu_fg.glu_act = "silu"  # LoRA_MLP's fused path runs this activation's kernels itself


def _glu_fg_backward(act):
    def backward(dh, e, g, inplace=True, store_h=False):
        """(de, dg), plus h written over dh when store_h."""
        return glu_backward(dh.contiguous(), e, g, act, inplace, store_h)
    backward.stores_h = True
    backward.glu_act = act  # LoRA_MLP may fuse the adapter products into this backward (glu_lora_backward)
    return backward


swiglu_fg_backward = _glu_fg_backward("silu")


def geglu_exact_fg(e, g):
    return glu_forward(e, g, "gelu")


geglu_exact_fg.glu_act = "gelu"


geglu_exact_fg_backward = _glu_fg_backward("gelu")


def geglu_approx_fg(e, g):
    return glu_forward(e, g, "gelu_tanh")


geglu_approx_fg.glu_act = "gelu_tanh"


geglu_approx_fg_backward = _glu_fg_backward("gelu_tanh")


def matmul_lora(X, W, W_quant, A, B, s, out=None):
    """X @ W.T + s * (X @ A.T) @ B.T (no autograd through W; use LoRA_O for gradients)."""
    dtype = _compute_dtype(X)
    X2 = _flat(X).to(dtype)
    Wd = dequantize_base(W, W_quant, dtype)
    Y = torch.matmul(X2, Wd.t(), out=None if out is None else _flat(out))
    if A is not None:
        Y.addmm_(X2 @ A.to(dtype).t(), B.to(dtype).t(), alpha=s)
    return Y.view(*X.shape[:-1], Wd.shape[0])


# -------------------------------------------------------------------------------- torch.compile: the custom ops
# The fused LoRA functions as torch.library custom ops: what `apply_lora_*` call under torch.compile.
# 
# `lora_o`, `lora_qkv` and `lora_mlp` take LoRA_O / LoRA_QKV / LoRA_MLP's arguments and run the same plan,
# forward and backward functions as the Functions above inside the custom ops fusedlora::lora_{o,qkv,mlp}
# (and their *_backward), so Dynamo sees one opaque call per layer and its gradient formula. What crosses the
# op boundary is tensors and plain scalars only:
# - each projection's base weight as tensors + ints (plain; bitsandbytes 4-bit: packed weight, absmax, code,
#   nested state; GPTQ: qweight, qzeros, scales, g_idx), rebuilt inside as `NF4State` / `GPTQState`;
# - the trainable tensors (A, B, biases) in one tensor list, so autograd returns a gradient for each;
# - dropout masks, drawn before the call in PEFT's order (q, k, v / gate, up, down), so the traced graph owns
#   the random numbers;
# - the compute dtype (autocast's, decided at trace time);
# - the tensors the backward needs, as extra outputs; an entry that is the input X itself (no cast) or a
#   dropout mask comes back as a marker and is rebuilt from the op's inputs (an op may not return its inputs).
# The MLP backward writes its gradients over the forward's gate/up buffer as in eager (and, as there, only
# when autograd frees the graph after this backward): that buffer is an output of the forward op read by
# nothing but this backward op.

N_FROZEN = 7   # per projection: six base-weight tensors (None where unused) and the dropout mask
N_INTS = 10    # kind, out, in, five quantisation ints, has adapter, has bias
MASK = N_FROZEN - 1
_ACTIVATIONS = {
    "silu": (swiglu_fg, swiglu_fg_backward),
    "gelu": (geglu_exact_fg, geglu_exact_fg_backward),
    "gelu_tanh": (geglu_approx_fg, geglu_approx_fg_backward),
}
_SAVED_NONE, _SAVED_X, _SAVED_MASK = 0, 1, 2  # marker codes (fusedlora.ops._custom.marker): None, X, mask i


# ----------------------------------------------------------------------------------- encode / decode
def _encode(prs, X, dtype, training):
    """(params, frozen, ints, floats) of the projections; dropout masks drawn here in projection order
    (the input rows of each; down_proj's input is [rows, intermediate])."""
    params, biases, frozen, ints, floats = [], [], [], [], []
    rows = X.numel() // X.shape[-1] if X.dim() else 1
    for pr in prs:
        tensors, q = encode_base(pr.W, pr.quant)
        out_f, in_f = weight_shape(pr.W, pr.quant)
        mask = None
        if pr.A is not None and pr.dropout != 0.0 and training:
            mask = F.dropout(torch.ones(rows, in_f, dtype=dtype, device=X.device), pr.dropout, True)
        frozen += tensors + [mask]
        ints += [q[0], out_f, in_f, *q[1:], 0, pr.A is not None, pr.bias is not None]
        floats += [pr.s, pr.dropout]
        if pr.A is not None:
            params += [pr.A, pr.B]
        if pr.bias is not None:
            biases.append(pr.bias)
    return params + biases, frozen, ints, floats


def _decode(params, frozen, ints, floats):
    prs, adapters, biases = [], [], []
    n = len(ints) // N_INTS
    it = iter(params)
    for i in range(n):
        if ints[i * N_INTS + 8]:
            adapters.append((next(it), next(it)))
        else:
            adapters.append((None, None))
    for i in range(n):
        biases.append(next(it) if ints[i * N_INTS + 9] else None)
    for i in range(n):
        kind, out_f, in_f, *q = ints[i * N_INTS:i * N_INTS + 8]
        t = frozen[i * N_FROZEN:(i + 1) * N_FROZEN]
        W, quant = decode_base(t, kind, out_f, in_f, q)
        (A, B), s, p = adapters[i], floats[2 * i], floats[2 * i + 1]
        prs.append(_Proj(W, quant, A, B, s, biases[i], p, t[MASK]))
    return prs


def _param_names(kind, ints):
    """Gradient names (the Functions' slot names) of the params list, in its order."""
    prefixes = {"o": ("",), "qkv": ("q", "k", "v"), "mlp": ("g", "u", "d")}[kind]
    n = len(ints) // N_INTS
    names = [f"{prefixes[i]}{ab}" for i in range(n) if ints[i * N_INTS + 8] for ab in "AB"]
    names += [f"{prefixes[i]}_bias" if prefixes[i] else "bias" for i in range(n) if ints[i * N_INTS + 9]]
    return names


def _encode_saved(saved, X, prs, outs, inputs):
    """The saved tensors as op outputs: markers for None, X itself and the dropout masks, anything else
    sharing memory with an input or another output cloned (in practice a rank-r column block)."""
    out = []
    for t in saved:
        if t is None:
            out.append(_custom.marker(X, _SAVED_NONE))
        elif torch._C._is_alias_of(t, X):  # X2 = X itself in the compute dtype
            out.append(_custom.marker(X, _SAVED_X))
        elif any(t is pr.mask for pr in prs):
            out.append(_custom.marker(X, _SAVED_MASK + next(i for i, pr in enumerate(prs) if t is pr.mask)))
        else:
            out.append(t)
    return _unaliased(out, inputs, list(outs))


def _unaliased(outs, inputs, earlier=()):
    """outs with each tensor that is, or views the memory of, an input or an earlier output cloned: a custom
    op's outputs may alias neither. Each output is also made contiguous (in practice a rank-r column block of a
    wider buffer): the real and the fake run may differ in which views they return, but never in the layout
    Inductor is promised. Fresh contiguous tensors are taken as they are."""
    done = list(earlier)
    result = []
    for t in outs:
        if t is not None and not t.is_contiguous():
            t = t.contiguous()
        elif t is not None and (t._base is not None or any(t is i for i in inputs)):
            if any(i is not None and torch._C._is_alias_of(t, i) for i in (*inputs, *done)):
                t = t.clone()
        result.append(t)
        if t is not None:
            done.append(t)
    return result


def _decode_saved(saved, X, prs):
    out = []
    for t in saved:
        code = _custom.marker_code(t)
        if code is None:
            out.append(t)
        elif code == _SAVED_NONE:
            out.append(None)
        elif code == _SAVED_X:
            out.append(_flat(X))
        else:
            out.append(prs[code - _SAVED_MASK].mask)
    return out


class _OpCtx:
    """What the plan / forward / backward functions of fusedlora.lora read and write on an autograd ctx."""

    def save_for_backward(self, *tensors):
        self.saved = tensors


# --------------------------------------------------------------------------------------- the ops
def _define(kind, n_out, plan, forward, backward, slots):
    def extra(act, inplace):
        return (*_ACTIVATIONS[act], inplace) if kind == "mlp" else ()

    def forward_op(X: torch.Tensor, params: list[torch.Tensor], frozen: list[torch.Tensor | None], ints: list[int],
                   floats: list[float], dtype: torch.dtype, training: bool, act: str,
                   inplace: bool) -> list[torch.Tensor]:
        prs = _decode(params, frozen, ints, floats)
        ctx = _OpCtx()
        outs = forward(ctx, X, prs, dtype, training, *extra(act, inplace))
        return [*outs, *_encode_saved(ctx.saved, X, prs, outs, (X, *params, *frozen))]

    def backward_op(grads: list[torch.Tensor | None], X: torch.Tensor, params: list[torch.Tensor],
                    frozen: list[torch.Tensor | None], ints: list[int], floats: list[float], dtype: torch.dtype,
                    training: bool, act: str, inplace: bool, needs: list[bool],
                    saved: list[torch.Tensor]) -> list[torch.Tensor]:
        prs = _decode(params, frozen, ints, floats)
        ctx = _OpCtx()
        plan(ctx, X, prs, dtype, training, *extra(act, inplace))
        ctx.saved_tensors = tuple(_decode_saved(saved, X, prs))
        names = ["X", *_param_names(kind, ints)]
        need = dict.fromkeys(slots.names, False)
        need.update(zip(names, needs))
        named = backward(ctx, need, *grads)
        inputs = (X, *params, *frozen, *saved, *grads)
        return [_custom.mark(g, X) for g in _unaliased([named.get(n) for n in names], inputs)]

    fwd = _custom.define(f"lora_{kind}", forward_op)
    bwd = _custom.define(f"lora_{kind}_backward", backward_op)

    def setup_context(ctx, inputs, output):
        X, params, frozen, ints, floats, dtype, training, act, inplace = inputs
        ctx.counts = (len(params), len(frozen))
        ctx.args = (ints, floats, dtype, training, act, inplace)
        ctx.save_for_backward(X, *params, *frozen, *output[n_out:])

    def autograd_backward(ctx, grads):
        refuse_double_backward(f"lora_{kind}")
        X, *rest = ctx.saved_tensors
        n_params, n_frozen = ctx.counts
        params, frozen, saved = rest[:n_params], rest[n_params:n_params + n_frozen], rest[n_params + n_frozen:]
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        got = bwd(list(grads[:n_out]), X, list(params), list(frozen), *ctx.args, [need_x, *need_params], list(saved))
        return (_custom.unmark(got[0]), [_custom.unmark(g) for g in got[1:]]) + (None,) * 7

    fwd.register_autograd(autograd_backward, setup_context=setup_context)
    return fwd


LORA_O_OP = _define("o", 1, _o_plan, _o_forward, _o_backward, O_SLOTS)
LORA_QKV_OP = _define("qkv", 3, _qkv_plan, _qkv_forward, _qkv_backward, QKV_SLOTS)
LORA_MLP_OP = _define("mlp", 1, _mlp_plan, _mlp_forward, _mlp_backward, MLP_SLOTS)


# ------------------------------------------------------------------------------ LoRA_*.apply's twins
def lora_o(X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False):
    """LoRA_O.apply through the custom op (same arguments, same result)."""
    prs = _o_projections(X, W, W_quant, A, B, S, bias, dropout)
    return _call(LORA_O_OP, X, prs, training)[0]


def lora_qkv(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, inplace=True, q_bias=None, k_bias=None,
             v_bias=None, dropouts=(0.0, 0.0, 0.0), training=False):
    """LoRA_QKV.apply through the custom op."""
    prs = _qkv_projections(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, q_bias, k_bias, v_bias,
                             dropouts)
    return tuple(_call(LORA_QKV_OP, X, prs, training)[:3])


def lora_mlp(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, activation, inplace=True,
             dropouts=(0.0, 0.0, 0.0), training=False):
    """LoRA_MLP.apply through the custom op; `activation` names one of the fused GLU activations
    ("silu", "gelu", "gelu_tanh") instead of the two callables."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    prs = _mlp_projections(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, dropouts)
    return _call(LORA_MLP_OP, X, prs, training, activation, inplace)[0]


def _call(op, X, prs, training, activation="", inplace=False):
    dtype = _compute_dtype(X)  # autocast's, decided here (at trace time)
    return op(X, *_encode(prs, X, dtype, training), dtype, bool(training), activation, bool(inplace))


# ---------------------------------------------------------------------- PEFT modules through the fused functions
def apply_lora_linear(proj, X, training):
    """One PEFT LoRA projection (base + dropout(X) A^T B^T s + bias) through the fused single-projection
    function."""
    W, Q, A, B, S = fused_parameters(proj)
    fn = lora_o if use_custom_ops() else LoRA_O.apply  # torch.compile: the custom op (below)
    return fn(X, W, Q, A, B, S, layer_bias(proj), dropout_p(proj), training)


def apply_lora_o(self, X):
    """`self` is the attention module (its o_proj a PEFT LoRA layer)."""
    return apply_lora_linear(self.o_proj, X, self.training)


def apply_lora_qkv(self, X, inplace=True):
    projs = (self.q_proj, self.k_proj, self.v_proj)
    args = [t for p in projs for t in fused_parameters(p)]
    fn = lora_qkv if use_custom_ops() else LoRA_QKV.apply
    return fn(X, *args, inplace, *(layer_bias(p) for p in projs), tuple(dropout_p(p) for p in projs), self.training)


def _apply_mlp(self, X, act, act_bwd, inplace):
    projs = (self.gate_proj, self.up_proj, self.down_proj)
    for p in projs:
        if layer_bias(p) is not None:
            raise UnsupportedLoRA("MLP projections with a bias are not fused; keep PEFT's path")
    args = [t for p in projs for t in fused_parameters(p)]
    dropouts = tuple(dropout_p(p) for p in projs)
    if use_custom_ops():
        return lora_mlp(X, *args, act.glu_act, inplace, dropouts, self.training)
    return LoRA_MLP.apply(X, *args, act, act_bwd, inplace, dropouts, self.training)


def apply_lora_fused_gate_up_mlp(self, X, glu):
    """An MLP with one gate_up_proj (gate | up halves, Phi-3) and a down_proj: the two projections through the
    fused single-projection function and glu(gate, up) (fusedlora.ops.swiglu / geglu) between them."""
    for p in (self.gate_up_proj, self.down_proj):
        if layer_bias(p) is not None:
            raise UnsupportedLoRA("MLP projections with a bias are not fused; keep PEFT's path")
    gate_up = apply_lora_linear(self.gate_up_proj, X, self.training)
    gate, up = gate_up.chunk(2, dim=-1)
    return apply_lora_linear(self.down_proj, glu(gate, up), self.training)


def apply_lora_mlp_swiglu(self, X, inplace=True):
    return _apply_mlp(self, X, swiglu_fg, swiglu_fg_backward, inplace)


_GEGLU = {"none": (geglu_exact_fg, geglu_exact_fg_backward), "tanh": (geglu_approx_fg, geglu_approx_fg_backward)}


def apply_lora_mlp_geglu(self, X, inplace=True, approximate="none"):
    """GeGLU MLP; approximate: "none" (the exact erf GELU, the seed API's default) or "tanh" (gelu_pytorch_tanh,
    Gemma's)."""
    if approximate not in _GEGLU:
        raise ValueError(f"apply_lora_mlp_geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _apply_mlp(self, X, *_GEGLU[approximate], inplace)
