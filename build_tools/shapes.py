"""Shape lists for the prebuilt kernel set: the common decoder models' sizes.

hidden sizes: Qwen2.5-0.5B 896, Qwen2.5-1.5B 1536, Llama-3.2-1B / Gemma-2B 2048, Gemma-2-2B 2304,
Phi-2 2560, Llama-3.2-3B / Gemma-7B 3072, Qwen2.5-7B 3584, Llama-3-8B / Mistral-7B 4096,
Llama-2-13B / Mistral-Nemo 5120, Gemma-2-27B 4608, Qwen2.5-32B 5120, Llama-3-70B 8192.
head dims 64..256 also feed per-head norms (Qwen3 / Gemma-3 QK-norm).
MoE layers (routed experts with LoRA, csrc_triton/moe_lora): their tiles do not depend on the sizes, so a
layer adds variants only through its GLU layout (silu-concatenated, or gpt_oss's interleaved clamped SwiGLU
with biases and transposed weights); the sizes document what the variants were chosen for.
"""

# hidden, intermediate (per expert), experts, top_k, GLU layout
MOE_LAYERS = [
    {"name": "Qwen3-30B-A3B", "hidden": 2048, "intermediate": 768, "experts": 128, "top_k": 8, "act": "silu"},
    {"name": "Mixtral-8x7B", "hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "act": "silu"},
    {"name": "OLMoE-1B-7B", "hidden": 2048, "intermediate": 1024, "experts": 64, "top_k": 8, "act": "silu"},
    {"name": "gpt-oss-20b", "hidden": 2880, "intermediate": 2880, "experts": 32, "top_k": 4, "act": "gptoss"},
]

COMMON = {
    "hidden_sizes": [896, 1024, 1536, 2048, 2304, 2560, 3072, 3584, 4096, 4608, 5120, 6144, 7168, 8192],
    "head_dims": [64, 80, 96, 128, 256],
    "intermediate_sizes": [4864, 5632, 8192, 8960, 9216, 11008, 13824, 14336, 18944, 27648, 28672],
    "vocab_sizes": [32000, 32768, 49152, 128256, 151936, 152064, 256000, 262144],
    "dtypes": ["bf16", "fp16"],
    "moe_layers": MOE_LAYERS,
    # padded ranks: r <= 16 (PEFT's default 8, the usual 16) and 17..64; 0: a projection without an adapter (one
    # of the two targeted, or the adapters disabled or merged)
    "moe_ranks": [0, 16, 64],
}

# A small family CI compiles (sm_80 and sm_90) to check the build end to end in a few minutes.
CI_SUBSET = {
    "hidden_sizes": [2048, 4096],
    "head_dims": [128],
    "intermediate_sizes": [8192],
    "vocab_sizes": [32000],
    "dtypes": ["bf16"],
    "moe_layers": MOE_LAYERS[:1],
    "moe_ranks": [16],
}

FAMILIES = {"common": COMMON, "ci": CI_SUBSET}
# The archs are fusedlora.registry.SUPPORTED_ARCHS: one list for the builds and the loader.
