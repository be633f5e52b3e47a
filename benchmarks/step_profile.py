"""Where a training step's GPU time goes: torch.profiler over steady steps, kernels grouped by family.

`python -m benchmarks.e2e --profile` runs each variant's workload with `--profile N`: after the timed steps,
N more steps under torch.profiler; this module turns the trace into a table - per family (base GEMMs, rank-r
GEMMs, dequant, attention, norms, RoPE, GLU, loss, optimizer, copies / casts / elementwise, other, idle = GPU
waiting on the host) its time per step, its share, and for the GEMMs the achieved TFLOP/s against a peak; the
idle row says which families' launches the GPU waited for (the gaps inside the trace, by the kernel after each).
"""

from __future__ import annotations

import re

# kernel-name patterns, first match wins (our Triton kernels keep their @triton.jit names in the cubins)
FAMILIES = (
    ("dequant", r"nf4_dequant|gptq_dequant|dequantize|kDequantize"),
    ("LoRA GLU", r"glu_lora_"),
    ("GLU", r"glu_fwd|glu_bwd|silu|gelu"),
    ("norms", r"rms_norm"),
    ("RoPE", r"rope_kernel|rotary"),
    ("loss", r"cross_entropy|ce_prepare|scale_by_scalar"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(fprop|bprop)|_efficient_attention|softmax"),
    ("optimizer", r"adam|multi_tensor|_foreach"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|sm\d\d_.*(tn|nt|nn|tt)"),
    ("copies/casts/elementwise", r"elementwise|copy|cat|transpose|fill|reduce|index|vectorized|unrolled|where|mul|add"),
)
_COMPILED = [(name, re.compile(pat, re.I)) for name, pat in FAMILIES]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::linear", "aten::addmm_")


def family_of(kernel_name: str) -> str:
    for name, pat in _COMPILED:
        if pat.search(kernel_name):
            return name
    return "other"


def busy_time(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def waits_before(kernels, min_gap_us: float = 2.0) -> dict:
    """GPU idle time inside the traced span, charged to the kernel family whose launch the GPU was waiting for:
    family -> us of the gaps (>= min_gap_us) that end where one of its kernels starts."""
    waits: dict = {}
    end = None
    for name, s, e in sorted(kernels, key=lambda k: k[1]):
        if end is not None and s - end >= min_gap_us:
            fam = family_of(name)
            waits[fam] = waits.get(fam, 0.0) + (s - end)
        end = e if end is None else max(end, e)
    return waits


def _gemm_shapes(shapes):
    """(M, N, K) of a GEMM op from its recorded input shapes, or None."""
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) == 2]
    if len(mats) < 2:
        return None
    (m, k), (k2, n) = mats[-2], mats[-1]
    if k != k2:  # linear-style [M, K] x [N, K]
        k2, n = n, k2
    return (m, n, k) if k == k2 else None


def summarize(kernels, gemm_ops, steps: int, wall_us: float, peak_tflops: float = 0.0, rank_max: int = 128):
    """kernels: [(name, start_us, end_us)] of the device; gemm_ops: [(input_shapes, device_us)] of the CPU GEMM ops.
    Returns rows [(family, ms per step, share of the step, note)] with idle last."""
    per, by_name = {}, {}  # family -> us; family -> {kernel name -> us}
    for name, s, e in kernels:
        fam = family_of(name)
        per[fam] = per.get(fam, 0.0) + (e - s)
        names = by_name.setdefault(fam, {})
        names[name] = names.get(name, 0.0) + (e - s)
    base_us = rank_us = flops = 0.0
    for shapes, dev_us in gemm_ops:
        mnk = _gemm_shapes(shapes)
        if mnk is None:
            continue
        flops += 2.0 * mnk[0] * mnk[1] * mnk[2]
        if min(mnk) <= rank_max:
            rank_us += dev_us
        else:
            base_us += dev_us
    rows = []
    step_us = wall_us / max(1, steps)
    gemm_us = per.pop("GEMM", 0.0)
    if gemm_us:
        seen = (rank_us + base_us) / gemm_us
        if seen < 0.9:
            # GEMM kernels with no op of their own on the CPU side: replayed from CUDA graphs, whose ops ran
            # once at capture. Their shapes are unknown, so no FLOP rate and no base / rank-r split.
            rows.append(
                (
                    "GEMMs (all)",
                    gemm_us / steps / 1e3,
                    f"{1 - seen:.0%} of the GEMM time ran inside CUDA graphs: no FLOP count",
                )
            )
            gemm_us = 0.0
    if gemm_us:
        split = rank_us / (rank_us + base_us) if rank_us + base_us else 0.0
        note = f"{flops / steps / 1e12:.1f} TFLOP per step" if flops else ""
        if flops and peak_tflops:
            note += f", {flops / (gemm_us * 1e-6) / 1e12:.0f} TFLOP/s = {flops / (gemm_us * 1e-6) / 1e12 / peak_tflops:.0%} of {peak_tflops:.0f}"
        rows.append(("GEMMs (base)", gemm_us * (1 - split) / steps / 1e3, note))
        if split:
            rows.append(("GEMMs (rank-r, a dimension <= %d)" % rank_max, gemm_us * split / steps / 1e3, ""))
    for fam, us in sorted(per.items(), key=lambda kv: -kv[1]):
        rows.append((fam, us / steps / 1e3, _largest_kernels(by_name[fam], steps)))
    idle_us = max(0.0, wall_us - busy_time([(s, e) for _, s, e in kernels]))
    waits = sorted(waits_before(kernels).items(), key=lambda kv: -kv[1])[:4]
    note = ("waiting to start: " + ", ".join(f"{fam} {us / steps / 1e3:.2f} ms" for fam, us in waits)) if waits else ""
    rows.append(("idle (GPU waiting)", idle_us / steps / 1e3, note))
    return [(f, ms, ms / (step_us / 1e3) if step_us else 0.0, note) for f, ms, note in rows]


_NAME_NOISE = re.compile(r"\bvoid |\bat::native::|\(anonymous namespace\)::|\bc10::|\bcudnn::fusion::|\bstd::")


def short_kernel_name(name: str, width: int = 90) -> str:
    """A kernel name without its namespaces and `void` (so that a cut keeps the functor or template that tells
    one elementwise kernel from another), cut to `width` characters."""
    return _NAME_NOISE.sub("", name)[:width]


def _largest_kernels(by_name: dict, steps: int, top: int = 3) -> str:
    """A family's `top` kernels by GPU time (ms per step; by_name: kernel name -> us), short names: which
    kernels a family's time is, to decide what to fuse or drop."""
    mine = sorted(((us, n) for n, us in by_name.items()), reverse=True)[:top]
    return "; ".join(f"{short_kernel_name(n)} {us / steps / 1e3:.2f}" for us, n in mine)


def profile_steps(run_step, steps: int):
    """Run `run_step()` `steps` times under torch.profiler (CUDA); returns (kernels, gemm_ops, wall_us)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    return (*split_events(prof.events()), wall_us)


def split_events(events):
    """(kernels [(name, start_us, end_us)], gemm_ops [(input_shapes, device_us)]) of profiler events. GPU
    user annotations (torch.compile's "Torch-Compiled Region", CompiledFunction ranges) sit on the device
    timeline too but span many kernels: they are not kernels."""
    kernels, gemm_ops = [], []
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            if not getattr(e, "is_user_annotation", False):
                kernels.append((e.name, e.time_range.start, e.time_range.end))
        elif e.name in GEMM_OPS and getattr(e, "kernels", None):
            gemm_ops.append((e.input_shapes, sum(k.duration for k in e.kernels)))
    return kernels, gemm_ops


def markdown(rows, title: str) -> str:
    lines = [f"#### {title}", "", "| family | ms / step | share | note |", "|---|---|---|---|"]
    lines += [f"| {f} | {ms:.2f} | {share:.1%} | {note} |" for f, ms, share, note in rows]
    return "\n".join(lines)
