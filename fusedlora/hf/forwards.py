"""The forwards `fusedlora.patch` binds to module instances (one generic forward per module kind).

Each reads its module's weights at the call (FSDP2 swaps them) and goes back to the class's own forward
whenever the fused path cannot serve the call, which `Fallbacks` counts and warns about once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable

import torch

from .. import lora
from ..ops import fused_linear_cross_entropy, geglu, naive_rope, rms_norm, rope, swiglu
from ..ops._common import FLOAT_DTYPES, autocast_dtype, interpreting
from ..ops._custom import compiling
from .families import Family
from .options import MLP_CHUNK_BYTES, PatchOptions
from .report import Fallbacks

PATCH_ATTR = "_fusedlora_patch"
SERVED_DTYPES = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)


# ------------------------------------------------------------- what patching found, per module kind
@dataclasses.dataclass(frozen=True)
class NormFacts:
    eps: float
    casting: str  # the reference the class's forward matches: "llama" or "gemma" casting
    offset: float  # weight offset (Gemma's 1 + weight)
    recomputable: bool = False  # patch's recompute_norms

    def configured(self, options: PatchOptions) -> NormFacts:
        return dataclasses.replace(self, recomputable=options.recompute_norms)


@dataclasses.dataclass(frozen=True)
class VarlenAttention:
    """torch's varlen_attn (None before torch 2.10) and whether it takes enable_gqa: looked up when patching,
    so that the forwards (and Dynamo tracing them) read plain values."""

    attn: Callable | None
    takes_gqa: bool


@dataclasses.dataclass(frozen=True)
class AttentionFacts:
    eager: Callable  # the module's eager_attention_forward (HF's attention interface falls back on it)
    varlen: VarlenAttention
    qkv: bool = True  # patch's qkv, o and rope: which parts are fused
    o: bool = True
    rope: bool = True

    def configured(self, options: PatchOptions) -> AttentionFacts:
        return dataclasses.replace(self, qkv=options.qkv, o=options.o, rope=options.rope)


@dataclasses.dataclass(frozen=True)
class MLPFacts:
    activation: str  # a key of MLP_APPLY
    intermediate: int  # the gate (and up) projection's width
    fused_gate_up: bool = False  # one gate_up_proj (Phi-3)
    chunk_bytes: int = MLP_CHUNK_BYTES  # patch's mlp_chunk_bytes

    def configured(self, options: PatchOptions) -> MLPFacts:
        return dataclasses.replace(self, chunk_bytes=options.mlp_chunk_bytes)


@dataclasses.dataclass(frozen=True)
class LossFacts:
    """What causal_lm_forward reads about the model class, looked up when patching."""

    signature: inspect.Signature  # of the class's forward
    var_kw: str | None  # its **kwargs parameter
    output_class: type  # what the class's forward returns (CausalLMOutputWithPast, MoeCausalLMOutputWithPast)
    output_fields: frozenset  # the decoder output fields it passes on
    varlen_available: bool  # torch has varlen attention (packed rows then take it)
    # an MoE family's own load_balancing_loss_func (from the class's module), which adds the router's aux loss
    load_balancing: Callable | None = None

    def configured(self, options: PatchOptions) -> LossFacts:
        return self


KindFacts = NormFacts | AttentionFacts | MLPFacts | LossFacts


@dataclasses.dataclass
class PatchRecord:
    """What a patched module needs at call time: its kind, family row, run-time fallbacks and what patching found
    (with the options that concern it)."""

    kind: str
    family: Family
    fallbacks: Fallbacks
    facts: KindFacts


def tensor_problem(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (their device or dtype), or None: such a call runs HF's forward."""
    for t in tensors:
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            return f"{t.device.type} tensors (kernels need CUDA, or TRITON_INTERPRET=1 with CPU tensors)"
        if t.dtype not in FLOAT_DTYPES:
            return f"{str(t.dtype).replace('torch.', '')} tensors (the kernels serve {SERVED_DTYPES})"
    return None


def _original(module):
    """The class's own forward, bound to the module (patching never wraps an instance-level forward); a
    partial rather than `__get__`, which Dynamo before torch 2.13 cannot trace."""
    return functools.partial(type(module).forward, module)


def _fallback(module, why, *args, **kwargs):
    rec = getattr(module, PATCH_ATTR)
    rec.fallbacks.note(rec.kind, why)
    return _original(module)(*args, **kwargs)


# ------------------------------------------------------------------------------------------ RMSNorm
def norm_forward(self, hidden_states, *args, **kwargs):
    why = tensor_problem(hidden_states, self.weight) if not (args or kwargs) else "unexpected arguments"
    if why:
        return _fallback(self, why, hidden_states, *args, **kwargs)
    facts = getattr(self, PATCH_ATTR).facts
    return rms_norm(hidden_states, self.weight, facts.eps, facts.offset, facts.casting, recomputable=facts.recomputable)


# ---------------------------------------------------------------------------------------------- MLP
MLP_APPLY = {
    "silu": lora.apply_lora_mlp_swiglu,
    "gelu_tanh": functools.partial(lora.apply_lora_mlp_geglu, approximate="tanh"),
    "gelu": functools.partial(lora.apply_lora_mlp_geglu, approximate="none"),
}


# MLPs with one gate_up_proj (Phi-3): the projections fused, the GLU as an op (its inputs are private copies of
# the gate / up halves, so its backward may overwrite them)
FUSED_GATE_UP_APPLY = {
    "silu": functools.partial(lora.apply_lora_fused_gate_up_mlp, glu=functools.partial(swiglu, inplace=True)),
    "gelu_tanh": functools.partial(
        lora.apply_lora_fused_gate_up_mlp, glu=functools.partial(geglu, approximate="tanh", inplace=True)
    ),
    "gelu": functools.partial(
        lora.apply_lora_fused_gate_up_mlp, glu=functools.partial(geglu, approximate="none", inplace=True)
    ),
}


def mlp_forward(self, x, *args, **kwargs):
    why = tensor_problem(x) if not (args or kwargs) else "unexpected arguments"
    if why is None:
        facts = getattr(self, PATCH_ATTR).facts
        apply = (FUSED_GATE_UP_APPLY if facts.fused_gate_up else MLP_APPLY)[facts.activation]
        try:  # UnsupportedLoRA is raised before any work (parameters are read first), chunked or not
            rows = _chunk_rows(x, facts)
            if rows is None:
                return apply(self, x)
            return _chunked_mlp(self, apply, x, rows)
        except lora.UnsupportedLoRA as e:
            why = str(e)
    return _fallback(self, why, x, *args, **kwargs)


def _chunk_rows(x, facts: MLPFacts):
    """Rows per chunk when this (training) call's [rows, 2 * intermediate] gate/up activations would exceed
    facts.chunk_bytes, else None."""
    if not torch.is_grad_enabled():
        return None
    rows = x.numel() // x.shape[-1]
    elem = (autocast_dtype(x) or x.dtype).itemsize
    per_row = 2 * facts.intermediate * elem
    if rows * per_row <= facts.chunk_bytes:
        return None
    step = max(64, facts.chunk_bytes // per_row // 64 * 64)
    return step if step < rows else None


def _chunked_mlp(module, apply, x, rows):
    """The MLP over row chunks, each under non-reentrant activation checkpointing: the backward recomputes
    one chunk at a time, so one chunk's gate/up buffers exist at once (rows are independent in an MLP)."""
    from torch.utils.checkpoint import checkpoint

    x2 = x.reshape(-1, x.shape[-1])
    outs = [checkpoint(apply, module, x2[s : s + rows], use_reentrant=False) for s in range(0, x2.shape[0], rows)]
    return torch.cat(outs).view(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------------------- attention
def _attention_interface(module, eager):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


# A keyword the patched causal-LM forward passes down to the attention layers under torch.compile when the
# batch has no attention mask and no position_ids (no padding, no packing): the mask HF builds is then the plain
# causal one. (HF under compile with torch < 2.14 builds it densely, which keeps SDPA off its flash and cuDNN
# kernels; measured on an H200: attention 28.9 ms per step compiled against 11.1 ms eager.)
UNMASKED_CAUSAL = "fusedlora_unmasked_causal"


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """HF's attention with q/k/v and o through the fused LoRA functions and RoPE through the kernel; the
    attention call itself (sdpa, eager, flash-attention...) and its mask are HF's (but see UNMASKED_CAUSAL)."""
    unmasked_causal = kwargs.pop(UNMASKED_CAUSAL, False)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or args or position_embeddings is None:
        # decoding with a KV cache (generation) keeps HF's own forward, by design: not a fallback
        return _original(self)(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    why = tensor_problem(hidden_states)
    if why:
        return _fallback(self, why, hidden_states, position_embeddings, attention_mask, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    rec = getattr(self, PATCH_ATTR)
    fam, facts = rec.family, rec.facts
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = None
    if fam.fused_projections:
        qkv = _fused_qkv(self, hidden_states, facts.qkv, rec)
    elif facts.qkv:
        try:
            qkv = lora.apply_lora_qkv(self, hidden_states)
        except lora.UnsupportedLoRA as e:
            rec.fallbacks.note("attention (q/k/v)", str(e))
    if qkv is None:
        qkv = (self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states))
    if fam.qk_norm_full:
        qkv = (self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2])
    q, k, v = (t.view(hidden_shape) for t in qkv)
    if fam.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    if fam.rope_attr is None or getattr(self, fam.rope_attr):
        q, k = (rope if facts.rope else naive_rope)(q, k, cos, sin)
    extra = {}
    if fam.sliding_window == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif fam.sliding_window == "module":
        extra["sliding_window"] = getattr(self, "sliding_window", None)
    if fam.attn_softcap_attr:
        extra["softcap"] = getattr(self, fam.attn_softcap_attr)
    dropout = self.attention_dropout if self.training else 0.0
    if (
        unmasked_causal
        and extra.get("sliding_window") is None
        and "softcap" not in extra
        and self.config._attn_implementation == "sdpa"
        and getattr(self, "is_causal", True)
    ):
        attention_mask = None  # HF's sdpa then takes is_causal=True: the flash / cuDNN kernels, no dense mask
    if _varlen_serves(self, q, kwargs, extra, dropout, facts.varlen):
        attn_output, attn_weights = _varlen_attention(self, q, k, v, kwargs, facts.varlen), None
    else:
        attn_output, attn_weights = _attention_interface(self, facts.eager)(
            self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **extra, **kwargs
        )
    attn_output = attn_output.reshape(*input_shape, -1)
    if facts.o:
        try:
            return lora.apply_lora_o(self, attn_output), attn_weights
        except lora.UnsupportedLoRA as e:
            rec.fallbacks.note("attention (o)", str(e))
    return self.o_proj(attn_output.contiguous()), attn_weights


def _fused_qkv(module, hidden_states, fused, rec):
    """q, k, v as column blocks of one qkv_proj output (Phi-3's layout: query heads, then key, then value)."""
    out = None
    if fused:
        try:
            out = lora.apply_lora_linear(module.qkv_proj, hidden_states, module.training)
        except lora.UnsupportedLoRA as e:
            rec.fallbacks.note("attention (q/k/v)", str(e))
    if out is None:
        out = module.qkv_proj(hidden_states)
    nq = module.config.num_attention_heads * module.head_dim
    nk = module.config.num_key_value_heads * module.head_dim
    return out[..., :nq], out[..., nq : nq + nk], out[..., nq + nk :]


# ------------------------------------------------------------------------------- packed sequences
def varlen_facts() -> VarlenAttention:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return VarlenAttention(None, False)
    return VarlenAttention(varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters)


def packed_boundaries(position_ids: torch.Tensor, rows: int):
    """(cu_seqlens int32 [N + 1], longest document) of packed rows: a document starts at each row start and
    wherever position_ids do not step by 1 (HF's rule for packed sequences). Two host syncs (nonzero, max),
    once per step."""
    pos = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    idx = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu = torch.cat([idx, idx.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _varlen_serves(module, q, kwargs, extra, dropout, varlen: VarlenAttention) -> bool:
    """Packed rows (cu_seq_lens in the call, from causal_lm_forward or the caller's collator) on the GPU with
    SDPA: flash varlen attention, linear in memory, instead of SDPA over HF's dense block-diagonal mask."""
    return (
        varlen.attn is not None
        and "cu_seq_lens_q" in kwargs
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and module.config._attn_implementation == "sdpa"
        and dropout == 0.0
        and q.shape[-1] <= 256
        and extra.get("sliding_window") is None
        and extra.get("softcap") is None
    )


def _varlen_attention(module, q, k, v, kwargs, varlen: VarlenAttention):
    """q [B, Hq, S, D], k / v [B, Hk, S, D] -> attention output [B, S, Hq, D] (HF's interface layout)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    q3, k3, v3 = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    gqa = {}
    if hk != hq:
        if varlen.takes_gqa:
            gqa["enable_gqa"] = True
        else:  # torch 2.11: K/V heads repeated (each serves hq / hk query heads, as HF's repeat_kv)
            k3, v3 = k3.repeat_interleave(hq // hk, dim=1), v3.repeat_interleave(hq // hk, dim=1)
    out = varlen.attn(
        q3,
        k3,
        v3,
        kwargs["cu_seq_lens_q"],
        kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"]),
        int(kwargs["max_length_q"]),
        int(kwargs.get("max_length_k", kwargs["max_length_q"])),
        scale=module.scaling,
        window_size=(-1, 0),
        **gqa,
    )
    return out.view(b, s, hq, d)


# ------------------------------------------------------------------------------------------- loss
def loss_facts(cls, family: Family) -> LossFacts:
    sig = inspect.signature(cls.forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    output = MoeCausalLMOutputWithPast if family.router_aux_loss else CausalLMOutputWithPast
    fields = frozenset(f.name for f in dataclasses.fields(output)) - {"loss", "logits", "aux_loss"}
    load_balancing = None
    if family.router_aux_loss:
        load_balancing = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
    return LossFacts(sig, var_kw, output, fields, varlen_facts().attn is not None, load_balancing)


def head_linear(head):
    """The nn.Linear an LM head computes with at this call: the head itself, or for PEFT's modules_to_save
    wrapper the copy its forward would use (the active adapter's, or the original module when adapters are
    off), as PEFT's ModulesToSaveWrapper.forward chooses; None for anything else."""
    if type(head) is torch.nn.Linear:
        return head
    if type(head).__name__ != "ModulesToSaveWrapper":
        return None
    active = list(getattr(head, "active_adapters", None) or [])
    if (
        getattr(head, "disable_adapters", False)
        or not active
        or any(a not in getattr(head, "_adapters", ()) for a in active)
    ):
        chosen = getattr(head, "original_module", None)
    else:
        chosen = head.modules_to_save[active[0]] if active[0] in head.modules_to_save else None
    return chosen if type(chosen) is torch.nn.Linear else None


def loss_head_problem(model) -> str | None:
    """Why the LM head + loss of this *ForCausalLM cannot go through fused linear cross-entropy, or None."""
    head = head_linear(getattr(model, "lm_head", None))
    if head is None:
        return (
            f"lm_head is a {type(getattr(model, 'lm_head', None)).__name__} (a LoRA adapter on the head?), not "
            "a plain nn.Linear or PEFT's modules_to_save copy of one"
        )
    if not head.weight.is_floating_point() or getattr(head.weight, "quant_state", None) is not None:
        return "lm_head's weight is quantised"
    if getattr(model, "_loss_function", None) is not None:
        return "a custom loss_function is set on the model"
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return f"loss_type {model.loss_type!r} is not ForCausalLM"
    return None


LOSS_ONLY_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_forward(self, *args, **kwargs):
    """With labels in training mode: the decoder's hidden states, then the LM head and HF's causal-LM loss
    (shift, ignore_index, num_items_in_batch, softcap / logit scale) as one fused linear cross-entropy; the
    [tokens, vocab] logits are never made and the output's `logits` is None. Anything else: HF's forward."""
    original = _original(self)
    rec = getattr(self, PATCH_ATTR)
    sig, var_kw = rec.facts.signature, rec.facts.var_kw
    try:
        bound = sig.bind(self, *args, **kwargs).arguments
    except TypeError:
        return original(*args, **kwargs)
    call = {k: v for k, v in bound.items() if k not in ("self", var_kw)}
    extra = dict(bound.get(var_kw, {})) if var_kw else {}
    labels = call.pop("labels", None)
    logits_to_keep = call.pop("logits_to_keep", 0)
    if labels is None or not self.training:
        return original(*args, **kwargs)
    fam = rec.family
    why = loss_head_problem(self) or tensor_problem(head_linear(self.lm_head).weight)
    if why is None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        why = "logits_to_keep was given with labels"
    # (as HF resolves it: an argument of None, or none given, means the config's)
    router_aux = extra.get("output_router_logits", call.get("output_router_logits"))
    if router_aux is None:
        router_aux = getattr(self.config, "output_router_logits", False)
    if why is None and router_aux and not fam.router_aux_loss:
        why = "output_router_logits is on and this family's load-balancing loss is not one fusedlora knows"
    elif why is None and router_aux and rec.facts.load_balancing is None:
        why = f"output_router_logits is on and {type(self).__module__} has no load_balancing_loss_func"
    if why:
        return _fallback(self, why, *args, **kwargs)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    cache_given = call.get("cache", call.get("past_key_values", extra.get("past_key_values"))) is not None
    if "use_cache" in sig.parameters and call.get("use_cache") is None and not cache_given:
        call["use_cache"] = False  # a training step keeps no KV cache
    pos = call.get("position_ids")
    if (
        pos is not None
        and call.get("attention_mask") is None
        and "cu_seq_lens_q" not in extra
        and pos.is_cuda
        and self.config._attn_implementation == "sdpa"
        and rec.facts.varlen_available
        and not compiling()
    ):
        # (under torch.compile the rows keep HF's mask: finding the documents syncs the host)
        rows = (call.get("input_ids") if call.get("input_ids") is not None else call["inputs_embeds"]).shape[0]
        cu, longest = packed_boundaries(pos, rows)
        if cu.numel() - 1 > rows:  # packed: the attention layers take flash varlen (HF still builds its mask)
            extra.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if (
        compiling()
        and call.get("attention_mask") is None
        and call.get("position_ids") is None
        and not cache_given
        and "cu_seq_lens_q" not in extra
    ):
        extra[UNMASKED_CAUSAL] = True
    # the loss's own arguments stay out of the decoder (HF passes them down to every layer, where an int
    # num_items_in_batch that changes per step would also change each layer call's CUDA-graph key)
    decoder_extra = {k: v for k, v in extra.items() if k not in LOSS_ONLY_KWARGS}
    if router_aux:
        call.pop("output_router_logits", None)
        decoder_extra["output_router_logits"] = True
    outputs = self.model(**call, **decoder_extra)
    extra.pop(UNMASKED_CAUSAL, None)
    loss = _causal_lm_loss(self, outputs.last_hidden_state, labels, extra)
    aux = {}
    if router_aux:  # HF's MoE forward: the load-balancing loss of the recorded router logits, scaled, added
        aux_loss = rec.facts.load_balancing(
            outputs.router_logits, self.num_experts, self.num_experts_per_tok, call.get("attention_mask")
        )
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        aux["aux_loss"] = aux_loss
    fields = rec.facts.output_fields
    out = rec.facts.output_class(loss=loss, logits=None, **aux, **{k: v for k, v in outputs.items() if k in fields})
    return out if return_dict else out.to_tuple()


def _causal_lm_loss(model, hidden, labels, extra):
    """HF's ForCausalLMLoss of lm_head(hidden), without the logits."""
    fam, cfg = getattr(model, PATCH_ATTR).family, model.config
    ignore_index = extra.get("ignore_index", -100)
    shift_labels = extra.get("shift_labels")
    if shift_labels is None:
        # a fresh tensor: a view one element in (F.pad(...)[..., 1:]) stays one when reshaped at batch 1, and its
        # 8-byte-aligned pointer matches none of the prebuilt loss kernels (they take 16-byte-aligned labels)
        shift_labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], -1)
    head = head_linear(model.lm_head)
    weight, bias = head.weight, head.bias
    dtype = autocast_dtype(hidden) or weight.dtype  # what HF's lm_head call would compute in
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    softcap = getattr(cfg, fam.final_softcap_attr, None) if fam.final_softcap_attr else None
    divisor = getattr(cfg, fam.logit_divisor_attr, None) if fam.logit_divisor_attr else None
    return fused_linear_cross_entropy(
        hidden,
        weight,
        shift_labels.to(hidden.device),
        bias,
        ignore_index=ignore_index,
        softcap=softcap,
        logit_scale=None if divisor is None else 1.0 / divisor,
        num_items_in_batch=extra.get("num_items_in_batch"),
    )
