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

_QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)
_MIXTRAL_8X7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    num_local_experts=8,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    sliding_window=None,
    tie_word_embeddings=False,
)
# 1 layer, 4 experts, top-2: the CPU smoke test under the Triton interpreter
_TINY = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    vocab_size=384,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class MoeShape:
    family: str  # transformers' model_type: qwen3_moe or mixtral
    layers: int  # the decoder layers built unless the run names another count (--layers)
    config: dict  # the config's keyword arguments but the layer count


MOE_SHAPES = {
    # layer counts: HF+PEFT's step at batch 4 x 2048 with ~18 GiB to spare on an 80 GB card, by what autograd saved
    # on the CPU (saved_activations, full widths, fewer experts and tokens, scaled): a Qwen3 layer keeps 1.6 GiB of
    # activations + 1.15 GiB of PEFT's merged expert stacks + 1.2 GiB of weights, a Mixtral layer 2.9 + 2.6 + 2.7;
    # the LM head's logits ~16 GiB (Qwen3's vocab) at most. --layers overrides
    "qwen3moe": MoeShape("qwen3_moe", 10, _QWEN3_30B_A3B),
    "qwen3moe48": MoeShape("qwen3_moe", 48, _QWEN3_30B_A3B),  # the whole model: fusedlora's QLoRA memory row
    "mixtral": MoeShape("mixtral", 6, _MIXTRAL_8X7B),
    "qwen3moe_tiny": MoeShape(
        "qwen3_moe", 1, dict(_TINY, intermediate_size=96, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True)
    ),
    "mixtral_tiny": MoeShape("mixtral", 1, dict(_TINY, intermediate_size=32, num_local_experts=4, sliding_window=None)),
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

    return {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM}[
        MOE_SHAPES[shape].family
    ]


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

    return peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION_TARGETS, target_parameters=EXPERT_TARGETS
    )


def experts_quantizer():
    """fusedlora.quantize_experts, the experts' NF4 storage (issue 36); refused in the user's terms where this
    fusedlora has none (before the model is built: the 48-layer build takes a while)."""
    import fusedlora

    quantize = getattr(fusedlora, "quantize_experts", None)
    if quantize is None:
        raise SystemExit(
            f"the MoE QLoRA run of a fusedlora variant stores the experts in NF4 with "
            f"fusedlora.quantize_experts(model), which this fusedlora ({fusedlora.__file__}) does not "
            "have yet: run it with --lora, or with a fusedlora that has quantize_experts"
        )
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


def saved_gib(shape: str, experts: int, tokens: int, dtype=None, seed: int = 0) -> float:
    """What autograd keeps for the backward of one HF+PEFT layer of `shape` with `experts` experts, on the CPU
    (a 256-token vocabulary: the LM head apart), for a batch of `tokens`; nonzero LoRA B, as after training."""
    import torch

    from .workload import saved_activations

    s = MOE_SHAPES[shape]
    experts_key = "num_experts" if s.family == "qwen3_moe" else "num_local_experts"
    MOE_SHAPES["_estimate"] = dataclasses.replace(
        s, layers=1, config={**s.config, experts_key: experts, "vocab_size": 256}
    )
    try:
        model, _ = build("_estimate", "lora", "hf", "cpu", gc=False, seed=seed, dtype=dtype or torch.bfloat16)
    finally:
        del MOE_SHAPES["_estimate"]
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    ids = torch.randint(0, 256, (1, tokens))
    return saved_activations(lambda: model(input_ids=ids, labels=ids).loss, torch.autocast("cpu", enabled=False))["gib"]


def layer_memory(shape: str, tokens: int, sample_tokens=(256, 512)) -> dict:
    """One HF+PEFT layer's memory at `tokens` a step, GiB: what autograd keeps split into the part that grows with
    the tokens (activations) and the part that grows with the experts (PEFT's merged W + s.B.A stacks and the bf16
    copies of its LoRA factors, 2 % of it at the real widths), from three
    small CPU runs at full widths, scaled to the shape's experts; and the layer's bf16 weights."""
    small, large = sample_tokens
    top_k = MOE_SHAPES[shape].config["num_experts_per_tok"]
    experts = (top_k, 2 * top_k)  # (at least top-k of them)
    base = saved_gib(shape, experts[0], small)
    per_token = (saved_gib(shape, experts[0], large) - base) / (large - small)
    per_expert = (saved_gib(shape, experts[1], small) - base) / (experts[1] - experts[0])
    import torch

    with torch.device("meta"):
        layer = causal_lm_class(shape)(moe_config(shape, 1)).model.layers[0]
    cfg = MOE_SHAPES[shape].config
    return {
        "activations": per_token * tokens,
        "merged_stacks": per_expert * cfg.get("num_experts", cfg.get("num_local_experts")),
        "weights": sum(p.numel() for p in layer.parameters()) * 2 / 2**30,
    }


def main(argv=None) -> int:
    """`python -m benchmarks.moe [--shapes qwen3moe,mixtral] [--tokens 8192]`: one HF+PEFT layer's memory (CPU)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=main.__doc__.split(": ", 1)[1])
    ap.add_argument("--shapes", default="qwen3moe,mixtral")
    ap.add_argument("--tokens", type=int, default=4 * 2048, help="tokens a step (batch x sequence)")
    args = ap.parse_args(argv)
    for shape in args.shapes.split(","):
        m = layer_memory(shape, args.tokens)
        print(
            f"{shape}: a layer at {args.tokens} tokens keeps {m['activations']:.2f} GiB of activations and "
            f"{m['merged_stacks']:.2f} GiB of merged expert stacks for the backward, beside {m['weights']:.2f} GiB "
            "of bf16 weights"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
