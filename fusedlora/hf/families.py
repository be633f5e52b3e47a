"""The model families fusedlora patches: one declarative row per HF `model_type`.

A row names the module classes of each kind (matched by class name, so this table imports nothing from
transformers) and the few facts where families differ. Everything else is read from the modules
themselves at patch time: the MLP's activation is probed numerically, an RMSNorm class is checked against
the reference it claims to follow before any instance is patched, projections are read at every call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Family:
    norms: tuple[str, ...] = ()  # RMSNorm classes (decoder norms, final norm, QK-norms)
    attention: tuple[str, ...] = ()  # attention modules with q/k/v/o_proj
    mlp: tuple[str, ...] = ()  # gate/up/down GLU MLPs (dense ones; a MoE's shared expert is one)
    causal_lm: tuple[str, ...] = ()  # the *ForCausalLM head whose loss goes through fused linear CE
    norm_casting: str = "llama"  # "llama": normalise in fp32, cast, times weight; "gemma": all fp32
    norm_offset: float = 0.0  # Gemma's (1 + weight)
    qk_norm: bool = False  # q_norm / k_norm on each head before RoPE (Qwen3, Gemma3)
    qk_norm_full: bool = False  # q_norm / k_norm over the whole q / k projection, before the head split (OLMo-2)
    sliding_window: str | None = None  # where the attention call's sliding_window comes from: "config" | "module"
    attn_softcap_attr: str | None = None  # attention module attribute passed as softcap= (Gemma-2)
    final_softcap_attr: str | None = None  # config attribute: logits = cap * tanh(logits / cap)
    logit_divisor_attr: str | None = None  # config attribute: logits / value (Granite)
    router_aux_loss: bool = False  # MoE: the loss adds the router's load-balancing term when asked
    fused_projections: bool = False  # one qkv_proj for q/k/v and one gate_up_proj for gate/up (Phi-3)
    mlp_act_attr: str = "act_fn"  # the MLP's activation module attribute
    rope_attr: str | None = None  # attention attribute: RoPE only where it is true (SmolLM3's NoPE layers)
    attention_kept: str | None = None  # why this family's attention keeps HF's path (said in the report)
    attention_config_guards: tuple[str, ...] = ()  # config attributes that, set, change attention: then HF's path
    # MoE blocks (router + routed experts, fusedlora.hf.moe): the block classes, the experts' GLU ("silu": [gate; up]
    # rows; "gptoss": interleaved, clamped), the router's attribute, whether the block returns (out, router scores)
    moe_block: tuple[str, ...] = ()
    moe_act: str = "silu"
    moe_router: str = "gate"
    moe_returns_scores: bool = False


def _names(prefix: str, norm=True, attention=True, mlp=True, causal_lm=True) -> dict:
    """The usual HF class names of a family (`LlamaRMSNorm`, `LlamaAttention`, `LlamaMLP`, ...)."""
    return dict(
        norms=(f"{prefix}RMSNorm",) if norm else (),
        attention=(f"{prefix}Attention",) if attention else (),
        mlp=(f"{prefix}MLP",) if mlp else (),
        causal_lm=(f"{prefix}ForCausalLM",) if causal_lm else (),
    )


GEMMA_NORM = dict(norm_casting="gemma", norm_offset=1.0)

FAMILIES: dict[str, Family] = {
    "llama": Family(**_names("Llama")),
    "mistral": Family(**_names("Mistral"), sliding_window="config"),
    "qwen2": Family(**_names("Qwen2"), sliding_window="module"),
    "qwen3": Family(**_names("Qwen3"), qk_norm=True, sliding_window="module"),
    "gemma": Family(**_names("Gemma"), **GEMMA_NORM),
    "gemma2": Family(
        **_names("Gemma2"),
        **GEMMA_NORM,
        sliding_window="module",
        attn_softcap_attr="attn_logit_softcapping",
        final_softcap_attr="final_logit_softcapping",
    ),
    "gemma3_text": Family(
        **_names("Gemma3"),
        **GEMMA_NORM,
        qk_norm=True,
        sliding_window="module",
        final_softcap_attr="final_logit_softcapping",
    ),
    "granite": Family(**_names("Granite"), logit_divisor_attr="logits_scaling"),
    "ministral": Family(**_names("Ministral"), sliding_window="module"),
    "smollm3": Family(**_names("SmolLM3"), sliding_window="module", rope_attr="use_rope"),
    "olmo2": Family(**_names("Olmo2"), norm_casting="gemma", qk_norm_full=True),
    "phi3": Family(**_names("Phi3"), sliding_window="config", fused_projections=True, mlp_act_attr="activation_fn"),
    # MoE: routed experts through fusedlora.hf.moe; dense MLPs (Qwen3-MoE's mlp_only_layers, Qwen2-MoE's shared
    # expert) as MLPs
    "mixtral": Family(
        **_names("Mixtral", mlp=False),
        sliding_window="config",
        router_aux_loss=True,
        moe_block=("MixtralSparseMoeBlock",),
    ),
    "qwen2_moe": Family(
        **_names("Qwen2Moe"), sliding_window="module", router_aux_loss=True, moe_block=("Qwen2MoeSparseMoeBlock",)
    ),
    "qwen3_moe": Family(
        **_names("Qwen3Moe"),
        qk_norm=True,
        sliding_window="module",
        router_aux_loss=True,
        moe_block=("Qwen3MoeSparseMoeBlock",),
    ),
    "olmoe": Family(
        **_names("Olmoe", mlp=False),
        qk_norm_full=True,
        sliding_window="config",
        router_aux_loss=True,
        attention_config_guards=("clip_qkv",),
        moe_block=("OlmoeSparseMoeBlock",),
    ),
    "gpt_oss": Family(
        **_names("GptOss", attention=False, mlp=False),
        norm_casting="gemma",
        router_aux_loss=True,
        attention_kept="attention sinks (s_aux) are not fused",
        moe_block=("GptOssMLP",),
        moe_act="gptoss",
        moe_router="router",
        moe_returns_scores=True,
    ),
}

# Config attributes that change the logits; a family not in the table with any of them keeps HF's loss.
LOGIT_CHANGING_CONFIG = (
    "final_logit_softcapping",
    "logits_scaling",
    "logit_scale",
    "output_multiplier_scale",
    "logit_softcapping",
)

# For a model_type not in the table: the generic parts (RMSNorms that pass the numeric check, the loss).
GENERIC = Family()


def for_config(family: Family, config) -> tuple[Family, list[str]]:
    """The family row as this model's config leaves it, and report notes on what keeps HF's path: attention
    the family cannot fuse (gpt_oss's sinks) or that a config attribute changes (OLMoE's clip_qkv)."""
    notes = []
    guards = [a for a in family.attention_config_guards if getattr(config, a, None) is not None]
    if guards:  # (the RMSNorms too: HF's attention then changes its q/k norms' outputs in place, as OLMoE clamps them)
        notes.append(
            f"attention and RMSNorms keep HF's path: config sets {', '.join(guards)}, which the fused "
            "attention does not apply"
        )
        return replace(family, attention=(), norms=()), notes
    if family.attention_kept:
        notes.append(f"attention keeps HF's path: {family.attention_kept}")
    return family, notes
