"""Where the caching allocator's slack comes from: one training run (fusedlora.workload's model and data) with
torch's allocation history on, then the reserved segments at the end of a step grouped by the Python line whose
allocation made them (cudaMalloc), with their size and what is free in them.

    python -m benchmarks.memory_probe --model 8b --variant fusedlora [--empty-cache-after-build]
    python -m benchmarks.memory_probe --compare --model 8b     # every setting below, each in its own process

Prints one JSON line (prefixed RESULT) per run; --compare prints a Markdown table of them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = ("as_is", "empty_cache_after_build", "expandable_env")


def _site(frames) -> str:
    """The innermost frame of fusedlora, transformers, peft, bitsandbytes or the workload, else the innermost."""
    for f in frames or []:
        name = f.get("filename", "")
        if any(k in name for k in ("fusedlora", "transformers", "peft", "bitsandbytes", "benchmarks")):
            return f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename')}:{frames[0].get('line')}" if frames else "?"


def segments_by_site(snapshot, top=12):
    groups: dict = {}
    for seg in snapshot["segments"]:
        g = groups.setdefault(_site(seg.get("frames")), [0, 0, 0])
        g[0] += 1
        g[1] += seg["total_size"]
        g[2] += seg["total_size"] - seg["allocated_size"]
    rows = sorted(groups.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"site": k, "segments": n, "gib": b / 2**30, "free_gib": f / 2**30} for k, (n, b, f) in rows]


def run(args) -> dict:
    import torch

    from fusedlora import workload

    model, _ = workload.build(args.model, args.mode, args.variant, "cuda", gc=False)
    after_build = (torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30)
    if args.setting == "empty_cache_after_build":
        torch.cuda.empty_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    data = workload.batches(args.steps, args.batch, args.seq, False, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    snapshot = None
    t0 = time.perf_counter()
    for step, (ids, labels, pos) in enumerate(data):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if step == args.steps - 1:
            snapshot = torch.cuda.memory._snapshot()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {
        "setting": args.setting,
        "model": args.model,
        "mode": args.mode,
        "variant": args.variant,
        "after_build_alloc_gib": after_build[0],
        "after_build_reserved_gib": after_build[1],
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "end_reserved_gib": torch.cuda.memory_reserved() / 2**30,
        "num_alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        "seconds": time.perf_counter() - t0,
        "slack_by_site": segments_by_site(snapshot),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def compare(args):
    rows = []
    for setting in SETTINGS:
        env = dict(os.environ)
        if setting == "expandable_env":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.memory_probe",
            "--setting",
            setting,
            "--model",
            args.model,
            "--mode",
            args.mode,
            "--variant",
            args.variant,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [text for text in out.stdout.splitlines() if text.startswith("RESULT ")]
        rows.append(json.loads(line[-1][7:]) if line else {"setting": setting, "error": out.stderr[-2000:]})
        print(json.dumps(rows[-1], indent=1), flush=True)
    print("| setting | after build alloc / reserved GiB | peak alloc GiB | peak reserved GiB | reserved / peak |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | failed | | | |")
            continue
        print(
            f"| {r['setting']} | {r['after_build_alloc_gib']:.2f} / {r['after_build_reserved_gib']:.2f} | "
            f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | "
            f"{r['peak_reserved_gib'] / r['peak_alloc_gib']:.2f} |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="8b")
    ap.add_argument("--mode", default="qlora")
    ap.add_argument("--variant", default="fusedlora")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--setting", choices=SETTINGS, default="as_is")
    ap.add_argument("--compare", action="store_true", help="every setting, each in its own process")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)
    print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
