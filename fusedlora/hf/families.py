"""The model families fusedlora patches: one declarative row per HF `model_type`.

A row names the module classes of each kind (matched by class name, so this table imports nothing from
transformers) and the few facts where families differ. Everything else is read from the modules
themselves at patch time: the MLP's activation is probed numerically, an RMSNorm class is checked against
the reference it claims to follow before any instance is patched, projections are read at every call.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    norms: tuple[str, ...] = ()        # RMSNorm classes (decoder norms, final norm, QK-norms)
    attention: tuple[str, ...] = ()    # attention modules with q/k/v/o_proj
    mlp: tuple[str, ...] = ()          # gate/up/down GLU MLPs (MoE experts are not among them)
    causal_lm: tuple[str, ...] = ()    # the *ForCausalLM head whose loss goes through fused linear CE
    norm_casting: str = "llama"        # "llama": normalise in fp32, cast, times weight; "gemma": all fp32
    norm_offset: float = 0.0           # Gemma's (1 + weight)
    qk_norm: bool = False              # q_norm / k_norm on each head before RoPE (Qwen3, Gemma3)
    qk_norm_full: bool = False         # q_norm / k_norm over the whole q / k projection, before the head split (OLMo-2)
    sliding_window: str | None = None  # where the attention call's sliding_window comes from: "config" | "module"
    attn_softcap_attr: str | None = None   # attention module attribute passed as softcap= (Gemma-2)
    final_softcap_attr: str | None = None  # config attribute: logits = cap * tanh(logits / cap)
    logit_divisor_attr: str | None = None  # config attribute: logits / value (Granite)
    router_aux_loss: bool = False      # MoE: the loss adds the router's load-balancing term when asked
    fused_projections: bool = False    # one qkv_proj for q/k/v and one gate_up_proj for gate/up (Phi-3)
    mlp_act_attr: str = "act_fn"       # the MLP's activation module attribute
    rope_attr: str | None = None       # attention attribute: RoPE only where it is true (SmolLM3's NoPE layers)


def _names(prefix: str, norm=True, attention=True, mlp=True, causal_lm=True) -> dict:
    """The usual HF class names of a family (`LlamaRMSNorm`, `LlamaAttention`, `LlamaMLP`, ...)."""
    return dict(norms=(f"{prefix}RMSNorm",) if norm else (), attention=(f"{prefix}Attention",) if attention else (),
                mlp=(f"{prefix}MLP",) if mlp else (), causal_lm=(f"{prefix}ForCausalLM",) if causal_lm else ())


GEMMA_NORM = dict(norm_casting="gemma", norm_offset=1.0)

FAMILIES: dict[str, Family] = {
    "llama": Family(**_names("Llama")),
    "mistral": Family(**_names("Mistral"), sliding_window="config"),
    "qwen2": Family(**_names("Qwen2"), sliding_window="module"),
    "qwen3": Family(**_names("Qwen3"), qk_norm=True, sliding_window="module"),
    "gemma": Family(**_names("Gemma"), **GEMMA_NORM),
    "gemma2": Family(**_names("Gemma2"), **GEMMA_NORM, sliding_window="module",
                     attn_softcap_attr="attn_logit_softcapping", final_softcap_attr="final_logit_softcapping"),
    "gemma3_text": Family(**_names("Gemma3"), **GEMMA_NORM, qk_norm=True, sliding_window="module",
                          final_softcap_attr="final_logit_softcapping"),
    "granite": Family(**_names("Granite"), logit_divisor_attr="logits_scaling"),
    "ministral": Family(**_names("Ministral"), sliding_window="module"),
    "smollm3": Family(**_names("SmolLM3"), sliding_window="module", rope_attr="use_rope"),
    "olmo2": Family(**_names("Olmo2"), norm_casting="gemma", qk_norm_full=True),
    "phi3": Family(**_names("Phi3"), sliding_window="config", fused_projections=True, mlp_act_attr="activation_fn"),
    # MoE: experts stay on HF's path; the dense MLPs of Qwen3-MoE's mlp_only_layers are fused
    "mixtral": Family(**_names("Mixtral", mlp=False), sliding_window="config", router_aux_loss=True),
    "qwen2_moe": Family(**_names("Qwen2Moe"), sliding_window="module", router_aux_loss=True),  # (its shared expert fused)
    "qwen3_moe": Family(**_names("Qwen3Moe"), qk_norm=True, sliding_window="module", router_aux_loss=True),
}

# Config attributes that change the logits; a family not in the table with any of them keeps HF's loss.
LOGIT_CHANGING_CONFIG = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale",
                         "logit_softcapping")

# For a model_type not in the table: the generic parts (RMSNorms that pass the numeric check, the loss).
GENERIC = Family()
