"""SwiGLU and GeGLU: `act(gate) * up` (kernels: csrc_triton/glu/kernel.py).

The kernels compute in fp32 and round once; HF's eager MLP rounds `act(gate)` to the input dtype
before the multiply, so fp16/bf16 results may differ from it by one rounding step.
`inplace=True` lets the backward write d(gate) and d(up) into the saved gate/up buffers (saves two
activation-sized allocations); only use it when nothing else reads gate/up after the forward. A backward
through a graph that autograd keeps (retain_graph=True) writes new buffers instead, so a second backward
reads the saved activations intact (`_common.saved_tensors_writable`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csrc_triton.glu import GLU_BWD, GLU_FWD

from ..loader import launch
from . import _custom
from ._common import cdiv, check_tensor, grads_of, rel_err, saved_tensors_writable

_APPROX = {"none": "gelu", "tanh": "gelu_tanh"}


def naive_swiglu(gate, up):
    return F.silu(gate) * up


def naive_geglu(gate, up, approximate="none"):
    return F.gelu(gate, approximate=approximate) * up


def refuse_double_backward(fn: str):
    """In a Function's backward: raise, naming `fn`, when autograd asks for a differentiable gradient
    (create_graph=True; grad mode is on in a backward only then). The kernels' gradients carry no graph, so a
    double backward (a gradient penalty) would silently miss their terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{fn}: its gradients come from kernels and cannot be differentiated again (a backward "
            "with create_graph=True, e.g. a gradient penalty); keep this part of the model on plain "
            "PyTorch (PEFT's layers, unpatched) for a double backward"
        )


def glu_forward(gate, up, act: str):
    """act(gate) * up as a new contiguous tensor. gate and up are read in place when contiguous, or when
    2-D column blocks of a wider buffer with one row stride and a unit last stride (e.g. the halves of one
    [T, 2I] GEMM output); other layouts are copied first."""
    if gate.shape != up.shape:
        raise ValueError(f"glu_forward: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.dim() == 2 and gate.stride(1) == 1 and up.stride() == gate.stride() and not gate.is_contiguous():
        (rows, n_cols), stride = gate.shape, gate.stride(0)
    else:
        gate, up = gate.contiguous(), up.contiguous()
        rows, n_cols, stride = 1, gate.numel(), gate.numel()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = GLU_FWD.constexprs(act=act)["BLOCK"]
    launch(GLU_FWD, (rows * cdiv(n_cols, block), 1, 1), (gate, up, out, n_cols, stride), act=act)
    return out


def glu_backward(dout, gate, up, act: str, inplace: bool, store_h: bool = False):
    """(d gate, d up), plus h = act(gate) * up written over `dout` when store_h (then returns 3 tensors)."""
    dgate = gate if inplace else torch.empty_like(gate)
    dup = up if inplace else torch.empty_like(up)
    n = gate.numel()
    shape = dict(act=act, store_h=bool(store_h))
    block = GLU_BWD.constexprs(**shape)["BLOCK"]
    launch(GLU_BWD, (cdiv(n, block), 1, 1), (dout, gate, up, dgate, dup, dout, n), **shape)
    return (dgate, dup, dout) if store_h else (dgate, dup)


# One op for eager and torch.compile (fusedlora.ops._custom). inplace: the backward writes over the saved gate
# and up only where saved_tensors_writable (never under torch.compile, whose graph owns its saved buffers).
def _forward(gate: torch.Tensor, up: torch.Tensor, act: str, inplace: bool) -> torch.Tensor:
    return glu_forward(gate, up, act)


def _setup(ctx, inputs, output):
    gate, up, ctx.act, ctx.inplace = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, dout):
    refuse_double_backward("swiglu / geglu")
    gate, up = ctx.saved_tensors
    dgate, dup = GLU_BACKWARD_OP(dout.contiguous(), gate, up, ctx.act, ctx.inplace and saved_tensors_writable())
    return dgate, dup, None, None


def _backward_launch(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return glu_backward(dout, gate, up, act, inplace)


GLU_OP = _custom.AutogradOp("glu", _forward, _setup, _backward)
GLU_BACKWARD_OP = _custom.Launcher("glu_backward", _backward_launch)


def _glu(op, gate, up, act, inplace):
    check_tensor(op, "gate", gate)
    check_tensor(op, "up", up, like=gate, like_name="gate")
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate is {gate.dtype} but up is {up.dtype}; they must match")
    gate, up = gate.contiguous(), up.contiguous()
    return GLU_OP(gate, up, act, bool(inplace))


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(gate) * up, differentiable in both."""
    return _glu("swiglu", gate, up, "silu", inplace)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    """gelu(gate, approximate) * up, differentiable in both; approximate is "none" (erf) or "tanh"."""
    if approximate not in _APPROX:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu("geglu", gate, up, _APPROX[approximate], inplace)


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    shape = (257, 14336) if device == "cuda" else (17, 1000)
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    fwd = bwd = 0.0
    for op, ref in ((swiglu, naive_swiglu), (lambda g, u: geglu(g, u, "tanh"), lambda g, u: naive_geglu(g, u, "tanh"))):
        g = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
        u = torch.randn(shape, device=device).to(dtype).requires_grad_()
        dy = torch.randn(shape, device=device).to(dtype)
        y = op(g, u)
        dg, du = grads_of(y, dy, (g, u))
        g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
        y64 = ref(g64, u64)
        dg64, du64 = grads_of(y64, dy.double(), (g64, u64))
        fwd = max(fwd, rel_err(y, y64))
        bwd = max(bwd, rel_err(dg, dg64), rel_err(du, du64))
    # the forward on the LoRA MLP's layout: gate | up as the halves of one wider buffer
    buf = (2 * torch.randn(shape[0], 2 * shape[1] + 64, device=device)).to(dtype)
    g, u = buf[:, : shape[1]], buf[:, shape[1] : 2 * shape[1]]
    fwd = max(fwd, rel_err(glu_forward(g, u, "silu"), naive_swiglu(g.double(), u.double())))
    return {"glu_fwd": (fwd, tol), "glu_bwd": (bwd, tol)}
