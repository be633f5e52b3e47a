"""The kernel registry: the table of every kernel fusedlora has, collected from the registry entries of
`csrc_triton` (imported on first use), for the JIT path and the AOT build alike.

The types it holds (`KernelSpec`, `Variant`, `register`, the supported archs) are `fusedlora.kernel_spec`'s, which
the entries import; their names stay reachable here. Like kernel_spec, this module never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable

from .kernel_spec import (  # noqa: F401
    COMPATIBLE_ARCHS,
    DTYPES,
    REGISTERED,
    SIGNATURE_TYPES,
    SUPPORTED_ARCHS,
    KernelSpec,
    Variant,
    compatible_archs,
    next_pow2,
    parse_archs,
    register,
)

# Every kernel family's module: its @triton.jit sources and, beside them, their KernelSpecs.
KERNEL_MODULES = (
    "csrc_triton.rms_norm",
    "csrc_triton.glu",
    "csrc_triton.glu_lora",
    "csrc_triton.cross_entropy",
    "csrc_triton.rope",
    "csrc_triton.quant",
    "csrc_triton.moe_lora",
)


def get(name: str) -> KernelSpec:
    spec = REGISTERED.get(name)  # (every launch asks: importing the kernel modules only on a miss)
    if spec is not None:
        return spec
    _ensure_loaded()
    try:
        return REGISTERED[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; registered: {sorted(REGISTERED)}") from None


def all_kernels() -> dict[str, KernelSpec]:
    _ensure_loaded()
    return dict(REGISTERED)


def _ensure_loaded():
    for module in KERNEL_MODULES:
        importlib.import_module(module)


def make_variant(
    spec: KernelSpec, arch: int, dtypes: dict[str, str], shape: dict[str, Any], int_spec: dict[str, str] | None = None
) -> Variant:
    """The variant that the launcher will ask for on `arch` for these dtypes and this shape."""
    constexprs = spec.meta(**shape)
    num_warps, num_stages = spec.config(arch, constexprs)
    return Variant(
        spec.name, arch, spec.signature(dtypes, int_spec), tuple(sorted(constexprs.items())), num_warps, num_stages
    )


def family_variants(
    family: dict[str, Any], archs: Iterable[int], kernels: Iterable[str] | None = None
) -> list[Variant]:
    """Every variant that the registered kernels want prebuilt for a shape family, deduplicated."""
    specs = all_kernels()
    names = list(kernels) if kernels is not None else sorted(specs)
    out: dict[tuple, Variant] = {}
    for name in names:
        spec = specs[name]
        for item in spec.aot_variants(family):
            dtypes, shape = item[0], item[1]
            int_spec = item[2] if len(item) > 2 else None  # e.g. an int that is 1 in this use
            for arch in archs:
                v = make_variant(spec, arch, dtypes, shape, int_spec)
                out.setdefault((v.arch,) + v.key, v)
    return list(out.values())
