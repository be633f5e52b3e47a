"""torch.compile support: fusedlora's ops as torch.library custom ops, opaque to Dynamo and Inductor.

Each op is written once, as functions of tensors and plain scalars: `AutogradOp` makes one differentiable op
of (forward, setup_context, backward), and `Launcher` one kernel launcher a backward calls. Each is a custom
op for torch.compile and, called eagerly, the same functions without the custom-op dispatch (an
autograd.Function of the same three; the launcher itself): one implementation on both paths. Each op's fake
(meta) implementation is its real one: under FakeTensorMode the loader skips the kernel launch
(`fusedlora.loader.KernelLauncher`), so the outputs' shapes, dtypes and strides are the real call's by
construction. Custom ops take tensors, lists of tensors and plain scalars; an optional tensor output is
returned as `mark(t)` (a `marker` for None) and read back with `unmark()`.
"""

from __future__ import annotations

import functools

import torch

NAMESPACE = "fusedlora"


_FAKE_MODE_KEY = torch._C._TorchDispatchModeKey.FAKE


def compiling() -> bool:
    """True while torch.compile traces: the public ops and launchers then call their custom ops. Dynamo's tracing
    shows in is_compiling(); AOTAutograd's tracing of a forward or backward as an active FakeTensorMode, since
    torch 2.11 holds is_compiling() only inside Dynamo (2.13 for the whole compile session) and a kernel
    launched on its functional / fake tensors would fail or be traced away."""
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(_FAKE_MODE_KEY) is not None


def define(name: str, fn, *, mutates_args=(), fake=None):
    """`fn` as the custom op fusedlora::name (schema from its annotations), its fake being `fake` or fn."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
    op.register_fake(fake or fn)
    return op


def marker(like: torch.Tensor, code: int = 0) -> torch.Tensor:
    """A stand-in among a custom op's tensor outputs: a [0, 0, code] uint8 tensor (no real output has that
    shape). Code 0 stands for None; callers give other codes their own meaning (fusedlora.lora_ops)."""
    return like.new_empty((0, 0, code), dtype=torch.uint8)


def marker_code(t) -> int | None:
    """The code of a marker, or None for a real tensor."""
    if t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == 0 and t.shape[1] == 0:
        return t.shape[2]
    return None


def mark(t, like: torch.Tensor) -> torch.Tensor:
    """t, or the None marker when t is None."""
    return marker(like) if t is None else t


def unmark(t):
    return None if t is None or marker_code(t) == 0 else t


def _none_marked(fn):
    """fn with each None in its tuple result replaced by the none marker: a custom op returns tensors only. Its
    signature (the op's schema) is fn's."""

    @functools.wraps(fn)
    def body(*args):
        out = fn(*args)
        if isinstance(out, tuple) and any(o is None for o in out):
            like = next(a for a in args if isinstance(a, torch.Tensor))
            return tuple(marker(like) if o is None else o for o in out)
        return out

    return body


def _unmarked(out):
    return tuple(unmark(o) for o in out) if isinstance(out, tuple) else out


class Launcher:
    """`fn` (annotated: its schema) as the custom op fusedlora::name, called as the op while torch.compile traces
    (Dynamo, and AOTAutograd tracing a backward: traced through instead, the launch would be skipped under
    FakeTensorMode) and as fn itself otherwise (no custom-op dispatch on the eager hot path). fn (and `fake`)
    may give None among a tuple's tensors: the caller gets None on both paths."""

    def __init__(self, name: str, fn, *, mutates_args=(), fake=None):
        self.fn = fn
        self.op = define(name, _none_marked(fn), mutates_args=mutates_args, fake=_none_marked(fake or fn))

    def __call__(self, *args):
        return _unmarked(self.op(*args)) if compiling() else self.fn(*args)


class AutogradOp(Launcher):
    """A differentiable op written once: `forward(*args)` computes (no autograd of its own),
    `setup_context(ctx, args, output)` saves what `backward(ctx, *grads)` reads, and the backward launches its
    kernels through Launchers. Under torch.compile the custom op fusedlora::name with these three as its
    autograd; eagerly an autograd.Function of the same three. On both paths setup_context sees None for an
    output the forward gave as None (the caller may get a none marker there), and gradients of unused outputs
    come as None (not materialised as zeros)."""

    def __init__(self, name: str, forward, setup_context, backward, *, fake=None):
        super().__init__(name, forward, fake=fake)

        def eager_forward(ctx, *args):
            output = forward(*args)
            ctx.set_materialize_grads(False)
            setup_context(ctx, args, output)
            return output

        def op_setup(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            setup_context(ctx, inputs, _unmarked(output))

        self.op.register_autograd(backward, setup_context=op_setup)
        self.function = type(
            f"{name}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        return self.op(*args) if compiling() else self.function.apply(*args)
