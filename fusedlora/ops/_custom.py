"""torch.compile support: fusedlora's ops as torch.library custom ops, opaque to Dynamo and Inductor.

Eager calls keep their autograd.Function (no custom-op dispatch on the hot path); under torch.compile the
public ops call the custom ops defined beside each Function, which run the same launchers. Each op's fake
(meta) implementation is its real one: under FakeTensorMode the loader skips the kernel launch
(`fusedlora.loader.KernelLauncher`), so the outputs' shapes, dtypes and strides are the real call's by
construction. Custom ops take tensors, lists of tensors and plain scalars; an optional tensor output is
returned as `mark(t)` (a `marker` for None) and read back with `unmark()`.
"""
from __future__ import annotations

import torch

NAMESPACE = "fusedlora"


def compiling() -> bool:
    """True while Dynamo traces (torch.compile): the public ops then call their custom ops."""
    return torch.compiler.is_compiling()


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
