"""The end-to-end benchmark's MoE shapes (benchmarks/moe.py, issue 36), on the CPU: the shapes are the published
models', the tiny MoE workload builds and trains as HF+PEFT (grouped_mm experts, LoRA on attention and on the
experts' 3-D parameters) and patched by fusedlora, QLoRA's expert storage or its refusal, the per-step median
clock, the report's MoE rows and the options that do not apply."""

import argparse
import math
import time

import pytest
import torch

from benchmarks import e2e as bench_e2e
from benchmarks import moe
from benchmarks import workload as bench_workload


def _meta_model(shape, layers=0):
    with torch.device("meta"):
        return moe.causal_lm_class(shape)(moe.moe_config(shape, layers))


@pytest.mark.parametrize(
    "shape,layers,total,experts",
    [
        ("qwen3moe48", 0, 30_532_122_624, 128 * 3 * 2048 * 768 * 48),  # Qwen3-30B-A3B: "30.5B total"
        ("mixtral", 32, 46_702_792_704, 8 * 3 * 4096 * 14336 * 32),  # Mixtral-8x7B at its 32 layers: "46.7B"
    ],
)
def test_moe_shapes_are_the_published_models(shape, layers, total, experts):
    m = _meta_model(shape, layers)
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for n, p in m.named_parameters() if ".experts." in n) == experts
    assert m.config._experts_implementation == "grouped_mm" and m.config._attn_implementation == "sdpa"


def test_reduced_shapes_keep_the_layer_and_take_a_layer_count():
    assert _meta_model("qwen3moe").config.num_hidden_layers == moe.MOE_SHAPES["qwen3moe"].layers < 48
    assert _meta_model("qwen3moe", layers=3).config.num_hidden_layers == 3
    assert moe.MOE_SHAPES["qwen3moe"].config is moe.MOE_SHAPES["qwen3moe48"].config


@pytest.mark.parametrize("shape", ["qwen3moe_tiny", "mixtral_tiny"])
def test_hf_build_wraps_attention_and_experts_in_lora(shape):
    model, report = moe.build(shape, "lora", "hf", "cpu", gc=False)
    assert report is None and model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for target in moe.ATTENTION_TARGETS:
        assert any(f".{target}.lora_A" in n for n in trainable), target
    wrapped = {type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.experts")}
    assert wrapped == {"ParamWrapper"}  # PEFT's LoRA on the 3-D gate_up_proj / down_proj
    names = {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"}
    assert names == {"gate_up_proj", "down_proj"}
    assert moe.experts_storage(model) == "Parameter float32"


def _tiny_run(variant, mode="lora", shape="qwen3moe_tiny"):
    return bench_workload.run(
        bench_workload.BenchSpec(variant=variant, model=shape, mode=mode, steps=3, batch=1, seq=16, log_every=1)
    )


# the run's dtype (the workload builds in bf16 on a GPU, fp32 on the CPU) and what it leaves of a loss: fp32
# within 1e-5 relative (first step) / 1e-3 absolute (after two updates); bf16's 8-bit mantissa ~4e-3 an op, so
# 1e-2 relative / 0.1 absolute (2 % of a ~6 loss)
RUN_DTYPE = "bfloat16" if torch.cuda.is_available() else "float32"
LOSS_TOL = (1e-2, 0.1) if torch.cuda.is_available() else (1e-5, 1e-3)


def test_tiny_moe_workload_trains_as_hf_and_patched():
    hf, fused = _tiny_run("hf"), _tiny_run("fusedlora")
    for r in (hf, fused):
        assert r["layers"] == 1 and r["experts"] == f"Parameter {RUN_DTYPE}" and len(r["losses"]) == 3
        assert all(math.isfinite(x) for x in r["losses"]) and r["tokens_per_s_median"] > 0
        assert len(r["step_ms_each"]) == 3 and r["step_ms_median"] == sorted(r["step_ms_each"][2:])[0]
    assert fused["patch"]["model_type"] == "qwen3_moe"
    # the same random model and adapters (B = 0 at first): the same first loss
    assert fused["losses"][0] == pytest.approx(hf["losses"][0], rel=LOSS_TOL[0])
    assert max(abs(a - b) for a, b in zip(fused["losses"], hf["losses"])) < LOSS_TOL[1]


def test_moe_qlora_leaves_hf_experts_unquantised_and_needs_quantize_experts_for_fusedlora():
    import fusedlora

    hf = _tiny_run("hf", mode="qlora")
    assert hf["experts"] == f"Parameter {RUN_DTYPE}" and all(math.isfinite(x) for x in hf["losses"])
    if getattr(fusedlora, "quantize_experts", None) is None:
        t0 = time.perf_counter()
        with pytest.raises(SystemExit, match=r"fusedlora.quantize_experts\(model\), which this fusedlora"):
            _tiny_run("fusedlora", mode="qlora")
        assert time.perf_counter() - t0 < 5  # refused before the model is built
    else:
        fused = _tiny_run("fusedlora", mode="qlora")
        assert fused["experts"] != hf["experts"] and all(math.isfinite(x) for x in fused["losses"])


def test_moe_runs_refuse_what_does_not_apply():
    spec = bench_workload.BenchSpec(variant="liger", model="qwen3moe_tiny", mode="lora", steps=2, batch=1, seq=16)
    with pytest.raises(SystemExit, match="runs the variants hf, fusedlora, unsloth; got 'liger'"):
        bench_workload.run(spec)
    with pytest.raises(SystemExit, match="--layers is for the MoE shapes"):
        bench_workload.run(bench_workload.BenchSpec(variant="hf", model="tiny", mode="lora", layers=2, steps=2))
    with pytest.raises(SystemExit, match="--layers: expected a positive layer count"):
        bench_workload.run(bench_workload.BenchSpec(variant="hf", model="qwen3moe_tiny", layers=-1, steps=2))


def test_moe_options_reach_the_run_process():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    bench_workload.add_bench_args(ap)
    spec = bench_workload.BenchSpec(variant="fusedlora", model="qwen3moe48", mode="qlora", batch=1, seq=4096)
    assert bench_workload.BenchSpec.from_args(ap.parse_args(spec.to_argv())) == spec
    spec = bench_workload.BenchSpec(variant="unsloth", model="mixtral", layers=3)
    assert bench_workload.BenchSpec.from_args(ap.parse_args(spec.to_argv())) == spec
    assert "1b" in next(a for a in ap._actions if a.dest == "model").choices  # the Llama shapes stay


def test_step_clock_takes_the_median_of_the_timed_steps():
    sleeps = [0.05, 0.0, 0.02, 0.004, 0.012]  # the first two are the warm-up
    clock = bench_workload.StepClock(list(range(len(sleeps))), on_gpu=False)
    for step, _ in enumerate(clock):
        time.sleep(sleeps[step])
    r = clock.median_rate(first_timed=2, tokens_per_step=1000)
    assert len(r["step_ms_each"]) == len(sleeps)
    assert 12 <= r["step_ms_median"] < 20  # the 12 ms step, not the 50 ms warm-up
    assert r["tokens_per_s_median"] == pytest.approx(1000 / r["step_ms_median"] * 1e3)


def test_e2e_table_labels_moe_depths_and_uses_the_median_step():
    def row(variant, layers, median_tps, mean_tps):
        return {
            "model": "qwen3moe",
            "layers": layers,
            "mode": "lora",
            "variant": variant,
            "gc": False,
            "tokens_per_s": mean_tps,
            "step_ms": 10.0,
            "tokens_per_s_median": median_tps,
            "step_ms_median": 8.0,
            "peak_gib": 40.0,
            "reserved_gib": 42.0,
            "first_step_s": 3.0,
            "losses": [12.0],
            "fusedlora_jit_kernels": None,
        }

    failed = {"model": "qwen3moe", "layers": 8, "mode": "lora", "variant": "unsloth", "gc": False, "error": "exit 1"}
    table = bench_e2e.markdown(
        [row("hf", 8, 1000.0, 900.0), failed, row("fusedlora", 8, 2500.0, 2000.0), row("fusedlora", 48, 800.0, 700.0)]
    )
    assert "| qwen3moe x8 | lora | off | fusedlora | 2,500 | 2.50x | 8.0 | 40.00 | 42.00 |" in table
    assert "| qwen3moe x8 | lora | off | unsloth | failed: exit 1 |" in table
    assert "| qwen3moe x48 | lora | off | fusedlora | 800 | - |" in table  # no HF+PEFT run at that depth
    assert "JIT in" not in table


def test_e2e_table_names_each_variant_that_went_through_triton_jit():
    from fusedlora.kernel_spec import Variant

    jitted = Variant("rope", 90, (("Q", "*bf16:16"), ("n", "i32")), (("BLOCK_H", 8), ("HAS_POS", 1)), 4, 1)
    r = {
        "model": "qwen3moe",
        "layers": 10,
        "mode": "lora",
        "variant": "fusedlora",
        "gc": False,
        "tokens_per_s": 1.0,
        "step_ms": 1.0,
        "peak_gib": 1.0,
        "first_step_s": 1.0,
        "losses": [1.0],
        "fusedlora_jit_kernels": 1,
        "fusedlora_jit_variants": [jitted.to_string()],
        "fusedlora_jit_callers": ["forwards.py:120 norm_forward < modeling_qwen3_moe.py:300 forward"],
    }
    table = bench_e2e.markdown([r])
    assert "JIT in qwen3moe x10 lora fusedlora: rope sm_90 [BLOCK_H=8, HAS_POS=1] (Q: *bf16:16, n: i32)" in table
    assert "asked for from: forwards.py:120 norm_forward < modeling_qwen3_moe.py:300 forward" in table


def test_e2e_report_states_the_moe_setup_and_each_run_s_expert_storage():
    args = argparse.Namespace(models="qwen3moe48", batch=1, seq=4096, steps=12, packed=False, profile=0)
    r = {
        "model": "qwen3moe48",
        "layers": 48,
        "mode": "qlora",
        "variant": "fusedlora",
        "gc": False,
        "tokens_per_s": 1.0,
        "step_ms": 1.0,
        "peak_gib": 20.0,
        "first_step_s": 1.0,
        "losses": [1.0],
        "experts": "Params4bit uint8",
        "device": "GPU",
        "versions": {},
    }
    report = bench_e2e._report(args, [r])
    assert "7 projections" not in report and "target_parameters" in report and "grouped_mm" in report
    assert "Experts stored as: qwen3moe48 x48 qlora fusedlora: Params4bit uint8" in report


def test_layer_memory_finds_pefts_merged_expert_stacks():
    """`python -m benchmarks.moe` (the reduced shapes' layer counts): the part of what autograd keeps that grows with
    the experts is PEFT's merged W + s.B.A stacks, gate_up [E, 2I, H] and down [E, H, I] in bf16, and the bf16
    copies of its LoRA factors (r = 16: as large as the stacks at these tiny widths, 2 % at Qwen3's)."""
    cfg = moe.MOE_SHAPES["qwen3moe_tiny"].config
    m = moe.layer_memory("qwen3moe_tiny", tokens=64, sample_tokens=(16, 32))
    experts, hidden, inter = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    stacks = experts * 3 * inter * hidden * 2
    factors = experts * 16 * (hidden + 2 * inter + inter + hidden) * 2  # A_gu, B_gu, A_down, B_down
    assert m["merged_stacks"] * 2**30 == pytest.approx(stacks + factors, rel=0.05)
    assert m["activations"] > 0 and "_estimate" not in moe.MOE_SHAPES
