"""The MoE shapes of the end-to-end benchmark (issue 36): Qwen3-30B-A3B and Mixtral-8x7B decoder layers with random
weights, LoRA r16 on attention (q, k, v, o) and on the routed experts' 3-D parameters (PEFT's `target_parameters`),
transformers' fastest experts implementation (`grouped_mm`) underneath. QLoRA: the attention projections become NF4
as transformers' bitsandbytes loader makes them, which leaves the 3-D experts in bf16 (it replaces nn.Linear only);
the fusedlora variants then store the experts in NF4 too, with `fusedlora.quantize_experts`.

The model is built straight in its training dtype on the device: the full Qwen3-30B-A3B (48 layers) is 57 GiB in
bf16, and an fp32 build would neither fit nor leave its init blocks out of the measured memory."""
from __future__ import annotations

import contextlib
import dataclasses

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

_QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
                      tie_word_embeddings=False)
_MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                     max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False)
# 1 layer, 4 experts, top-2: the CPU smoke test under the Triton interpreter
_TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=384,
             num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False)


@dataclasses.dataclass(frozen=True)
class MoeShape:
    family: str   # transformers' model_type: qwen3_moe or mixtral
    layers: int   # the decoder layers built unless the run names another count (--layers)
    config: dict  # the config's keyword arguments but the layer count


MOE_SHAPES = {
    # layer counts: what HF+PEFT's step should fit at batch 4 x 2048 on an 80 GB card (an estimate: about 4 GiB a
    # Qwen3 layer, weights, PEFT's merged expert stacks and activations; 8 GiB a Mixtral layer); --layers overrides
    "qwen3moe": MoeShape("qwen3_moe", 8, _QWEN3_30B_A3B),
    "qwen3moe48": MoeShape("qwen3_moe", 48, _QWEN3_30B_A3B),  # the whole model: fusedlora's QLoRA memory row
    "mixtral": MoeShape("mixtral", 4, _MIXTRAL_8X7B),
    "qwen3moe_tiny": MoeShape("qwen3_moe", 1, dict(_TINY, intermediate_size=96, moe_intermediate_size=32,
                                                    num_experts=4, norm_topk_prob=True)),
    "mixtral_tiny": MoeShape("mixtral", 1, dict(_TINY, intermediate_size=32, num_local_experts=4,
                                                 sliding_window=None)),
}


def is_moe(shape: str) -> bool:
    return shape in MOE_SHAPES


def layer_count(shape: str, layers: int = 0) -> int:
    """The decoder layers of a run: `layers` when given (> 0), else the shape's own count."""
    if layers < 0:
        raise SystemExit(f"--layers: expected a positive layer count (or 0 for the shape's own), got {layers}")
    return layers or MOE_SHAPES[shape].layers


def moe_config(shape: str, layers: int = 0, experts_implementation: str = "grouped_mm"):
    """The transformers config of a MoE shape: SDPA attention, no KV cache, the router's aux loss off (the HF
    Trainer's default), `experts_implementation` for the routed experts."""
    import transformers
    s = MOE_SHAPES[shape]
    config_class = {"qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig}[s.family]
    cfg = config_class(**s.config, num_hidden_layers=layer_count(shape, layers), use_cache=False)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = experts_implementation
    return cfg


def causal_lm_class(shape: str):
    import transformers
    return {"qwen3_moe": transformers.Qwen3MoeForCausalLM,
            "mixtral": transformers.MixtralForCausalLM}[MOE_SHAPES[shape].family]


@contextlib.contextmanager
def default_dtype(dtype):
    """Parameters made inside are made in `dtype` (as from_pretrained(dtype=...) builds them): no fp32 copy."""
    import torch
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_model(shape: str, layers: int, device: str, dtype, seed: int):
    """The causal LM of `shape` with random weights, made on `device` in `dtype`."""
    import torch
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        return causal_lm_class(shape)(moe_config(shape, layers))


def lora_config():
    import peft
    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION_TARGETS,
                           target_parameters=EXPERT_TARGETS)


def experts_quantizer():
    """fusedlora.quantize_experts, the experts' NF4 storage (issue 36); refused in the user's terms where this
    fusedlora has none (before the model is built: the 48-layer build takes a while)."""
    import fusedlora
    quantize = getattr(fusedlora, "quantize_experts", None)
    if quantize is None:
        raise SystemExit(f"the MoE QLoRA run of a fusedlora variant stores the experts in NF4 with "
                         f"fusedlora.quantize_experts(model), which this fusedlora ({fusedlora.__file__}) does not "
                         "have yet: run it with --lora, or with a fusedlora that has quantize_experts")
    return quantize


def experts_storage(model) -> str:
    """How the routed experts' gate_up stack is stored, e.g. 'Parameter bfloat16' or 'Params4bit uint8' (the
    report says which QLoRA rows kept bf16 experts)."""
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith(".base_layer.gate_up_proj"):
            return f"{type(p).__name__} {str(p.dtype).replace('torch.', '')}"
    for name, p in model.named_buffers():  # (a quantised stack may be kept as a buffer)
        if name.endswith("gate_up_proj"):
            return f"{type(p).__name__} {str(p.dtype).replace('torch.', '')}"
    return "not found"


MOE_VARIANTS = ("hf", "fusedlora", "unsloth")  # (unsloth: benchmarks/workload.py builds it from a saved checkpoint)


def build(shape, mode, variant, device, gc, seed=0, offload=False, dtype=None, patch_options=None, layers=0):
    """The HF+PEFT (variant "hf") or fusedlora-patched ("fusedlora") MoE model of one run, in train mode, and
    fusedlora.patch's report (None when not patched); as fusedlora.workload.build does for the Llama shapes."""
    if variant not in ("hf", "fusedlora"):
        raise SystemExit(f"the MoE shape {shape!r} runs the variants {', '.join(MOE_VARIANTS)}; got {variant!r}")
    import time

    import peft
    import torch

    from fusedlora import workload
    quantize_experts = experts_quantizer() if mode == "qlora" and variant == "fusedlora" else None
    on_gpu = device == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    model = random_model(shape, layers, device, dtype, seed)
    if mode == "qlora":
        workload.quantize_linears_nf4(model, dtype)  # (attention only: the router and experts are no nn.Linear)
    if on_gpu:
        torch.cuda.empty_cache()
    if gc:
        workload.enable_checkpointing(model)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(model, lora_config())
    report = None
    if variant == "fusedlora":
        import fusedlora
        t0 = time.perf_counter()
        report = fusedlora.patch(model, offload_checkpoints=offload, **(patch_options or {}))
        report = {"seconds": time.perf_counter() - t0, "table": str(report), **report.as_dict()}
        if quantize_experts is not None:  # (after the patch: it stores the stacks that the fused MoE blocks read)
            quantize_experts(model)
            if on_gpu:  # (the bf16 stacks' blocks, which the caching allocator would otherwise keep)
                torch.cuda.empty_cache()
    model.train()
    return model, report
