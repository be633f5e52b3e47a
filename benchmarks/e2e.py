"""`python -m benchmarks.e2e`: the end-to-end training step, every variant timed the same way, each in
its own process (benchmarks/workload.py): HF+PEFT, + Liger (when installed), + torch.compile, patched by
fusedlora; LoRA and QLoRA; with and without gradient checkpointing; the 1B and 8B Llama shapes, and the MoE
shapes (benchmarks/moe.py: Qwen3-30B-A3B and Mixtral-8x7B layers; HF+PEFT, Unsloth, fusedlora).
Writes a Markdown table and the raw JSON; tokens/s and step ms are the median step's after the warm-up."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from . import moe
from . import report as bench_report
from .workload import VARIANTS, BenchSpec, run_in_subprocess


def _loss_gap(r, ref):
    """Largest relative difference between two runs' per-step losses."""
    pairs = list(zip(r.get("losses", []), ref.get("losses", [])))
    return max((abs(a - b) / max(abs(b), 1e-6) for a, b in pairs), default=float("nan"))


def checkpointing(r) -> str:
    return "offload" if r.get("offload") else "on" if r["gc"] else "off"


def shape_label(r) -> str:
    """The shape's name, with its layer count for a MoE shape (runs of one shape at two depths stay apart)."""
    return f"{r['model']} x{r['layers']}" if r.get("layers") else r["model"]


def step_rate(r) -> tuple[float, float]:
    """(tokens/s, step ms) of the median timed step; a result from before the per-step clock: the window's mean."""
    return r.get("tokens_per_s_median", r["tokens_per_s"]), r.get("step_ms_median", r["step_ms"])


def markdown(results) -> str:
    """One row per run; the ratio and loss gap against HF+PEFT of the same shape and mode, with gradient
    checkpointing for the offloaded runs (the on-GPU checkpointing they replace). Peak GiB: allocated tensors
    at most over the run; reserved GiB: what the process held from the GPU at most (the caching allocator's
    slack and every CUDA-graph pool included)."""
    lines = [
        "| shape | mode | gc | variant | tokens/s | vs HF+PEFT | step ms | peak GiB | reserved GiB | "
        "first step s | loss gap vs HF | JIT kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hf = {
        (shape_label(r), r["mode"], checkpointing(r)): r for r in results if r["variant"] == "hf" and "error" not in r
    }
    for key, group in itertools.groupby(results, key=lambda r: (shape_label(r), r["mode"], checkpointing(r))):
        group = list(group)
        ref = hf.get((key[0], key[1], "on" if key[2] == "offload" else key[2]))
        for r in group:
            head = f"| {key[0]} | {key[1]} | {key[2]} | {r['variant']} |"
            if "error" in r:
                lines.append(head + f" failed: {r['error'][:120]} | | | | | | | |")
                continue
            rate, step_ms = step_rate(r)
            ratio = f"{rate / step_rate(ref)[0]:.2f}x" if ref else "-"
            gap = f"{_loss_gap(r, ref):.1e}" if ref and r is not ref else "-"
            jit = "-" if r.get("fusedlora_jit_kernels") is None else str(r["fusedlora_jit_kernels"])
            steady = "-" if r.get("reserved_gib") is None else f"{r['reserved_gib']:.2f}"
            lines.append(
                head + f" {rate:,.0f} | {ratio} | {step_ms:.1f} | {r['peak_gib']:.2f} | {steady} | "
                f"{r['first_step_s']:.2f} | {gap} | {jit} |"
            )
    for r in results:  # what the wheel lacked, by name (the AOT shape lists' next entries)
        callers = r.get("fusedlora_jit_callers") or ()
        for i, variant in enumerate(r.get("fusedlora_jit_variants") or ()):
            v = json.loads(variant)
            args = ", ".join(f"{n}: {t}" for n, t in v["signature"])
            consts = ", ".join(f"{n}={c}" for n, c in v["constexprs"])
            lines.append(
                f"\nJIT in {shape_label(r)} {r['mode']} {r['variant']}: {v['kernel']} sm_{v['arch']} [{consts}] ({args})"
            )
            if i < len(callers):
                lines.append(f"  asked for from: {callers[i]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="1b",
        help="comma list of shapes: 1b, 8b, and the MoE shapes "
        f"{', '.join(moe.MOE_SHAPES)} (variants {', '.join(moe.MOE_VARIANTS)})",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=0,
        help="the MoE shapes' decoder layers (default: each shape's "
        "own: " + ", ".join(f"{k} {v.layers}" for k, v in moe.MOE_SHAPES.items()) + ")",
    )
    ap.add_argument("--modes", default="qlora,lora")
    ap.add_argument(
        "--gc",
        default="off",
        help="comma list of off, on (HF gradient checkpointing), offload "
        "(fusedlora's offloaded checkpoints; fusedlora variants only); both = off,on",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--packed", action="store_true", help="padding-free packed rows (position_ids restart per document)"
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="N steady steps under torch.profiler after the timed ones: GPU time per kernel family",
    )
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="GEMM peak for the profile (H200 measured ~790)")
    ap.add_argument(
        "--saved",
        action="store_true",
        help="one more step per run listing what autograd saves for the backward (total and largest groups by shape)",
    )
    ap.add_argument(
        "--patch-options",
        default="",
        help="fusedlora.patch keyword arguments as JSON for the fusedlora "
        "variants, e.g. '{\"recompute_norms\": false}'",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="Markdown report path; the raw JSON beside it, the file's "
        "suffix made .json (--out run/e2e.md: run/e2e.md, run/e2e.json; --out e2e.json: e2e.md, e2e.json)",
    )
    args = ap.parse_args(argv)
    settings = args.gc.replace("both", "off,on").split(",")
    if set(settings) - {"off", "on", "offload"}:
        ap.error(f"--gc: expected a comma list of off, on, offload, both; got {args.gc!r}")
    if not bench_report.gpu_or_exit("python -m benchmarks.e2e"):
        return 2
    variants = bench_report.selected(args.variants, "liger")
    results = []
    for model, mode, setting in itertools.product(args.models.split(","), args.modes.split(","), settings):
        for variant in variants:
            if setting == "offload" and not variant.startswith("fusedlora"):
                continue
            if moe.is_moe(model) and variant not in moe.MOE_VARIANTS:
                print(f"{model}: the MoE shapes run {', '.join(moe.MOE_VARIANTS)}: skipping {variant}", file=sys.stderr)
                continue
            fused = variant.startswith("fusedlora")
            spec = BenchSpec.from_args(
                args,
                variant=variant,
                model=model,
                mode=mode,
                gc=setting == "on",
                offload=setting == "offload",
                log_every=5,
                layers=args.layers if moe.is_moe(model) else 0,
                patch_options=args.patch_options if fused else "",
            )
            t0 = time.perf_counter()
            r = run_in_subprocess(spec)
            print(
                f"{model} {mode} gc={setting} {variant}: "
                + (f"{step_rate(r)[0]:,.0f} tok/s, {r['peak_gib']:.2f} GiB" if "error" not in r else r["error"])
                + f" ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
            results.append(r)
            bench_report.write(args.out, _report(args, results), results, quiet=True)
    bench_report.write(args.out, _report(args, results), results)
    return 0


MOE_SETUP = (
    "MoE shapes: random weights, LoRA r16 on q, k, v, o and on the experts' gate_up_proj and down_proj "
    "(PEFT target_parameters), HF's experts_implementation grouped_mm, the router's aux loss off; MoE QLoRA: "
    "NF4 attention, the experts NF4 in fusedlora (quantize_experts) and Unsloth (its loader) but bf16 in "
    "HF+PEFT (transformers' bitsandbytes loader quantises nn.Linear only)."
)


def _report(args, results) -> str:
    shapes = args.models.split(",")
    lora = (
        ""
        if all(map(moe.is_moe, shapes))
        # (the MoE shapes' LoRA: MOE_SETUP)
        else "LoRA r16 on 7 projections, "
        if not any(map(moe.is_moe, shapes))
        else "Llama shapes: LoRA r16 on 7 projections, "
    )
    report = (
        bench_report.measured_line(results) + f"; batch {args.batch} x {args.seq}, {lora}bf16 autocast, fused AdamW, "
        f"SDPA, {args.steps} steps (first 2 untimed; tokens/s and step ms of the median timed step)"
        f"{', packed rows' if args.packed else ''}, each variant in its own process."
    )
    if any(map(moe.is_moe, shapes)):
        report += (
            " "
            + MOE_SETUP
            + " Experts stored as: "
            + "; ".join(
                f"{shape_label(r)} {r['mode']} {r['variant']}: {r['experts']}" for r in results if r.get("experts")
            )
        )
    report += "\n\n" + markdown(results)
    from .step_profile import markdown as profile_markdown

    for r in results:
        if r.get("saved"):
            report += (
                f"\n\n{r['model']} {r['mode']} gc={checkpointing(r)} {r['variant']}: autograd keeps "
                f"{r['saved']['gib']:.2f} GiB for the backward; largest: "
                + ", ".join(
                    f"{g['storages']} x {g['dtype']} {g['shape']} = {g['gib']:.2f} GiB"
                    for g in r["saved"]["largest"][:8]
                )
            )
    for r in results:
        if r.get("profile"):
            report += "\n\n" + profile_markdown(
                r["profile"],
                f"{r['model']} {r['mode']} gc={checkpointing(r)} {r['variant']}: "
                f"GPU time per step by kernel family ({args.profile} profiled steps)",
            )
    return report


if __name__ == "__main__":
    sys.exit(main())
