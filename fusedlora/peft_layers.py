"""Reading PEFT LoRA layers for the fused LoRA functions: the active adapter's weights (read at every call,
FSDP2-safe), the base layer's kind (plain, bitsandbytes 4-bit, GPTQ in its own layout), and what the fused
path does not implement (DoRA and other LoRA variants, LoRA bias, several active adapters, 8-bit and unknown
quantisations, MLP biases), raised as UnsupportedLoRA so the caller keeps PEFT's path.

It reads modules only: the entry points that run a PEFT module through the fused functions (`apply_lora_*`)
are `fusedlora.lora`'s, which imports this module.
"""

from __future__ import annotations

import torch

from .ops._custom import compiling
from .quant import GPTQState, is_nf4


class UnsupportedLoRA(ValueError):
    """The adapter uses a feature fusedlora does not implement (DoRA, ...): keep PEFT's path."""


def _base_layer(proj):
    return getattr(proj, "base_layer", proj)


# gptqmodel QuantLinear kernels whose buffers keep the GPTQ layout that dequantize_gptq reads; the others
# (marlin, exllamav2, torch_fused, bitblas, machete...) repack or reorder qweight after loading.
GPTQ_PLAIN_LAYOUT_KERNELS = ("torch", "tritonv2")


def _check_gptq_layout(base):
    kind = getattr(base, "QUANT_TYPE", None)
    if kind not in GPTQ_PLAIN_LAYOUT_KERNELS:
        raise UnsupportedLoRA(
            f"{type(base).__name__} (QUANT_TYPE {kind!r}) may keep its weight in a repacked layout; fusedlora reads "
            f"GPTQ's own layout, as gptqmodel's {' / '.join(GPTQ_PLAIN_LAYOUT_KERNELS)} kernels keep it (load the model "
            f"with backend=BACKEND.TORCH or BACKEND.TRITON), or keep PEFT's path for this layer"
        )
    if base.qweight.dtype != torch.int32:
        raise UnsupportedLoRA(f"{type(base).__name__} packs into {base.qweight.dtype}; fusedlora reads int32 packing")


def get_lora_parameters(proj):
    """(W, quant_state, A, B, scale) of a PEFT LoRA layer's active adapter, read now (FSDP2-safe).

    A, B and scale are None when the adapter is disabled or merged, or the layer has no adapter.
    GPTQ base layers give (qweight, GPTQState, ...). DoRA and other variants raise UnsupportedLoRA."""
    base = _base_layer(proj)
    if hasattr(base, "qweight"):
        _check_gptq_layout(base)
        W = base.qweight
        g_idx = getattr(base, "g_idx", None)
        bits = int(getattr(base, "bits", 4))
        in_f = W.shape[0] * 32 // bits
        group = int(getattr(base, "group_size", -1) or -1)
        if g_idx is not None and bool(getattr(base, "desc_act", True)) is False:
            g_idx = None
        quant = GPTQState(
            base.qzeros,
            base.scales,
            g_idx,
            bits,
            group if group > 0 else in_f,
            "gptq_v2" if getattr(base, "qzero_format", lambda: 1)() == 2 else "gptq",
        )
    else:
        W = getattr(base, "weight", None)
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise UnsupportedLoRA(f"{type(base).__name__} has no 2-d weight: not a linear layer fusedlora can read")
        quant = getattr(W, "quant_state", None)
        packed = not W.is_floating_point() or W.shape[1] == 1  # (a 4-bit weight is stored [n, 1])
        if quant is None and packed and is_nf4(getattr(base, "quant_state", None)):
            # FSDP swaps the Params4bit for a plain tensor (its quant_storage dtype); bitsandbytes keeps the
            # state on the Linear4bit module for exactly this
            quant = base.quant_state
        if quant is None and not W.is_floating_point():
            raise UnsupportedLoRA(
                f"{type(base).__name__} keeps a {W.dtype} weight with no 4-bit quant state "
                "(bitsandbytes 8-bit or another quantisation): not fused, keep PEFT's path"
            )
        if quant is not None and not (is_nf4(quant) and hasattr(quant, "absmax")):
            raise UnsupportedLoRA(
                f"{type(base).__name__}'s quant_state ({type(quant).__name__}, "
                f"{getattr(quant, 'quant_type', None)!r}) is not a bitsandbytes 4-bit state"
            )
    active = getattr(proj, "active_adapters", None) or []
    if (
        not hasattr(proj, "lora_A")
        or getattr(proj, "disable_adapters", False)
        or getattr(proj, "merged", False)
        or not active
    ):
        return W, quant, None, None, None
    if len(active) > 1:
        raise UnsupportedLoRA(f"{len(active)} active adapters at once; fusedlora fuses a single adapter")
    name = active[0]
    if name not in proj.lora_A:
        return W, quant, None, None, None
    if getattr(proj, "use_dora", {}).get(name, False):
        raise UnsupportedLoRA("DoRA adapters are not fused; keep PEFT's path for this layer")
    if getattr(proj, "lora_bias", {}).get(name, False):
        raise UnsupportedLoRA("LoRA bias (lora_bias=True) is not fused; keep PEFT's path for this layer")
    variant = getattr(proj, "lora_variant", {}).get(name)
    if variant is not None:  # PEFT's hook for DoRA, QA-LoRA, aLoRA...: its forward is not plain LoRA
        raise UnsupportedLoRA(
            f"the {type(variant).__name__} LoRA variant is not fused; keep PEFT's path for this layer"
        )
    A = proj.lora_A[name].weight
    B = proj.lora_B[name].weight
    return W, quant, A, B, proj.scaling[name]


def fused_parameters(proj):
    """get_lora_parameters for the fused functions, which give no gradient to the base weight: a base weight
    that requires grad (full fine-tuning, or a model not yet wrapped by PEFT) raises UnsupportedLoRA."""
    params = get_lora_parameters(proj)
    if params[0].requires_grad and torch.is_grad_enabled():
        raise UnsupportedLoRA(
            f"{type(_base_layer(proj)).__name__}'s base weight requires grad (full fine-tuning, "
            "or PEFT not applied yet): the fused path trains only the adapter"
        )
    return params


def layer_bias(proj):
    """The base layer's bias (None without one)."""
    return getattr(_base_layer(proj), "bias", None)


def dropout_p(proj):
    """The active adapter's dropout probability (0.0 without nn.Dropout)."""
    active = getattr(proj, "active_adapters", None) or []
    drop = getattr(proj, "lora_dropout", {})
    if active and active[0] in drop and isinstance(drop[active[0]], torch.nn.Dropout):
        return float(drop[active[0]].p)
    return 0.0


def use_custom_ops() -> bool:
    """Whether the fused LoRA entry points (fusedlora.lora's apply_lora_*) call their torch.library custom ops:
    while torch.compile traces."""
    return compiling()


def lora_layers(module) -> list:
    """The PEFT LoRA layers inside `module` (itself included)."""
    return [m for m in module.modules() if "lora_A" in m._modules]


def adapter_state(lora_layer) -> tuple:
    """What a PEFT LoRA layer's forward does that its tensors do not show: the active adapters, whether adapters
    are disabled or merged, the scalings and the dropout probabilities (a CUDA graph bakes these in)."""
    m = lora_layer
    return (
        tuple(getattr(m, "active_adapters", ()) or ()),
        bool(getattr(m, "disable_adapters", False)),
        bool(getattr(m, "merged", False)),
        tuple(sorted(getattr(m, "scaling", {}).items())),
        tuple((k, getattr(d, "p", 0.0)) for k, d in m._modules["lora_dropout"].items())
        if "lora_dropout" in m._modules
        else (),
    )
