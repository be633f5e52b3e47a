"""The step profile's bookkeeping (benchmarks/step_profile.py) on a synthetic trace: kernel families, the busy
union and idle time, the base / rank-r GEMM split by shape, FLOP rates."""

import pytest

from benchmarks import step_profile as P


@pytest.mark.parametrize(
    "name,family",
    [
        ("nf4_dequant_kernel", "dequant"),
        ("glu_lora_bwd_kernel", "LoRA GLU"),
        ("glu_fwd_kernel", "GLU"),
        ("rms_norm_bwd_kernel", "norms"),
        ("rope_kernel", "RoPE"),
        ("cross_entropy_kernel", "loss"),
        ("ce_prepare_kernel", "loss"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("flash_bwd_kernel", "attention"),
        ("multi_tensor_apply_kernel<..._adam...>", "optimizer"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "GEMM"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_TNN", "GEMM"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "copies/casts/elementwise"),
        ("void at::native::(anonymous)::CatArrayBatchedCopy<...>", "copies/casts/elementwise"),
        ("mystery", "other"),
    ],
)
def test_family_of(name, family):
    assert P.family_of(name) == family


def test_busy_time_is_the_union():
    assert P.busy_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert P.busy_time([]) == 0


def test_summarize_splits_gemms_and_counts_idle():
    kernels = [
        ("sm90_xmma_gemm_tn", 0, 600),
        ("sm90_xmma_gemm_tn", 600, 700),
        ("rms_norm_fwd_kernel", 700, 750),
        ("rope_kernel", 800, 850),
    ]
    gemm_ops = [
        ([[4096, 2048], [2048, 8192]], 600.0),  # base: 2 * 4096 * 8192 * 2048 FLOPs
        ([[4096, 2048], [16, 2048]], 100.0),
    ]  # linear-style [M, K] x [N, K], N = rank 16
    rows = P.summarize(kernels, gemm_ops, steps=1, wall_us=1000.0, peak_tflops=790.0)
    by = {f: (ms, share, note) for f, ms, share, note in rows}
    assert by["GEMMs (base)"][0] == pytest.approx(0.6) and by["GEMMs (rank-r, a dimension <= 128)"][0] == pytest.approx(
        0.1
    )
    flops = 2 * 4096 * 8192 * 2048 + 2 * 4096 * 16 * 2048
    assert f"{flops / 1e12:.1f} TFLOP per step" in by["GEMMs (base)"][2]
    assert by["norms"][0] == pytest.approx(0.05) and by["RoPE"][0] == pytest.approx(0.05)
    assert by["idle (GPU waiting)"][0] == pytest.approx(0.2)  # 1000 us wall - 800 us busy
    assert sum(share for _, _, share, _ in rows) == pytest.approx(1.0)
    assert "| GEMMs (base) | 0.60 | 60.0% |" in P.markdown(rows, "t")
    assert by["norms"][2] == "rms_norm_fwd_kernel 0.05"  # each family names its largest kernels


def test_families_name_their_largest_kernels():
    kernels = [
        ("elementwise_kernel<copy>", 0, 300),
        ("cat_kernel", 300, 400),
        ("elementwise_kernel<copy>", 400, 500),
        ("fill_kernel", 500, 520),
        ("index_kernel", 520, 530),
        ("vectorized_mul", 530, 531),
    ]
    by = {f: note for f, _, _, note in P.summarize(kernels, [], steps=2, wall_us=600.0)}
    assert by["copies/casts/elementwise"] == "elementwise_kernel<copy> 0.20; cat_kernel 0.05; fill_kernel 0.01"
    long = (
        "void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
        "c10::BFloat16, at::native::binary_internal::MulFunctor<float> > >(int, T2, T3)"
    )
    assert P.short_kernel_name(long, width=200) == (
        "vectorized_elementwise_kernel<8, BinaryFunctor<BFloat16, BFloat16, BFloat16, binary_internal::MulFunctor<float> "
        "> >(int, T2, T3)"
    )
    assert len(P.short_kernel_name(long)) == 90


def test_gemms_inside_cuda_graphs_get_no_flop_rate():
    """Kernels replayed from CUDA graphs have no CPU-side op: the GEMM time is reported whole, with no FLOP
    rate or split computed from the few GEMM ops outside the graphs (seen on an H200: "20 % of peak")."""
    kernels = [("sm90_xmma_gemm_tn", 0, 600), ("sm90_xmma_gemm_tn", 600, 700)]
    gemm_ops = [([[4096, 2048], [2048, 8192]], 100.0)]  # the only GEMM outside the graphs
    by = {f: (ms, note) for f, ms, _, note in P.summarize(kernels, gemm_ops, steps=1, wall_us=700.0, peak_tflops=790.0)}
    assert "GEMMs (base)" not in by and by["GEMMs (all)"][0] == pytest.approx(0.7)
    assert "86% of the GEMM time ran inside CUDA graphs" in by["GEMMs (all)"][1]


def test_gpu_user_annotations_are_not_kernels():
    """torch.compile's regions appear on the device timeline as user annotations spanning many kernels: the
    profile must not count them (seen on an H200: an "other" family of 94 % of the step)."""
    from types import SimpleNamespace as NS

    from benchmarks import step_profile as P

    def ev(name, s, e, annotation=False):
        return NS(
            name=name, device_type="DeviceType.CUDA", time_range=NS(start=s, end=e), is_user_annotation=annotation
        )

    events = [
        ev("Torch-Compiled Region: 0/0", 0, 900, annotation=True),
        ev("ampere_sgemm_128x64", 10, 50),
        NS(name="aten::add", device_type="DeviceType.CPU", kernels=[]),
    ]
    kernels, gemm_ops = P.split_events(events)
    assert kernels == [("ampere_sgemm_128x64", 10, 50)] and gemm_ops == []


def test_idle_gaps_are_charged_to_the_kernel_the_gpu_waited_for():
    kernels = [
        ("sm90_xmma_gemm_tn", 0, 100),
        ("cross_entropy_kernel", 130, 140),
        ("rms_norm_fwd_kernel", 141, 150),
        ("multi_tensor_apply_kernel<adam>", 200, 210),
        ("cross_entropy_kernel", 300, 310),
        ("rope_kernel", 305, 320),
    ]  # (an overlapping kernel: no gap)
    assert P.waits_before(kernels) == {"loss": 30 + 90, "optimizer": 50}  # the 1 us gap is below the threshold
    rows = P.summarize(kernels, [], steps=2, wall_us=400.0)
    idle = [r for r in rows if r[0] == "idle (GPU waiting)"][0]
    assert idle[3] == "waiting to start: loss 0.06 ms, optimizer 0.03 ms"
