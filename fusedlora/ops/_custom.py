"""torch.compile support: fusedlora's ops as torch.library custom ops, opaque to Dynamo and Inductor.

Eager calls keep their autograd.Function (no custom-op dispatch on the hot path); under torch.compile the
public ops call the custom ops defined beside each Function, which run the same launchers. Each op's fake
(meta) implementation is its real one: under FakeTensorMode the loader skips the kernel launch
(`fusedlora.loader.KernelLauncher`), so the outputs' shapes, dtypes and strides are the real call's by
construction. Custom ops take tensors, lists of tensors and plain scalars; an optional tensor output is
returned as `none_marker()` and read back with `unmark()`.
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


def none_marker(like: torch.Tensor) -> torch.Tensor:
    """Stands for None in a custom op's tensor outputs (a 3-d empty uint8 tensor: no real output has it)."""
    return like.new_empty((0, 0, 0), dtype=torch.uint8)


def is_none_marker(t) -> bool:
    return t.dtype == torch.uint8 and t.dim() == 3 and t.numel() == 0


def unmark(t):
    return None if t is None or is_none_marker(t) else t


def mark(t, like: torch.Tensor) -> torch.Tensor:
    return none_marker(like) if t is None else t
