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
from ._common import check_tensor

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
