"""fusedlora: fused Triton kernels for LoRA / QLoRA fine-tuning, prebuilt ahead of time.

`import fusedlora` is light and works with no GPU: submodules load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops",
    "quant",
    "lora",
    "peft_layers",
    "hf",
    "cuda_graphs",
    "manifest",
    "loader",
    "registry",
    "aot",
    "build",
    "info",
    "selfcheck",
    "bench",
    "demo",
)


def patch(model, *, options=None, **option_values):
    """Patch a HF / PEFT decoder model onto fusedlora's kernels (options: keyword arguments, or
    `options=fusedlora.PatchOptions(...)`); see `fusedlora.hf.patch`."""
    from .hf import patch as _patch

    return _patch(model, options=options, **option_values)


def unpatch(model) -> int:
    """Restore every forward `fusedlora.patch` replaced; see `fusedlora.hf.unpatch`."""
    from .hf import unpatch as _unpatch

    return _unpatch(model)


def compile_layers(model, **compile_kwargs) -> int:
    """torch.compile each decoder layer in place (one compiled graph for all); see `fusedlora.hf.compile_layers`."""
    from .hf import compile_layers as _compile_layers

    return _compile_layers(model, **compile_kwargs)


def cuda_graph_layers(model, **options) -> int:
    """Replay each decoder layer's training forward and backward as CUDA graphs; see `fusedlora.hf.cuda_graph_layers`."""
    from .hf import cuda_graph_layers as _cuda_graph_layers

    return _cuda_graph_layers(model, **options)


def quantize_experts(model, **options):
    """Store a PEFT MoE model's routed-expert weights in bitsandbytes NF4; see `fusedlora.hf.experts.quantize_experts`."""
    from .hf.experts import quantize_experts as _quantize_experts

    return _quantize_experts(model, **options)


def __getattr__(name):
    if name == "PatchOptions":  # (loaded on first use, as the submodules: it lives in fusedlora.hf)
        from .hf.options import PatchOptions

        return PatchOptions
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fusedlora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + ["PatchOptions"])
