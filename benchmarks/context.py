"""`python -m benchmarks.context`: the longest trainable sequence (batch 1) per variant, each in its own
process (benchmarks.workload --find-context): HF+PEFT with gradient checkpointing, + Liger (when installed),
patched by fusedlora with on-GPU checkpointing, and with offloaded checkpointing; doubling then bisection to
1024 tokens; tokens/s at that length."""

from __future__ import annotations

import argparse
import sys
import time

from . import report as bench_report
from .workload import BenchSpec, run_in_subprocess

CONFIGS = (  # (label, variant, HF gradient checkpointing, fusedlora offloaded checkpointing)
    ("hf+gc", "hf", True, False),
    ("liger+gc", "liger", True, False),
    ("fusedlora+gc", "fusedlora", True, False),
    ("fusedlora+offload", "fusedlora", False, True),
)


def markdown(rows) -> str:
    ref = next((r for r in rows if r["label"] == "hf+gc" and r.get("longest")), None)
    lines = [
        "| variant | longest sequence | vs HF+PEFT+gc | tokens/s there | peak GiB | tried (length: tokens/s, or n: out of memory) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['longest'] / ref['longest']:.1f}x" if ref and r["longest"] else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        rates = dict(r.get("rates", []))
        tried = ", ".join(
            f"{n}: {rates[n]:,.0f}" if ok and n in rates else f"{n}: {'y' if ok else 'n'}"
            for n, ok in r.get("tried", [])
        )
        lines.append(f"| {r['label']} | {r['longest']:,} | {ratio} | {tps} | {peak} | {tried} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.context", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="8b", help="shape: 1b or 8b")
    ap.add_argument("--mode", default="qlora", choices=("qlora", "lora"))
    ap.add_argument("--start", type=int, default=4096, help="first length tried (doubling from here)")
    ap.add_argument("--max-seq", type=int, default=524288)
    ap.add_argument("--granularity", type=int, default=1024, help="bisection stops at this length step")
    ap.add_argument("--variants", default=",".join(c[0] for c in CONFIGS), help="comma list of the labels above")
    ap.add_argument(
        "--out",
        default=None,
        help="Markdown report path; the raw JSON beside it, the file's "
        "suffix made .json (--out run/ctx.md: run/ctx.md, run/ctx.json; --out ctx.json: ctx.md, ctx.json)",
    )
    args = ap.parse_args(argv)
    if not bench_report.gpu_or_exit("python -m benchmarks.context"):
        return 2
    wanted = bench_report.selected(args.variants, "liger+gc")
    rows = []
    for label, variant, gc, offload in CONFIGS:
        if label not in wanted:
            continue
        spec = BenchSpec(
            variant=variant,
            model=args.model,
            mode=args.mode,
            gc=gc,
            offload=offload,
            steps=2,
            batch=1,
            seq=args.start,
            lr=1e-4,
            log_every=1,
            find_context=args.max_seq,
            context_step=args.granularity,
        )
        t0 = time.perf_counter()
        r = run_in_subprocess(spec)
        r["label"] = label
        print(
            f"{label}: "
            + (f"longest {r['longest']:,}" if "error" not in r else r["error"])
            + f" ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        rows.append(r)
        bench_report.write(args.out, _report(args, rows), rows, quiet=True)
    bench_report.write(args.out, _report(args, rows), rows)
    return 0


def _report(args, rows) -> str:
    return (
        bench_report.measured_line(rows)
        + f"; {args.model} shape, {args.mode}, LoRA r16 on 7 projections, batch 1, bf16 autocast, fused AdamW, "
        f"SDPA; each variant in its own process, lengths in steps of {args.granularity}.\n\n" + markdown(rows)
    )


if __name__ == "__main__":
    sys.exit(main())
