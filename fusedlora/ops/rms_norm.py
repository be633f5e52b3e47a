"""RMSNorm with gradients for x and weight (kernels: csrc_triton/rms_norm/kernel.py).

`casting="llama"` follows HF LlamaRMSNorm (normalise in fp32, cast to x's dtype, multiply by the
weight; output dtype is the promotion of x and weight); `casting="gemma"` follows GemmaRMSNorm
(everything in fp32, output in x's dtype); `casting="none"` computes in x's dtype as plain torch ops on x
do (Liger-Kernel's "none"): each step in fp32, rounded once to x's dtype (the weight + offset to the
weight's); output dtype as Llama's. `offset=1.0` gives Gemma's `(1 + weight)`.
`weight=None`: a norm without a weight, y = x * rstd in x's dtype (Llama and Gemma casting then agree).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from csrc_triton.rms_norm import CAST_FLAGS, RMS_BWD_PROGRAMS_PER_SM, RMS_NORM_BWD, RMS_NORM_FWD

from ..loader import launch
from . import _custom
from ._common import cdiv, check_tensor, persistent_programs, rel_err, rows_2d

CASTINGS = tuple(CAST_FLAGS)  # ("llama", "gemma", "none")


def naive_rms_norm(x, weight, eps=1e-6, offset=0.0, casting="llama"):
    """Plain-torch reference with HF's casting semantics (casting="none": every op on x's dtype)."""
    if casting == "none":
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        xf = x.float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if casting == "gemma" and weight is not None:
            return (xhat * (offset + weight.float())).to(x.dtype)
        xhat = xhat.to(x.dtype)
    if weight is None:
        return xhat
    w = weight + offset if offset else weight
    return w * xhat


def rms_norm_forward(x2d, weight, eps: float, offset: float, gemma: bool, none_cast: bool = False):
    """Launch the forward kernel (weight None: a norm without one). Returns (y [M, N], rstd [M] fp32, computed
    in fp32 in every casting: the backward's)."""
    n_rows, n_cols = x2d.shape
    has_weight = weight is not None
    out_dtype = x2d.dtype if gemma or not has_weight else torch.promote_types(x2d.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x2d.device)
    shape = dict(n_cols=n_cols, gemma_cast=gemma, none_cast=none_cast, has_weight=has_weight)
    block_m = RMS_NORM_FWD.constexprs(**shape)["BLOCK_M"]
    grid = ((n_rows + block_m - 1) // block_m, 1, 1)
    launch(
        RMS_NORM_FWD,
        grid,
        (
            x2d,
            weight if has_weight else x2d,
            y,
            rstd,
            x2d.stride(0),
            y.stride(0),
            n_rows,
            n_cols,
            float(eps),
            float(offset),
        ),
        **shape,
    )
    return y, rstd


def rms_norm_backward(dy2d, x2d, weight, rstd, offset: float, gemma: bool, need_dw: bool = True):
    """Launch the backward kernel. Returns (dx [M, N] in x's dtype, dw in weight's dtype, or None when not
    needed or there is no weight). The None casting's backward is Llama's (gemma False)."""
    n_rows, n_cols = x2d.shape
    has_weight = weight is not None
    dx = torch.empty_like(x2d)
    shape = dict(n_cols=n_cols, gemma_cast=gemma, has_weight=has_weight)
    block_m = RMS_NORM_BWD.constexprs(**shape)["BLOCK_M"]  # (checks the row width even when there are no rows)
    n_progs = persistent_programs(cdiv(n_rows, block_m), RMS_BWD_PROGRAMS_PER_SM, x2d.get_device())
    # without a weight the kernel writes no dw: rstd (fp32, as the argument's type) stands in for the buffer
    dw_partial = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2d.device) if has_weight else rstd
    if n_rows:
        launch(
            RMS_NORM_BWD,
            (n_progs, 1, 1),
            (
                dy2d,
                x2d,
                weight if has_weight else x2d,
                rstd,
                dx,
                dw_partial,
                dy2d.stride(0),
                x2d.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                float(offset),
            ),
            **shape,
        )
    elif has_weight:
        dw_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw and has_weight else None
    return dx, dw


class NormSource(NamedTuple):
    """What a recomputable rms_norm output was made from. (Autograd refuses any in-place change of a custom
    Function's output view once it is used, so the output still holds what recompute() gives.)"""

    x2d: torch.Tensor
    weight: torch.Tensor | None
    eps: float
    offset: float
    casting: str

    def recompute(self, x2d: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The output again as [rows, n] from the saved x2d and weight (the same launch, the same bits)."""
        return rms_norm_forward(x2d, weight, self.eps, self.offset, *CAST_FLAGS[self.casting])[0]


# The hand-off of a recomputable output to the fused LoRA functions (LoRA_QKV, LoRA_MLP) that take it as their
# input: they save the norm's input and weight (which the norm's own backward keeps anyway) instead of the
# output and recompute it in their backward (one norm forward, bit-identical): one activation fewer per norm.
# Keyed weakly by the output's identity: an entry goes with its tensor, and no attribute is hung on it.
RECOMPUTABLE_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def norm_source(t: torch.Tensor) -> NormSource | None:
    """The NormSource of a recomputable rms_norm output (RECOMPUTABLE_OUTPUTS), else None."""
    return RECOMPUTABLE_OUTPUTS.get(t)


# One op for eager and torch.compile (fusedlora.ops._custom): x2d in, its output in x's shape out (a view made
# inside the op: autograd refuses an in-place change of it, which a recomputable output relies on).
def _forward(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: str, out_shape: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = rms_norm_forward(x2d, weight, eps, offset, *CAST_FLAGS[casting])
    return y.view(out_shape), rstd


def _setup(ctx, inputs, output):
    x2d, weight, _, ctx.offset, casting, _ = inputs
    ctx.gemma = CAST_FLAGS[casting][0]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x2d, weight, output[1])


def _backward(ctx, dy, _drstd):
    x2d, weight, rstd = ctx.saved_tensors
    dx, dw = RMS_NORM_BACKWARD_OP(
        rows_2d(dy, x2d.shape[1]), x2d, weight, rstd, ctx.offset, ctx.gemma, ctx.needs_input_grad[1]
    )
    return dx, dw, None, None, None, None


def _backward_launch(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    gemma: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy2d, x2d, weight, rstd, offset, gemma, need_dw)


RMS_NORM_OP = _custom.AutogradOp("rms_norm", _forward, _setup, _backward)
RMS_NORM_BACKWARD_OP = _custom.Launcher("rms_norm_backward", _backward_launch)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting: str = "llama",
    *,
    recomputable: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading dims), differentiable in x and weight.

    weight None: no weight (y = x * rstd, in x's dtype). casting: "llama", "gemma" or "none" (module doc).
    recomputable: mark the output so that fusedlora's LoRA functions (LoRA_QKV, LoRA_MLP) taking it as their
    input keep the norm's input instead of it for their backward and recompute it there (one [rows, n]
    activation less per norm, one norm forward more in the backward; eager mode only)."""
    op = "rms_norm"
    check_tensor(op, "x", x)
    if casting not in CASTINGS:
        raise ValueError(f"{op}: casting must be one of {CASTINGS}, got {casting!r}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x is a scalar; expected at least one dimension (the one normalised)")
    if weight is None:
        if offset:
            raise ValueError(
                f"{op}: offset={offset} is added to the weight, but weight is None; pass a weight "
                "(Gemma's 1 + weight: offset=1.0 with the weight) or offset=0.0"
            )
    else:
        check_tensor(op, "weight", weight, like=x, like_name="x")
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{op}: weight has shape {tuple(weight.shape)} but x's last dimension is "
                f"{x.shape[-1]}; expected weight of shape ({x.shape[-1]},) or None"
            )
        if weight.stride(0) != 1:
            weight = weight.contiguous()
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}: its last dimension (the one normalised) is empty")
    x2d = rows_2d(x, x.shape[-1])
    out, _ = RMS_NORM_OP(x2d, weight, float(eps), float(offset), casting, list(x.shape))
    if recomputable and not _custom.compiling():
        RECOMPUTABLE_OUTPUTS[out] = NormSource(x2d, weight, float(eps), float(offset), casting)
    return out


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    """(rows, kernel -> (error, tolerance)) for RMSNorm forward and backward: the worst over the castings,
    with and without a weight."""
    rows, n = (257, 4096) if device == "cuda" else (33, 2048)
    x = torch.randn(rows, n, device=device, dtype=dtype)
    w = 1 + 0.1 * torch.randn(n, device=device, dtype=dtype)
    dy = torch.randn(rows, n, device=device, dtype=dtype)
    err_fwd = err_bwd = 0.0
    for casting, weight, offset in (("llama", w, 0.0), ("gemma", w, 1.0), ("none", w, 0.0), ("none", None, 0.0)):
        leaves = (x.clone().requires_grad_(),) + (() if weight is None else (weight.clone().requires_grad_(),))
        leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
        y = rms_norm(leaves[0], leaves[1] if len(leaves) > 1 else None, 1e-6, offset, casting)
        y64 = naive_rms_norm(leaves64[0], leaves64[1] if len(leaves) > 1 else None, 1e-6, offset, casting)
        grads = torch.autograd.grad(y, leaves, dy)
        grads64 = torch.autograd.grad(y64, leaves64, dy.double())
        err_fwd = max(err_fwd, rel_err(y, y64))
        err_bwd = max([err_bwd] + [rel_err(g, g64) for g, g64 in zip(grads, grads64)])
    # bf16 output rounding (2^-8 relative) bounds the forward ("none": a few roundings, each 2^-9 on average);
    # the gradients sum bf16 products.
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    return {"rms_norm_fwd": (err_fwd, tol), "rms_norm_bwd": (err_bwd, tol)}
