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

import inspect
from collections import namedtuple
from typing import NamedTuple, Optional, get_type_hints

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .ops import _custom
from .ops._common import autocast_dtype, cdiv, check_tensor, saved_tensors_writable, wide_rows
from .ops.glu import glu_backward, glu_forward, refuse_double_backward
from .ops.glu_lora import glu_lora_backward, glu_lora_dyb, glu_lora_forward, glu_lora_rank_pad
from .ops.rms_norm import norm_source
from .peft_layers import (  # noqa: F401
    GPTQ_PLAIN_LAYOUT_KERNELS,
    UnsupportedLoRA,
    dropout_p,
    fused_parameters,
    get_lora_parameters,
    layer_bias,
    use_custom_ops,
)
from .quant import (  # noqa: F401
    BaseLayout,
    GPTQState,
    _dequantize_nf4,
    base_arguments,
    base_from_arguments,
    dequantize_base,
    is_nf4,
    nf4_writes_into,
    weight_shape,
)


# ------------------------------------------------------------------------------------------- weights
def _compute_dtype(X: torch.Tensor) -> torch.dtype:
    """The autocast dtype of X's device type when autocast is on there (CUDA or CPU), else X's dtype."""
    return autocast_dtype(X) or X.dtype


def _check_adapter(name, W_out, W_in, A, B, s):
    if A is None:
        return
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != W_in or B.shape[0] != W_out or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{name}: LoRA A {tuple(A.shape)} / B {tuple(B.shape)} do not match a [{W_out}, {W_in}] "
            f"weight (expected A [r, {W_in}], B [{W_out}, r])"
        )


def _check_input(name, X, W, quant, in_f, kernels: bool):
    """X as the fused functions take it, or an error in the caller's terms: a float tensor whose last
    dimension is the weight's input size, on a device the kernels run on (when this call launches kernels),
    and (without autocast, on a plain base weight) in the weight's dtype, as PEFT's own layer requires."""
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        raise TypeError(
            f"{name}: the input X must be a float tensor, got "
            f"{X.dtype if isinstance(X, torch.Tensor) else type(X).__name__}"
        )
    if X.dim() < 1 or X.shape[-1] != in_f:
        raise ValueError(
            f"{name}: the input X has shape {tuple(X.shape)} but the weight takes {in_f} input "
            f"features; expected X [..., {in_f}]"
        )
    if kernels:
        check_tensor(name, "X", X)
    if quant is None and W.is_floating_point() and X.dtype != W.dtype and autocast_dtype(X) is None:
        raise TypeError(
            f"{name}: the input X is {X.dtype} but the base weight is {W.dtype} and autocast is off "
            "(PEFT's layer raises here too): cast the input or run under torch.autocast"
        )


def _mm_scaled(a, b, s):
    """s * (a @ b) as one GEMM into a fresh tensor (alpha = s; beta = 0 never reads its old contents)."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=s)


def _base_plus_lora(X, Wt, XA, Bt, s):
    """X @ Wt + s XA @ Bt: the rank-r GEMM writes the output and the base GEMM adds to it in its epilogue
    (beta = 1), instead of a second read-modify-write pass of the output after the base GEMM."""
    return _mm_scaled(XA, Bt, s).addmm_(X, Wt)


# ---------------------------------------------------------------------------------- one projection
class Projection(NamedTuple):
    """One LoRA projection by name: Y = X W^T (+ bias) + scale * (drop(X) A^T) B^T. `label` names it in the
    gradients, the saved tensors and the custom ops' arguments (o; q, k, v; gate, up, down)."""

    label: str
    weight: torch.Tensor  # the base weight: plain, bitsandbytes 4-bit (packed) or GPTQ (qweight)
    quant: object  # its quantisation state (None, a 4-bit QuantState, GPTQState)
    A: torch.Tensor | None  # the adapter, None without one (then Y = X W^T + bias)
    B: torch.Tensor | None
    scale: float
    bias: torch.Tensor | None = None
    dropout: float = 0.0
    mask: torch.Tensor | None = None  # the dropout mask, drawn before the forward (_with_masks)
    Ac: torch.Tensor | None = None  # A and B in the compute dtype, cast once per call (_in_dtype): the
    Bc: torch.Tensor | None = None  # forward and the backward share them (each cast is a kernel launch)


# Each Function's projections by name, in PEFT's (and its dropout masks') order; the fields are the labels.
OProjection = namedtuple("OProjection", ["o"])
QKVProjections = namedtuple("QKVProjections", ["q", "k", "v"])
MLPProjections = namedtuple("MLPProjections", ["gate", "up", "down"])


def _in_dtype(prs, dtype):
    """prs with each adapter's A and B cast to the compute dtype once (contiguous: the GLU kernels read B_g,
    B_u and A_d by rows)."""
    return prs._make(
        pr if pr.A is None else pr._replace(Ac=pr.A.to(dtype).contiguous(), Bc=pr.B.to(dtype).contiguous())
        for pr in prs
    )


def _with_masks(prs, X, dtype, training):
    """prs with the dropout mask of each adapter whose dropout is active, drawn here for the Functions and the
    custom ops alike (an op's masks are its inputs, so the traced graph owns the random numbers), in
    projection order, PEFT's (q, k, v / gate, up, down). F.dropout of a ones tensor draws exactly the mask
    F.dropout(X) would (the mask does not depend on the values), so with the same RNG state the masks are
    PEFT's. Each mask is [rows, in_features] (down_proj's input is [rows, intermediate])."""
    drops = [bool(training) and pr.A is not None and pr.dropout != 0.0 for pr in prs]
    if not any(drops):
        return prs
    rows = X.numel() // X.shape[-1] if X.dim() else 1

    def mask(pr):
        ones = torch.ones(rows, weight_shape(pr.weight, pr.quant)[1], dtype=dtype, device=X.device)
        return F.dropout(ones, pr.dropout, True)

    return prs._make(pr._replace(mask=mask(pr)) if drop else pr for pr, drop in zip(prs, drops))


class ProjSaved(NamedTuple):
    """What one projection's backward reads besides its input: XA = drop(X) A^T (dB's input) and, with a
    dropout mask, drop(X) itself (dA's input; without a mask dA reads X)."""

    XA: torch.Tensor | None
    Xd: torch.Tensor | None


def _proj_forward(X2, pr: Projection, dtype):
    W = dequantize_base(pr.weight, pr.quant, dtype)
    if pr.A is None:
        Y, saved = X2 @ W.t(), ProjSaved(None, None)
    else:
        Xd = X2 if pr.mask is None else X2 * pr.mask
        XA = Xd @ pr.Ac.t()
        if W.shape[1] <= W.shape[0]:
            # Widening projection (gate/up): one GEMM over [X, XA] @ [W, s B]^T costs a copy of the narrow
            # input instead of a second pass over the wide output.
            Y = torch.cat([X2, XA], 1) @ torch.cat([W, pr.Bc * pr.scale], 1).t()
        else:
            Y = _base_plus_lora(X2, W.t(), XA, pr.Bc.t(), pr.scale)
        saved = ProjSaved(XA, None if pr.mask is None else Xd)
    if pr.bias is not None:
        Y += pr.bias.to(dtype)
    return Y, saved


def _proj_needs(need: dict, pr: Projection) -> dict:
    """The A / B / bias gradients wanted of projection pr (need: by argument name, <label>_A / _B / _bias)."""
    label = pr.label
    return {
        "A": need.get(f"{label}_A", False),
        "B": need.get(f"{label}_B", False),
        "bias": need.get(f"{label}_bias", False),
    }


def _proj_grads(pr: Projection, dA=None, dB=None, dbias=None) -> dict:
    """The gradients of projection pr by name (a bias gradient only where there is one: the MLP has none)."""
    label = pr.label
    grads = {f"{label}_A": dA, f"{label}_B": dB}
    return grads if dbias is None else {**grads, f"{label}_bias": dbias}


def _proj_backward_input(dY, pr: Projection, saved: ProjSaved, dtype, needs):
    """(dX, s dY B, dB, dbias) of one projection: all but dA, which needs the projection's input."""
    out_f, in_f = weight_shape(pr.weight, pr.quant)
    dB = dYBs = None
    if pr.A is None:
        dX = dY @ dequantize_base(pr.weight, pr.quant, dtype)
    else:
        A, B = pr.Ac, pr.Bc
        dYBs = _mm_scaled(dY, B, pr.scale)  # [T, r]
        if needs["B"]:
            dB = _mm_scaled(dY.t(), saved.XA, pr.scale).to(pr.B.dtype)
        if pr.mask is not None:
            dX = dY @ dequantize_base(pr.weight, pr.quant, dtype)
            dX += (dYBs @ A) * pr.mask
        elif out_f <= in_f:
            # widening dX (down_proj's): one GEMM over [dY, s dYB] @ [W; A], an NF4 weight dequantised
            # straight into the stacked rows
            dX = torch.cat([dY, dYBs], 1) @ _stack_rows([pr], A, dtype, dY.device)
        else:
            dX = _base_plus_lora(dY, dequantize_base(pr.weight, pr.quant, dtype), dYBs, A, 1.0)
    dbias = dY.sum(0).to(pr.bias.dtype) if (pr.bias is not None and needs["bias"]) else None
    return dX, dYBs, dB, dbias


def _lora_dA(dYBs, X2, pr: Projection, saved: ProjSaved, needs):
    if pr.A is None or not needs["A"]:
        return None
    return (dYBs.t() @ (X2 if saved.Xd is None else saved.Xd)).to(pr.A.dtype)


def _proj_backward(dY, X2, pr: Projection, saved: ProjSaved, dtype, needs):
    """(dX contribution, dA, dB, dbias) of one projection."""
    dX, dYBs, dB, dbias = _proj_backward_input(dY, pr, saved, dtype, needs)
    return dX, _lora_dA(dYBs, X2, pr, saved, needs), dB, dbias


def _flat(X):
    return X.reshape(-1, X.shape[-1])


def _unflat(Y, X):
    """Y [T, n] as [*X.shape[:-1], n] with no view relation to Y: FSDP2 warns about (and would skip its hooks
    after an in-place op on) a module output that is a view."""
    return torch.ops.aten._unsafe_view(Y, (*X.shape[:-1], Y.shape[-1]))


# ------------------------------------------------------------------------------------ saved tensors
# Each path's saved record, declared by its plan (ctx.Saved) and filled by its forward: a flat record of
# tensors (None where absent) read back by name. Per projection: <label>_XA, <label>_Xd (ProjSaved).
def _proj_fields(labels):
    return tuple(f"{label}_{f}" for label in labels for f in ProjSaved._fields)


OSaved = namedtuple("OSaved", _proj_fields(OProjection._fields))
QKVSaved = namedtuple("QKVSaved", _proj_fields(QKVProjections._fields))
QKVStackedSaved = namedtuple("QKVStackedSaved", ["XA"])  # X [A_q; A_k; A_v]^T
MLPSaved = namedtuple("MLPSaved", ["e", "g", *_proj_fields(MLPProjections._fields)])  # e, g: gate / up outputs
MLPFusedSaved = namedtuple("MLPFusedSaved", ["EG", "XA", "hA"])  # see _mlp_fused_forward


def _record(cls, prs, proj_saved, **rest):
    """cls (a saved record) from rest and each projection's ProjSaved, by name."""
    named = {f"{pr.label}_{f}": t for pr, sv in zip(prs, proj_saved) for f, t in zip(ProjSaved._fields, sv)}
    return cls(**rest, **named)


def _proj_saved(record, pr: Projection) -> ProjSaved:
    return ProjSaved(*(getattr(record, f"{pr.label}_{f}") for f in ProjSaved._fields))


class _OpCtx:
    """The ctx of the plan / forward / backward functions inside a custom op: the compute-dtype input X2, the
    projections (their masks are op inputs) and the saved record are attributes here (_save, _saved); what
    autograd keeps between the ops is the ops' business (_define)."""


def _save(ctx, X2, source, saved):
    """Keep X2 and the saved record (ctx.Saved, as the plan declared it) for the backward. On a Function's
    ctx everything goes through save_for_backward (saved-tensor hooks, HF's non-reentrant checkpointing,
    must see every activation), the dropout masks included, and ctx.prs keeps none. With `source` (X is a
    recomputable rms_norm output: the Function found its NormSource) the norm's input and weight take X2's
    place, which the norm's backward keeps anyway, and _saved recomputes X2 from them."""
    if type(saved) is not ctx.Saved:
        raise RuntimeError(f"fusedlora internal: saved {type(saved).__name__}, the plan declared {ctx.Saved.__name__}")
    if isinstance(ctx, _OpCtx):
        ctx.X2, ctx.saved = X2, saved
        return
    masks = [pr.mask for pr in ctx.prs if pr.mask is not None]
    if masks:
        ctx.masked = tuple(pr.mask is not None for pr in ctx.prs)
        ctx.prs = ctx.prs._make(pr._replace(mask=None) for pr in ctx.prs)
    ctx.n_masks = len(masks)
    if source is None:
        ctx.input_norm = None
        ctx.save_for_backward(X2, *masks, *saved)
    else:
        ctx.input_norm = (source._replace(x2d=None, weight=None), X2.dtype)
        ctx.save_for_backward(source.x2d, source.weight, *masks, *saved)


def _saved(ctx):
    """(X2, the projections with their masks, the saved record) as _save kept them."""
    if isinstance(ctx, _OpCtx):
        return ctx.X2, ctx.prs, ctx.saved
    tensors = ctx.saved_tensors
    if ctx.input_norm is None:
        X2, n_input = tensors[0], 1
    else:
        recipe, dtype = ctx.input_norm
        X2, n_input = recipe.recompute(tensors[0], tensors[1]).to(dtype), 2
    prs, n_saved = ctx.prs, n_input + ctx.n_masks
    if ctx.n_masks:
        masks = iter(tensors[n_input:n_saved])
        prs = prs._make(pr._replace(mask=next(masks)) if m else pr for pr, m in zip(prs, ctx.masked))
    return X2, prs, ctx.Saved(*tensors[n_saved:])


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


def _seed_slots(label):
    """A projection's five seed-API arguments (W, quant, A, B, scale) by name."""
    return tuple(f"{label}_{n}" for n in ("weight", "quant", "A", "B", "scale"))


O_SLOTS = _Slots("X", *_seed_slots("o"), "o_bias", "dropout", "training")
QKV_SLOTS = _Slots(
    "X",
    *_seed_slots("q"),
    *_seed_slots("k"),
    *_seed_slots("v"),
    "inplace",
    "q_bias",
    "k_bias",
    "v_bias",
    "dropouts",
    "training",
)
MLP_SLOTS = _Slots(
    "X",
    *_seed_slots("gate"),
    *_seed_slots("up"),
    *_seed_slots("down"),
    "activation_fn",
    "activation_fn_backward",
    "inplace",
    "dropouts",
    "training",
)


def _stack_rows(prs, extra, dtype, device):
    """[W_1; ...; W_n; extra] (extra may be None) as one [sum(out) + extra rows, in] tensor; NF4 weights
    are dequantised straight into their rows (no per-weight temporary)."""
    if all(pr.quant is None for pr in prs):
        return torch.cat([pr.weight.to(dtype) for pr in prs] + ([] if extra is None else [extra]), 0)
    shapes = [weight_shape(pr.weight, pr.quant) for pr in prs]
    rows = sum(o for o, _ in shapes)
    buf = torch.empty(rows + (0 if extra is None else extra.shape[0]), shapes[0][1], dtype=dtype, device=device)
    row = 0
    for pr, (o, _) in zip(prs, shapes):
        dequantize_base(pr.weight, pr.quant, dtype, out=buf[row : row + o])
        row += o
    if extra is not None:
        buf[rows:].copy_(extra)
    return buf


def _qkv_fusable(prs, training):
    """One stacked LoRA path serves q, k and v when each has an adapter and no dropout is active (dropout
    masks differ per projection, as in PEFT)."""
    return all(pr.A is not None and (pr.dropout == 0.0 or not training) for pr in prs)


def _rank_blocks(prs):
    """{label: the column slice of projection's rank in [XA_1 | XA_2 | ...]} for the stacked adapter products."""
    blocks, col = {}, 0
    for pr in prs:
        blocks[pr.label] = slice(col, col + pr.A.shape[0])
        col += pr.A.shape[0]
    return blocks


def _qkv_stacked_forward(X2, prs, dtype):
    """Q, K, V with one adapter-input GEMM (X [A_q; A_k; A_v]^T) shared by the three projections."""
    XA = X2 @ torch.cat([pr.Ac for pr in prs], 0).t()
    outs = []
    for pr, cols in zip(prs, _rank_blocks(prs).values()):
        W = dequantize_base(pr.weight, pr.quant, dtype)
        Y = X2 @ W.t() if pr.bias is None else torch.addmm(pr.bias.to(dtype), X2, W.t())
        Y.addmm_(XA[:, cols], pr.Bc.t(), alpha=pr.scale)
        outs.append(Y)
    return outs, XA


def _qkv_stacked_backward(dYs, X2, XA, prs, dtype):
    """dX and the adapters' gradients by name for the stacked path: dX = [dQ, dK, dV, s dY B...] @ [W_q; W_k;
    W_v; A...] in one GEMM, dA of all three in another."""
    blocks = _rank_blocks(prs)
    dYBs = [_mm_scaled(dY, pr.Bc, pr.scale) for pr, dY in zip(prs, dYs)]  # s dY B  [T, r]
    dBs = [_mm_scaled(dY.t(), XA[:, blocks[pr.label]], pr.scale).to(pr.B.dtype) for pr, dY in zip(prs, dYs)]
    G = torch.cat(list(dYs) + dYBs, 1)
    A_cat = torch.cat([pr.Ac for pr in prs], 0)
    dX = G @ _stack_rows(prs, A_cat, dtype, X2.device)
    n_out = sum(dY.shape[1] for dY in dYs)
    dA_cat = G[:, n_out:].t() @ X2
    grads = {}
    for pr, dY, dB in zip(prs, dYs, dBs):
        db = dY.sum(0).to(pr.bias.dtype) if pr.bias is not None else None
        grads.update(_proj_grads(pr, dA_cat[blocks[pr.label]].to(pr.A.dtype), dB, db))
    return dX, grads


def _gate_up_shareable(pg, pu, training):
    """gate and up can share one adapter-input GEMM and one [X, XA] copy: both have adapters, no active
    dropout, no bias, and both widen (the [X, XA] @ [W, s B]^T form of _proj_forward)."""

    def ok(pr):
        o, i = weight_shape(pr.weight, pr.quant)
        return pr.A is not None and (pr.dropout == 0.0 or not training) and pr.bias is None and i <= o

    return ok(pg) and ok(pu)


def _gate_up_forward(X2, pg, pu, dtype):
    """e, g = [X, X A_g^T, X A_u^T] @ [W_g, s_g B_g, 0]^T and [...] @ [W_u, 0, s_u B_u]^T: one adapter-input
    GEMM and one copy of X for both projections (the zero blocks cost K + r extra columns, ~1 %)."""
    XA = X2 @ torch.cat([pg.Ac, pu.Ac], 0).t()
    Xc = torch.cat([X2, XA], 1)
    blocks = _rank_blocks((pg, pu))
    outs = [Xc @ _gate_up_weight(pg, pu, which, dtype).t() for which in (0, 1)]
    return outs, (ProjSaved(XA[:, blocks["gate"]], None), ProjSaved(XA[:, blocks["up"]], None))


def _gate_up_weight(pg, pu, which, dtype):
    """[W_g | s_g B_g | 0] (which = 0) or [W_u | 0 | s_u B_u] (which = 1), [I, H + r_g + r_u]: the weight of
    the shared [X, X A_g^T, X A_u^T] input, an NF4 weight dequantised straight into its block."""
    pr = (pg, pu)[which]
    out_f, in_f = weight_shape(pr.weight, pr.quant)
    rg, ru = pg.A.shape[0], pu.A.shape[0]
    buf = torch.empty(out_f, in_f + rg + ru, dtype=dtype, device=pr.A.device)
    if nf4_writes_into(pr.quant, dtype, buf[:, :in_f]):
        _dequantize_nf4(pr.weight, pr.quant, buf[:, :in_f], dtype)  # no temporary, no copy
        buf[:, in_f:].zero_()
        mine = in_f if which == 0 else in_f + rg
        torch.mul(pr.Bc, pr.scale, out=buf[:, mine : mine + pr.A.shape[0]])
        return buf
    # other weights: one cat into the buffer (a strided copy_ into the block is slower than cat)
    W, sB = dequantize_base(pr.weight, pr.quant, dtype), pr.Bc * pr.scale
    zeros = sB.new_zeros(out_f, ru if which == 0 else rg)
    return torch.cat([W, sB, zeros] if which == 0 else [W, zeros, sB], 1, out=buf)


def _mlp_fusable(prs, training, act, act_bwd):
    """The MLP takes the fused path (_mlp_fused_forward / _mlp_fused_backward): gate and up can share one
    adapter-input GEMM, down has an adapter with no active dropout, and the activation is one of ours in
    both directions (the backward's kernel takes the adapter products, glu_lora_backward; the forward reads
    e | g in place from one buffer)."""
    glu_act = getattr(act_bwd, "glu_act", None)
    return bool(
        _gate_up_shareable(prs.gate, prs.up, training)
        and glu_act
        and getattr(act, "glu_act", None) == glu_act
        and prs.down.A is not None
        and not (prs.down.dropout != 0.0 and training)
    )


def _gate_up_base(X2, pg, pu, out, dtype):
    """out[:, :I] | out[:, I:2I] = X W_g^T | X W_u^T: one N = 2I GEMM over [W_g; W_u] when both are NF4
    (dequantised straight into one buffer), else one GEMM per weight into its half (no copy of a plain
    weight; two N = I GEMMs measured as fast as one N = 2I on an H100)."""
    I = weight_shape(pg.weight, pg.quant)[0]
    if is_nf4(pg.quant) and is_nf4(pu.quant):
        torch.mm(X2, _stack_rows([pg, pu], None, dtype, X2.device).t(), out=out[:, : 2 * I])
    else:
        for k, pr in enumerate((pg, pu)):
            torch.mm(X2, dequantize_base(pr.weight, pr.quant, dtype).t(), out=out[:, k * I : (k + 1) * I])


def _mlp_fused_forward(X2, prs, dtype, act):
    """(Y, MLPFusedSaved). EG [T, 2I + r_g + r_u rounded up to 64] holds the base GEMM outputs X W_g^T |
    X W_u^T (K = H: the adapter terms s XA B^T are added per tile by glu_lora_forward and again by
    glu_lora_backward, instead of widening K to H + r_g + r_u, which cost ~6 % of the GEMM), and spare
    columns where the backward puts s_g de B_g | s_u dg B_u after de | dg, so that dX is one GEMM over the
    buffer. Rows start 128-byte aligned: with 64-byte aligned rows each 128-byte row segment of the GLU tiles
    splits over two cache lines (slower; docs/perf-notes.md). XA = X [A_g; A_u]^T. h = act(e) * g is not
    kept; hA = h A_d^T is (down_proj's dB)."""
    pg, pu, pd = prs
    I, rg = weight_shape(pg.weight, pg.quant)[0], pg.A.shape[0]
    XA = X2 @ torch.cat([pg.Ac, pu.Ac], 0).t()
    EG = wide_rows(X2, X2.shape[0], cdiv(2 * I + rg + pu.A.shape[0], 64) * 64)
    _gate_up_base(X2, pg, pu, EG, dtype)
    h = glu_lora_forward(EG[:, :I], EG[:, I : 2 * I], XA, rg, pg.Bc, pu.Bc, (pg.scale, pu.scale), act)
    hA = h @ pd.Ac.t()
    Y = _base_plus_lora(h, dequantize_base(pd.weight, pd.quant, dtype).t(), hA, pd.Bc.t(), pd.scale)
    return Y, MLPFusedSaved(EG=EG, XA=XA, hA=hA)


def _glu_lora_products(Q, prs):
    """glu_lora_backward's Q [I, 3R] = [dB_gate | dB_up | dA_down^T], each rank zero-padded to R, by name."""
    R = glu_lora_rank_pad(max(pr.A.shape[0] for pr in prs))
    g, u, d = (Q[:, k * R : k * R + pr.A.shape[0]] for k, pr in enumerate(prs))
    return {"gate_B": g, "up_B": u, "down_A": d.t()}


def _mlp_fused_backward(ctx, need, X2, prs, saved: MLPFusedSaved, dY):
    """LoRA_MLP.backward on the fused path. dh = dY W_d (K = H; its adapter term s_d dY B_d A_d is added in
    the GLU kernel), then one kernel gives de, dg, dB_gate, dB_up and dA_down (the products that would
    re-read de, dg and h; h is never stored), one more pass s de B_g | s dg B_u into the columns after
    de | dg, and dX is one GEMM [de | dg | s de B_g | s dg B_u] @ [W_g; W_u; A_g; A_u]."""
    pg, pu, pd = prs
    dtype, EG = ctx.dtype, saved.EG
    I, rg, ru = weight_shape(pg.weight, pg.quant)[0], pg.A.shape[0], pu.A.shape[0]
    dYBs_d = _mm_scaled(dY, pd.Bc, pd.scale)  # s_d dY B_d  [T, r_d]
    ddB = _mm_scaled(dY.t(), saved.hA, pd.scale).to(pd.B.dtype) if need["down_B"] else None
    dh = dY @ dequantize_base(pd.weight, pd.quant, dtype)
    D = EG if _overwrites_saved(ctx) else wide_rows(EG, *EG.shape)  # de | dg | G, over e | g when inplace
    de, dg, Q = glu_lora_backward(
        dh,
        EG[:, :I],
        EG[:, I : 2 * I],
        saved.XA,
        rg,
        dYBs_d,
        pg.Bc,
        pu.Bc,
        pd.Ac,
        (pg.scale, pu.scale),
        ctx.act_bwd.glu_act,
        out=(D[:, :I], D[:, I : 2 * I]),
    )
    del dh
    # (s de B_g / s dg B_u as extra output columns of the dX GEMM, de [W_g | s_g B_g | 0], is slower: N = H + 2r
    # tiles badly, costing more than this pass.)
    G = glu_lora_dyb(de, dg, pg.Bc, pu.Bc, (pg.scale, pu.scale), out=D[:, 2 * I : 2 * I + rg + ru])
    dX = None
    if need["X"]:  # (the first layer's input often needs no gradient: no dX GEMM then)
        A_cat = torch.cat([pg.Ac, pu.Ac])
        dX = (D[:, : 2 * I + rg + ru] @ _stack_rows([pg, pu], A_cat, dtype, X2.device)).view(ctx.x_shape)
    grads = dict(X=dX, down_B=ddB)
    if need["gate_A"] or need["up_A"]:
        dA_cat = G.t() @ X2
        for pr, cols in zip((pg, pu), _rank_blocks((pg, pu)).values()):
            if need[f"{pr.label}_A"]:
                grads[f"{pr.label}_A"] = dA_cat[cols].to(pr.A.dtype)
    for name, product in _glu_lora_products(Q, prs).items():
        if need[name]:
            grads[name] = product.to(_parameter(prs, name).dtype)
    return grads


def _parameter(prs, grad_name):
    """The trainable tensor an argument name stands for: prs.gate.B for gate_B."""
    label, field = grad_name.rsplit("_", 1)
    return getattr(getattr(prs, label), field)


# ------------------------------------------------------------------------------------ Functions
# Each Function is a thin shell over three functions of (ctx, X, projections by name, scalars): *_plan sets
# the ctx attributes the backward reads (and declares the saved record, ctx.Saved), *_forward computes and
# saves (_save), *_backward returns gradients by name. The custom ops (_define) call the same three.
def _o_plan(ctx, X, prs, dtype, training):
    ctx.prs, ctx.dtype, ctx.x_shape, ctx.Saved = _in_dtype(prs, dtype), dtype, X.shape, OSaved


def _o_forward(ctx, X, prs, dtype, training):
    _o_plan(ctx, X, prs, dtype, training)
    X2 = _flat(X).to(dtype)
    Y, saved = _proj_forward(X2, ctx.prs.o, dtype)
    _save(ctx, X2, None, _record(OSaved, ctx.prs, [saved]))
    return (_unflat(Y, X),)


def _o_backward(ctx, need, dY):
    X2, prs, saved = _saved(ctx)
    pr = prs.o
    dX, dA, dB, dbias = _proj_backward(
        _flat(dY).to(ctx.dtype), X2, pr, _proj_saved(saved, pr), ctx.dtype, _proj_needs(need, pr)
    )
    return dict(X=dX.view(ctx.x_shape), **_proj_grads(pr, dA, dB, dbias))


def _qkv_plan(ctx, X, prs, dtype, training):
    ctx.prs, ctx.dtype, ctx.x_shape = _in_dtype(prs, dtype), dtype, X.shape
    ctx.stacked = _qkv_fusable(prs, training)
    ctx.Saved = QKVStackedSaved if ctx.stacked else QKVSaved


def _qkv_forward(ctx, X, prs, dtype, training, source=None):
    _qkv_plan(ctx, X, prs, dtype, training)
    X2 = _flat(X).to(dtype)
    if ctx.stacked:  # few launches: these layers are often host-bound
        outs, XA = _qkv_stacked_forward(X2, ctx.prs, dtype)
        _save(ctx, X2, source, QKVStackedSaved(XA=XA))
    else:
        outs, saved = zip(*(_proj_forward(X2, pr, dtype) for pr in ctx.prs))
        _save(ctx, X2, source, _record(QKVSaved, ctx.prs, saved))
    return tuple(_unflat(Y, X) for Y in outs)


def _qkv_backward(ctx, need, dQ, dK, dV):
    X2, prs, saved = _saved(ctx)
    dYs = (dQ, dK, dV)
    if ctx.stacked:
        dYs = [
            _flat(d).to(ctx.dtype) if d is not None else X2.new_zeros(X2.shape[0], weight_shape(pr.weight, pr.quant)[0])
            for d, pr in zip(dYs, prs)
        ]
        dX, grads = _qkv_stacked_backward(dYs, X2, saved.XA, prs, ctx.dtype)
        return dict(X=dX.view(ctx.x_shape), **grads)
    dX, grads = None, {}
    for pr, dY in zip(prs, dYs):
        if dY is None:
            continue
        d, dA, dB, db = _proj_backward(
            _flat(dY).to(ctx.dtype), X2, pr, _proj_saved(saved, pr), ctx.dtype, _proj_needs(need, pr)
        )
        dX = d if dX is None else dX.add_(d)
        grads.update(_proj_grads(pr, dA, dB, db))
    return dict(X=dX.view(ctx.x_shape), **grads)


def _overwrites_saved(ctx):
    """The MLP backward writes de, dg over its saved e, g: asked for (inplace) and safe now (autograd frees
    the graph after this backward; a retained graph's next backward reads e, g again)."""
    return ctx.inplace and saved_tensors_writable()


def _mlp_plan(ctx, X, prs, dtype, training, act, act_bwd, inplace):
    ctx.prs, ctx.dtype, ctx.x_shape = _in_dtype(prs, dtype), dtype, X.shape
    ctx.act, ctx.act_bwd, ctx.inplace = act, act_bwd, inplace
    ctx.fused_glu = _mlp_fusable(prs, training, act, act_bwd)
    ctx.Saved = MLPFusedSaved if ctx.fused_glu else MLPSaved


def _mlp_forward(ctx, X, prs, dtype, training, act, act_bwd, inplace, source=None):
    _mlp_plan(ctx, X, prs, dtype, training, act, act_bwd, inplace)
    pg, pu, pd = ctx.prs
    X2 = _flat(X).to(dtype)
    if ctx.fused_glu:
        Y, saved = _mlp_fused_forward(X2, ctx.prs, dtype, act.glu_act)
        _save(ctx, X2, source, saved)
    else:
        if _gate_up_shareable(pg, pu, training):
            (e, g), (sg, su) = _gate_up_forward(X2, pg, pu, dtype)
        else:
            e, sg = _proj_forward(X2, pg, dtype)
            g, su = _proj_forward(X2, pu, dtype)
        Y, sd = _proj_forward(act(e, g), pd, dtype)
        # h is not kept: the backward recomputes it from e and g
        _save(ctx, X2, source, _record(MLPSaved, ctx.prs, (sg, su, sd), e=e, g=g))
    return (_unflat(Y, X),)


def _mlp_backward(ctx, need, dY):
    X2, prs, saved = _saved(ctx)
    dtype = ctx.dtype
    if ctx.fused_glu:
        return _mlp_fused_backward(ctx, need, X2, prs, saved, _flat(dY).to(dtype))
    pg, pu, pd = prs
    sg, su, sd = (_proj_saved(saved, pr) for pr in prs)
    nd = _proj_needs(need, pd)
    dh, dYBs_d, ddB, _ = _proj_backward_input(_flat(dY).to(dtype), pd, sd, dtype, nd)
    inplace = _overwrites_saved(ctx)
    e, g = saved.e, saved.g
    if getattr(ctx.act_bwd, "stores_h", False):  # h comes back over dh: no recompute pass
        de, dg, h = ctx.act_bwd(dh, e, g, inplace, store_h=True)
    else:
        h = ctx.act(e, g)
        de, dg = ctx.act_bwd(dh, e, g, inplace)
    grads = dict(_proj_grads(pd, _lora_dA(dYBs_d, h, pd, sd, nd), ddB))
    del h, dh
    if pg.mask is None and pu.mask is None:
        # No dropout masks: dX accumulates both projections in the GEMMs' epilogues (beta = 1).
        dX = de @ dequantize_base(pg.weight, pg.quant, dtype)
        dX.addmm_(dg, dequantize_base(pu.weight, pu.quant, dtype))
        lora = [(d, pr, sv) for d, pr, sv in ((de, pg, sg), (dg, pu, su)) if pr.A is not None]
        if lora:
            dYBs = [_mm_scaled(d, pr.Bc, pr.scale) for d, pr, _ in lora]
            G = dYBs[0] if len(lora) == 1 else torch.cat(dYBs, 1)
            dX.addmm_(G, torch.cat([pr.Ac for _, pr, _ in lora], 0))
            dA_cat = G.t() @ X2
            for (d, pr, sv), cols in zip(lora, _rank_blocks([pr for _, pr, _ in lora]).values()):
                dB = _mm_scaled(d.t(), sv.XA, pr.scale).to(pr.B.dtype) if need[f"{pr.label}_B"] else None
                grads.update(_proj_grads(pr, dA_cat[cols].to(pr.A.dtype), dB))
    else:
        dX, dgA, dgB, _ = _proj_backward(de, X2, pg, sg, dtype, _proj_needs(need, pg))
        dXu, duA, duB, _ = _proj_backward(dg, X2, pu, su, dtype, _proj_needs(need, pu))
        dX += dXu
        grads.update(_proj_grads(pg, dgA, dgB), **_proj_grads(pu, duA, duB))
    return dict(X=dX.view(ctx.x_shape), **grads)


# --------------------------------------------------------------- the seed API's positional arguments
def _projections(fn, entry, group, specs, X, kernels):
    """group (a Projections record) of one Projection per spec (W, quant, A, B, S, bias, dropout), in the
    group's order, the input and the adapter shapes checked; errors name the Function `fn` (and the
    projection) and the public `entry` that calls it. A base weight that requires grad under grad mode is
    refused here for the custom ops' callers; inside a Function's forward grad mode is off, and its backward
    refuses it (_backward_checks)."""
    W, Q = specs[0][0], specs[0][1]
    _check_input(f"{fn} ({entry})", X, W, Q, weight_shape(W, Q)[1], kernels)
    prs = []
    for label, (W, Q, A, B, S, bias, p) in zip(group._fields, specs):
        if W.requires_grad and torch.is_grad_enabled():
            _refuse_base_grad(fn, _seed_weight_name(label))
        out_f, in_f = weight_shape(W, Q)
        _check_adapter(fn if len(specs) == 1 else f"{fn} ({label})", out_f, in_f, A, B, S)
        prs.append(Projection(label, W, Q, A, B, float(S or 0.0), bias, float(p)))
    return group._make(prs)


def _seed_weight_name(label):
    """The seed API's name of a projection's base weight argument: W (LoRA_O), qW, kW, vW, gW, uW, dW."""
    return "W" if label == "o" else f"{label[0]}W"


def _refuse_base_grad(fn, arg):
    """A base weight asked for a gradient is refused: the fused functions give it none (autograd would leave
    its .grad None, silently)."""
    raise ValueError(
        f"{fn}: the base weight {arg} requires grad, but {fn} gives base weights no gradient "
        f"(it trains the LoRA A and B, and biases): freeze it ({arg}.requires_grad_(False)) or "
        f"pass {arg}.detach()"
    )


def _backward_checks(fn, need):
    """In a Function's backward: refuse a double backward (refuse_double_backward) and a base weight argument
    (W, qW, kW, vW, gW, uW, dW) asked for a gradient."""
    refuse_double_backward(fn)
    for arg, wanted in need.items():
        if wanted and arg.endswith("_weight"):
            _refuse_base_grad(fn, _seed_weight_name(arg[: -len("_weight")]))


def _o_projections(X, W, W_quant, A, B, S, bias, dropout):
    return _projections(
        "LoRA_O", "apply_lora_o", OProjection, [(W, W_quant, A, B, S, bias, dropout)], X, kernels=W_quant is not None
    )


def _qkv_projections(X, q, k, v, biases, dropouts):
    """q, k, v: each projection's seed arguments (W, quant, A, B, S)."""
    specs = [(*proj, b, p) for proj, b, p in zip((q, k, v), biases, dropouts)]
    return _projections(
        "LoRA_QKV", "apply_lora_qkv", QKVProjections, specs, X, kernels=any(proj[1] is not None for proj in (q, k, v))
    )


def _mlp_projections(X, gate, up, down, dropouts):
    specs = [(*proj, None, p) for proj, p in zip((gate, up, down), dropouts)]
    return _projections("LoRA_MLP", "apply_lora_mlp_*", MLPProjections, specs, X, kernels=True)


class LoRA_O(torch.autograd.Function):
    """LoRA_O.apply(X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False) -> X W^T + S (X A^T) B^T."""

    @staticmethod
    def forward(ctx, X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False):
        prs = _o_projections(X, W, W_quant, A, B, S, bias, dropout)
        dtype = _compute_dtype(X)
        return _o_forward(ctx, X, _with_masks(prs, X, dtype, training), dtype, training)[0]

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
    def forward(
        ctx,
        X,
        qW,
        qQ,
        qA,
        qB,
        qS,
        kW,
        kQ,
        kA,
        kB,
        kS,
        vW,
        vQ,
        vA,
        vB,
        vS,
        inplace=True,
        q_bias=None,
        k_bias=None,
        v_bias=None,
        dropouts=(0.0, 0.0, 0.0),
        training=False,
    ):
        prs = _qkv_projections(
            X, (qW, qQ, qA, qB, qS), (kW, kQ, kA, kB, kS), (vW, vQ, vA, vB, vS), (q_bias, k_bias, v_bias), dropouts
        )
        dtype = _compute_dtype(X)
        return _qkv_forward(ctx, X, _with_masks(prs, X, dtype, training), dtype, training, norm_source(X))

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
    def forward(
        ctx,
        X,
        gW,
        gQ,
        gA,
        gB,
        gS,
        uW,
        uQ,
        uA,
        uB,
        uS,
        dW,
        dQ,
        dA,
        dB,
        dS,
        activation_fn,
        activation_fn_backward,
        inplace=True,
        dropouts=(0.0, 0.0, 0.0),
        training=False,
    ):
        prs = _mlp_projections(X, (gW, gQ, gA, gB, gS), (uW, uQ, uA, uB, uS), (dW, dQ, dA, dB, dS), dropouts)
        dtype = _compute_dtype(X)
        return _mlp_forward(
            ctx,
            X,
            _with_masks(prs, X, dtype, training),
            dtype,
            training,
            activation_fn,
            activation_fn_backward,
            inplace,
            norm_source(X),
        )[0]

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
# The fused LoRA functions as torch.library custom ops fusedlora::lora_{o,qkv,mlp} (and their *_backward):
# what `apply_lora_*` call under torch.compile, so Dynamo sees one opaque call per layer and its gradient
# formula. `lora_o`, `lora_qkv` and `lora_mlp` take the Functions' arguments; the ops run the Functions' own
# plan / forward / backward functions. Every argument is named in the schema: X; per projection
# <label>_<field> for each field of PROJECTION_ARGS (op_arguments builds them from the Projection record,
# _op_projections rebuilds it): its A, B, bias and dropout mask as optional tensors (autograd returns a
# gradient for each), its base weight as one tensor list in quant.BASE_TENSORS order with the scalars of
# quant.BaseLayout (rebuilt inside as NF4State / GPTQState), its scale and dropout; then the compute dtype
# (autocast's, decided at trace time), training and the MLP's activation name and inplace. The dropout masks
# are drawn before the call (_with_masks), so the traced graph owns the random numbers.
# The forward op returns the outputs, then the saved record's tensors (ctx.Saved's order; None as
# _custom.mark's marker: an op returns no optional tensor); the backward op takes them back as optional
# tensors, recomputes X2 from X (X itself when already in the compute dtype) and returns the gradients in
# _define's grad_names order. The MLP backward writes its gradients over the forward's gate/up buffer as in
# eager (and, as there, only when autograd frees the graph after this backward): that buffer is an output
# of the forward op read by nothing but this backward op.
_ACTIVATIONS = {
    "silu": (swiglu_fg, swiglu_fg_backward),
    "gelu": (geglu_exact_fg, geglu_exact_fg_backward),
    "gelu_tanh": (geglu_approx_fg, geglu_approx_fg_backward),
}
_OptionalTensor = Optional[torch.Tensor]
_LAYOUT_TYPES = get_type_hints(BaseLayout)
PROJECTION_ARGS = (
    ("A", _OptionalTensor),
    ("B", _OptionalTensor),
    ("bias", _OptionalTensor),
    ("mask", _OptionalTensor),
    ("base", list[_OptionalTensor]),
    ("scale", float),
    ("dropout", float),
    *((name, _LAYOUT_TYPES[name]) for name in BaseLayout._fields),
)


def op_arguments(prs) -> dict:
    """The custom ops' arguments of the projections prs, by name: <label>_<field> per PROJECTION_ARGS."""
    args = {}
    for pr in prs:
        base, layout = base_arguments(pr.weight, pr.quant)
        fields = dict(
            A=pr.A,
            B=pr.B,
            bias=pr.bias,
            mask=pr.mask,
            base=base,
            scale=pr.scale,
            dropout=pr.dropout,
            **layout._asdict(),
        )
        args.update((f"{pr.label}_{name}", fields[name]) for name, _ in PROJECTION_ARGS)
    return args


def _op_projections(group, args):
    """The Projections record `group` from the ops' arguments (op_arguments' inverse)."""

    def one(label):
        field = {name: args[f"{label}_{name}"] for name, _ in PROJECTION_ARGS}
        W, quant = base_from_arguments(field["base"], BaseLayout(**{f: field[f] for f in BaseLayout._fields}))
        return Projection(
            label, W, quant, field["A"], field["B"], field["scale"], field["bias"], field["dropout"], field["mask"]
        )

    return group._make(one(label) for label in group._fields)


def _op_function(name, params, impl):
    """impl(arguments by name) as a function with the signature `params` ((name, type) pairs; returning a
    tensor list), from which torch.library infers a schema that names every argument."""
    P = inspect.Parameter
    sig = inspect.Signature(
        [P(n, P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in params], return_annotation=list[torch.Tensor]
    )

    def fn(*args, **kwargs):
        return impl(sig.bind(*args, **kwargs).arguments)

    fn.__signature__, fn.__name__, fn.__qualname__ = sig, name, name
    return fn


def _tensors(args: dict) -> list:
    """Every tensor among the arguments, those in lists included."""
    return [t for v in args.values() for t in (v if isinstance(v, list) else (v,)) if isinstance(t, torch.Tensor)]


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


def _define(kind, group, n_out, plan, forward, backward, extras=()):
    """fusedlora::lora_<kind> and fusedlora::lora_<kind>_backward over plan / forward / backward, with autograd
    between them. group: the Projections record (its fields are the labels); extras: the kind's own
    (name, type) arguments (the MLP's activation and inplace), handed to its functions as (act, act_bwd,
    inplace)."""
    params = [
        ("X", torch.Tensor),
        *((f"{label}_{name}", t) for label in group._fields for name, t in PROJECTION_ARGS),
        ("dtype", torch.dtype),
        ("training", bool),
        *extras,
    ]
    arg_names = [name for name, _ in params]
    grad_names = ["X", *(f"{label}_{f}" for label in group._fields for f in ("A", "B", "bias"))]  # (q_A, down_B...)

    def kind_args(args):
        return (*_ACTIVATIONS[args["activation"]], args["inplace"]) if extras else ()

    def forward_op(args):
        X, ctx = args["X"], _OpCtx()
        outs = forward(ctx, X, _op_projections(group, args), args["dtype"], args["training"], *kind_args(args))
        return [*outs, *(_custom.mark(t, X) for t in _unaliased(list(ctx.saved), _tensors(args), outs))]

    def backward_op(args):
        X, ctx = args["X"], _OpCtx()
        plan(ctx, X, _op_projections(group, args), args["dtype"], args["training"], *kind_args(args))
        ctx.X2, ctx.saved = _flat(X).to(args["dtype"]), ctx.Saved(*args["saved"])
        named = backward(ctx, dict(zip(grad_names, args["needs"])), *args["grads"])
        return [_custom.mark(g, X) for g in _unaliased([named.get(n) for n in grad_names], _tensors(args))]

    fwd = _custom.define(f"lora_{kind}", _op_function(f"lora_{kind}", params, forward_op))
    bwd = _custom.define(
        f"lora_{kind}_backward",
        _op_function(
            f"lora_{kind}_backward",
            params + [("grads", list[_OptionalTensor]), ("saved", list[_OptionalTensor]), ("needs", list[bool])],
            backward_op,
        ),
    )

    def setup_context(ctx, inputs, output):
        leaves, ctx.spec = pytree.tree_flatten(dict(zip(arg_names, inputs)))
        ctx.is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        ctx.scalars = [None if t else leaf for leaf, t in zip(leaves, ctx.is_tensor)]
        ctx.save_for_backward(*(leaf for leaf, t in zip(leaves, ctx.is_tensor) if t), *output[n_out:])

    def autograd_backward(ctx, grads):
        refuse_double_backward(f"lora_{kind}")
        saved = iter(ctx.saved_tensors)
        args = pytree.tree_unflatten(
            [next(saved) if t else leaf for leaf, t in zip(ctx.scalars, ctx.is_tensor)], ctx.spec
        )
        needs = dict(zip(arg_names, ctx.needs_input_grad))
        got = bwd(
            **args,
            grads=list(grads[:n_out]),
            saved=[_custom.unmark(t) for t in saved],
            needs=[bool(needs[n]) for n in grad_names],
        )
        by_name = dict(zip(grad_names, map(_custom.unmark, got)))
        return tuple(by_name.get(n) for n in arg_names)

    fwd.register_autograd(autograd_backward, setup_context=setup_context)
    return fwd


LORA_O_OP = _define("o", OProjection, 1, _o_plan, _o_forward, _o_backward)
LORA_QKV_OP = _define("qkv", QKVProjections, 3, _qkv_plan, _qkv_forward, _qkv_backward)
LORA_MLP_OP = _define(
    "mlp", MLPProjections, 1, _mlp_plan, _mlp_forward, _mlp_backward, extras=(("activation", str), ("inplace", bool))
)


# ------------------------------------------------------------------------------ LoRA_*.apply's twins
def lora_o(X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False):
    """LoRA_O.apply through the custom op (same arguments, same result)."""
    return _call(LORA_O_OP, X, _o_projections(X, W, W_quant, A, B, S, bias, dropout), training)[0]


def lora_qkv(
    X,
    qW,
    qQ,
    qA,
    qB,
    qS,
    kW,
    kQ,
    kA,
    kB,
    kS,
    vW,
    vQ,
    vA,
    vB,
    vS,
    inplace=True,
    q_bias=None,
    k_bias=None,
    v_bias=None,
    dropouts=(0.0, 0.0, 0.0),
    training=False,
):
    """LoRA_QKV.apply through the custom op."""
    prs = _qkv_projections(
        X, (qW, qQ, qA, qB, qS), (kW, kQ, kA, kB, kS), (vW, vQ, vA, vB, vS), (q_bias, k_bias, v_bias), dropouts
    )
    return tuple(_call(LORA_QKV_OP, X, prs, training)[:3])


def lora_mlp(
    X,
    gW,
    gQ,
    gA,
    gB,
    gS,
    uW,
    uQ,
    uA,
    uB,
    uS,
    dW,
    dQ,
    dA,
    dB,
    dS,
    activation,
    inplace=True,
    dropouts=(0.0, 0.0, 0.0),
    training=False,
):
    """LoRA_MLP.apply through the custom op; `activation` names one of the fused GLU activations
    ("silu", "gelu", "gelu_tanh") instead of the two callables."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    prs = _mlp_projections(X, (gW, gQ, gA, gB, gS), (uW, uQ, uA, uB, uS), (dW, dQ, dA, dB, dS), dropouts)
    return _call(LORA_MLP_OP, X, prs, training, activation=activation, inplace=bool(inplace))[0]


def _call(op, X, prs, training, **kind_args):
    dtype = _compute_dtype(X)  # autocast's, decided here (at trace time)
    return op(
        X, **op_arguments(_with_masks(prs, X, dtype, training)), dtype=dtype, training=bool(training), **kind_args
    )


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
