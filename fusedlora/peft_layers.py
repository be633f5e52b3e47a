"""Reading PEFT LoRA layers for the fused LoRA functions: the active adapter's weights (read at every call,
FSDP2-safe), the base layer's kind (plain, bitsandbytes 4-bit, GPTQ in its own layout), and what the fused
path does not implement (DoRA and other LoRA variants, LoRA bias, several active adapters, 8-bit and unknown
quantisations, MLP biases), raised as UnsupportedLoRA so the caller keeps PEFT's path.

`apply_lora_qkv(attn, X)`, `apply_lora_o(attn, X)`, `apply_lora_mlp_swiglu / _geglu(mlp, X)` take the HF
attention / MLP module whose projections are PEFT LoRA layers.
"""
from __future__ import annotations

import torch

from .lora import (LoRA_MLP, LoRA_O, LoRA_QKV, geglu_approx_fg, geglu_approx_fg_backward, geglu_exact_fg,
                   geglu_exact_fg_backward, swiglu_fg, swiglu_fg_backward)
from .lora_ops import lora_mlp, lora_o, lora_qkv
from .ops._custom import compiling
from .quant import GPTQState, is_nf4, weight_shape  # noqa: F401 (weight_shape: for fusedlora.hf)


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
            f"with backend=BACKEND.TORCH or BACKEND.TRITON), or keep PEFT's path for this layer")
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
        quant = GPTQState(base.qzeros, base.scales, g_idx, bits, group if group > 0 else in_f,
                          "gptq_v2" if getattr(base, "qzero_format", lambda: 1)() == 2 else "gptq")
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
            raise UnsupportedLoRA(f"{type(base).__name__} keeps a {W.dtype} weight with no 4-bit quant state "
                                  "(bitsandbytes 8-bit or another quantisation): not fused, keep PEFT's path")
        if quant is not None and not (is_nf4(quant) and hasattr(quant, "absmax")):
            raise UnsupportedLoRA(f"{type(base).__name__}'s quant_state ({type(quant).__name__}, "
                                  f"{getattr(quant, 'quant_type', None)!r}) is not a bitsandbytes 4-bit state")
    active = getattr(proj, "active_adapters", None) or []
    if (not hasattr(proj, "lora_A") or getattr(proj, "disable_adapters", False) or getattr(proj, "merged", False)
            or not active):
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
        raise UnsupportedLoRA(f"the {type(variant).__name__} LoRA variant is not fused; keep PEFT's path for this layer")
    A = proj.lora_A[name].weight
    B = proj.lora_B[name].weight
    return W, quant, A, B, proj.scaling[name]


def fused_parameters(proj):
    """get_lora_parameters for the fused functions, which give no gradient to the base weight: a base weight
    that requires grad (full fine-tuning, or a model not yet wrapped by PEFT) raises UnsupportedLoRA."""
    params = get_lora_parameters(proj)
    if params[0].requires_grad and torch.is_grad_enabled():
        raise UnsupportedLoRA(f"{type(_base_layer(proj)).__name__}'s base weight requires grad (full fine-tuning, "
                              "or PEFT not applied yet): the fused path trains only the adapter")
    return params


def _bias(proj):
    return getattr(_base_layer(proj), "bias", None)


def _dropout_p(proj):
    active = getattr(proj, "active_adapters", None) or []
    drop = getattr(proj, "lora_dropout", {})
    if active and active[0] in drop and isinstance(drop[active[0]], torch.nn.Dropout):
        return float(drop[active[0]].p)
    return 0.0


def apply_lora_linear(proj, X, training):
    """One PEFT LoRA projection (base + dropout(X) A^T B^T s + bias) through the fused single-projection
    function."""
    W, Q, A, B, S = fused_parameters(proj)
    fn = lora_o if compiling() else LoRA_O.apply  # torch.compile: the custom op (fusedlora.lora_ops)
    return fn(X, W, Q, A, B, S, _bias(proj), _dropout_p(proj), training)


def apply_lora_o(self, X):
    """`self` is the attention module (its o_proj a PEFT LoRA layer)."""
    return apply_lora_linear(self.o_proj, X, self.training)


def apply_lora_qkv(self, X, inplace=True):
    projs = (self.q_proj, self.k_proj, self.v_proj)
    args = [t for p in projs for t in fused_parameters(p)]
    fn = lora_qkv if compiling() else LoRA_QKV.apply
    return fn(X, *args, inplace, *(_bias(p) for p in projs), tuple(_dropout_p(p) for p in projs),
                          self.training)


def _apply_mlp(self, X, act, act_bwd, inplace):
    projs = (self.gate_proj, self.up_proj, self.down_proj)
    for p in projs:
        if _bias(p) is not None:
            raise UnsupportedLoRA("MLP projections with a bias are not fused; keep PEFT's path")
    args = [t for p in projs for t in fused_parameters(p)]
    dropouts = tuple(_dropout_p(p) for p in projs)
    if compiling():
        return lora_mlp(X, *args, act.glu_act, inplace, dropouts, self.training)
    return LoRA_MLP.apply(X, *args, act, act_bwd, inplace, dropouts, self.training)


def apply_lora_fused_gate_up_mlp(self, X, glu):
    """An MLP with one gate_up_proj (gate | up halves, Phi-3) and a down_proj: the two projections through the
    fused single-projection function and glu(gate, up) (fusedlora.ops.swiglu / geglu) between them."""
    for p in (self.gate_up_proj, self.down_proj):
        if _bias(p) is not None:
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
