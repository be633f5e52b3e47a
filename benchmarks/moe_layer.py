"""One MoE layer's routed experts with LoRA, forward + backward: fusedlora's fused op against transformers' own
experts module (the `grouped_mm` implementation, its default) without LoRA and with PEFT-style merged LoRA
(`baddbmm(W, B_e, A_e, alpha=s)` formed in every forward, as PEFT 0.21's `_LoraFactorsProxy` does; PEFT itself
need not be installed). docs/moe-design.md 7.1 measured these baselines on an H100.

    python -m benchmarks.moe_layer                          # Qwen3-30B-A3B layer, T = 4096 and 16384, r 16
    python -m benchmarks.moe_layer --tokens 4096 --rank 16 --nf4 --check

Each line: ms for forward + backward (triton.testing.do_bench, gradients to x, the routing weights and the LoRA
factors; frozen bf16 experts) and the peak memory over what was allocated before the step. Inputs are fresh
random bf16 tensors with uniform random top-k routing; --check first compares the fused op's output and
gradients with the merged baseline (bf16, relative error). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json

import torch

LAYERS = {"qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8)}


def _experts_module(hidden, inter, experts, top_k, device):
    """transformers' Qwen3MoeExperts with the grouped_mm implementation, random frozen bf16 weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    config._experts_implementation = "grouped_mm"
    module = Qwen3MoeExperts(config).to(device, torch.bfloat16)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    module.requires_grad_(False)
    return module


def _lora_factors(module, rank, device):
    """PEFT's layouts in fp32 (its autocast_adapter_dtype): A [E*r, in], B [out, r*E], B nonzero."""
    E = module.num_experts
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        n_out, n_in = getattr(module, name).shape[1:]
        A = (torch.randn(E * rank, n_in, device=device) * n_in**-0.5).requires_grad_()
        B = (torch.randn(n_out, rank * E, device=device) * 0.01).requires_grad_()
        out[name] = (A, B)
    return out


def _merged(W, A, B, scale):
    """PEFT 0.21's per-forward merged weight W + s B_e A_e (B_e[o, j] = B[o, j*E + e])."""
    E = W.shape[0]
    r = A.shape[0] // E
    A_e = A.to(W.dtype).view(E, r, -1)
    B_e = B.to(W.dtype).view(B.shape[0], r, E).permute(2, 0, 1)
    return torch.baddbmm(W, B_e, A_e, alpha=scale)


def _runners(module, factors, scale):
    from fusedlora.ops.moe_lora import ExpertProj, moe_lora_experts

    def no_lora(x, index, weights):
        return module(x, index, weights)

    def merged(x, index, weights):
        params = {name: _merged(getattr(module, name), *factors[name], scale) for name in factors}
        return torch.func.functional_call(module, params, (x, index, weights))

    def fused(
        x, index, weights, gate_up_weight=None, gate_up_state=None, down_weight=None, down_state=None, base="triton"
    ):
        gu = ExpertProj(
            module.gate_up_proj if gate_up_weight is None else gate_up_weight,
            *factors["gate_up_proj"],
            scale,
            quant_state=gate_up_state,
        )
        d = ExpertProj(
            module.down_proj if down_weight is None else down_weight,
            *factors["down_proj"],
            scale,
            quant_state=down_state,
        )
        return moe_lora_experts(x, index, weights, gu, d, base_gemm=base)

    def hybrid(x, index, weights):
        return fused(x, index, weights, base="grouped_mm")

    return {
        "grouped_mm, no LoRA": no_lora,
        "grouped_mm + merged LoRA (PEFT)": merged,
        "fusedlora fused kernels": fused,
        "fusedlora hybrid (grouped_mm GEMMs; auto on sm_90)": hybrid,
    }


def _step(fn, x, index, weights, leaves, dout):
    out = fn(x, index, weights)
    torch.autograd.grad(out, [x, weights] + leaves, dout, allow_unused=True)


def _measure(fn, x, index, weights, leaves, dout):
    import triton

    _step(fn, x, index, weights, leaves, dout)  # warm-up (JIT, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, x, index, weights, leaves, dout)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(lambda: _step(fn, x, index, weights, leaves, dout), warmup=5, rep=50)
    return ms, peak


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(layer: str, tokens: list[int], rank: int, nf4: bool, check: bool):
    dims = LAYERS[layer]
    device = "cuda"
    torch.manual_seed(0)
    module = _experts_module(dims["hidden"], dims["inter"], dims["experts"], dims["top_k"], device)
    factors = _lora_factors(module, rank, device)
    scale = 2.0
    runners = _runners(module, factors, scale)
    leaves = [t for pair in factors.values() for t in pair]
    if nf4:  # the fused op on NF4 experts (bitsandbytes' storage), against the bf16 baselines
        import bitsandbytes.functional as bnb_functional

        quantised = {
            name: bnb_functional.quantize_4bit(
                getattr(module, name).data, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            for name in factors
        }
        fused = runners["fusedlora fused kernels"]
        runners["fusedlora NF4"] = lambda x, i, w: fused(x, i, w, *quantised["gate_up_proj"], *quantised["down_proj"])
        # the NF4 run's check reference: the merged baseline on bitsandbytes' own dequantisation of those bytes
        # (against the unquantised stack the check would measure NF4's weight error, ~0.15, not the op)
        dequantised = {name: bnb_functional.dequantize_4bit(*quantised[name]) for name in factors}

        def merged_on_dequantised(x, index, weights):
            params = {name: _merged(dequantised[name], *factors[name], scale) for name in factors}
            return torch.func.functional_call(module, params, (x, index, weights))

    rows = []
    for T in tokens:
        x = torch.randn(T, dims["hidden"], device=device, dtype=torch.bfloat16, requires_grad=True)
        weights, index = torch.softmax(torch.randn(T, dims["experts"], device=device), -1).topk(dims["top_k"], -1)
        weights = weights.to(torch.bfloat16).requires_grad_()
        dout = torch.randn(T, dims["hidden"], device=device, dtype=torch.bfloat16)
        if check:
            for name in [n for n in runners if n.startswith("fusedlora")]:  # (the fused kernels, the hybrid)
                ref = merged_on_dequantised if name.endswith("NF4") else runners["grouped_mm + merged LoRA (PEFT)"]
                out_ref = ref(x, index, weights)
                g_ref = torch.autograd.grad(out_ref, [x, weights] + leaves, dout)
                out = runners[name](x, index, weights)
                g = torch.autograd.grad(out, [x, weights] + leaves, dout)
                errs = {
                    "out": _rel(out, out_ref),
                    **{n: _rel(a, b) for n, a, b in zip(["dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d"], g, g_ref)},
                }
                print(json.dumps({"check": name, "tokens": T, "rel_err_vs_merged": errs}))
        for name, fn in runners.items():
            ms, peak = _measure(fn, x, index, weights, leaves, dout)
            row = {
                "layer": layer,
                "tokens": T,
                "rank": rank,
                "impl": name,
                "fwd_bwd_ms": round(ms, 3),
                "peak_gib": round(peak, 3),
                "device": torch.cuda.get_device_name(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.moe_layer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layer", default="qwen3-30b-a3b", choices=sorted(LAYERS))
    ap.add_argument("--tokens", default="4096,16384", help="comma-separated token counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--nf4", action="store_true", help="also the fused op on NF4 experts")
    ap.add_argument("--check", action="store_true", help="first compare the fused op with the merged baseline")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.moe_layer needs a CUDA GPU")
    run(args.layer, [int(t) for t in args.tokens.split(",")], args.rank, args.nf4, args.check)


if __name__ == "__main__":
    main()
