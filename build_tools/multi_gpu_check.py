"""Multi-GPU check of fusedlora under FSDP2, in one job (issue: FSDP2 / DDP):

    python build_tools/multi_gpu_check.py --gpus 2 --model 8b --mode qlora --steps 20 [--out check.md]

Runs examples/fsdp2_qlora.py three times, each in its own processes: patched on N GPUs (torchrun), unpatched
on N GPUs, and patched on one GPU with the same global batch. Checks per-step loss within --loss-tol relative
(N-GPU patched vs 1-GPU patched, and patched vs unpatched on N GPUs) and the trained LoRA weights (N vs 1
GPU, --weight-tol); reports tokens/s and peak memory per GPU, the patched/unpatched ratios and the scaling
efficiency 1 -> N GPUs. Exit status 1 when a check fails. Without GPUs (CUDA_VISIBLE_DEVICES=""), N gloo
processes on the CPU (the tiny shape: the CI smoke test)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fsdp2_qlora.py"


def _run(nproc, extra, out, common):
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), NCCL_NVLS_ENABLE="0"
    )  # NVLink multicast off (the lent machines' advice)
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    ) + [str(EXAMPLE), *common, *extra, "--out", str(out), "--save-lora"]
    if nproc == 1:
        cmd.append("--no-shard")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--model", default="8b")
    ap.add_argument("--mode", default="qlora", choices=("qlora", "lora"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--loss-tol", type=float, default=1e-2, help="per-step relative loss tolerance (bf16)")
    ap.add_argument("--weight-tol", type=float, default=5e-2, help="relative error of each trained LoRA weight")
    ap.add_argument("--cpu-offload", action="store_true", help="the N-GPU runs with FSDP2's CPUOffloadPolicy")
    ap.add_argument("--out", default=None, help="Markdown report")
    args = ap.parse_args(argv)
    import torch

    common = [
        "--model",
        args.model,
        "--mode",
        args.mode,
        "--steps",
        str(args.steps),
        "--global-batch",
        str(args.global_batch),
        "--seq",
        str(args.seq),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        offload = ["--cpu-offload"] if args.cpu_offload else []
        runs = {
            "patched N": _run(args.gpus, offload, tmp / "pn.json", common),
            "unpatched N": _run(args.gpus, ["--no-patch", *offload], tmp / "un.json", common),
            "patched 1": _run(1, [], tmp / "p1.json", common),
        }
        w_n, w_1 = torch.load(tmp / "pn.pt"), torch.load(tmp / "p1.pt")
    failures = []
    pn, un, p1 = runs["patched N"], runs["unpatched N"], runs["patched 1"]
    gap_1 = max(_rel(a, b) for a, b in zip(pn["losses"], p1["losses"]))
    gap_u = max(_rel(a, b) for a, b in zip(pn["losses"], un["losses"]))
    werr = max(((w_n[k] - w_1[k]).norm() / w_1[k].norm().clamp_min(1e-12)).item() for k in w_1)
    if gap_1 > args.loss_tol:
        failures.append(f"per-step loss, {args.gpus} GPUs vs 1: {gap_1:.2e} > {args.loss_tol}")
    if gap_u > args.loss_tol:
        failures.append(f"per-step loss, patched vs unpatched on {args.gpus} GPUs: {gap_u:.2e} > {args.loss_tol}")
    if werr > args.weight_tol:
        failures.append(f"trained LoRA weights, {args.gpus} GPUs vs 1: {werr:.2e} > {args.weight_tol}")
    if set(w_n) != set(w_1) or not w_1:
        failures.append("LoRA weight sets differ")
    for name, r in runs.items():
        if r.get("fallbacks"):
            failures.append(f"{name}: run-time fallbacks to HF's path: {r['fallbacks']}")
    lines = [
        f"FSDP2 check: {args.model} {args.mode}, global batch {args.global_batch} x {args.seq}, {args.steps} "
        f"steps, {args.gpus} GPUs{' (CPU offload)' if args.cpu_offload else ''} vs 1",
        "",
        "| run | tokens/s per GPU | peak GiB per GPU | final loss |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        peak = f"{r['peak_gib_per_gpu']:.1f}" if r.get("peak_gib_per_gpu") else "-"
        lines.append(f"| {name} | {r['tokens_per_s_per_gpu']:,.0f} | {peak} | {r['losses'][-1]:.4f} |")
    lines += [
        "",
        f"- patched / unpatched tokens/s per GPU on {args.gpus}: "
        f"{pn['tokens_per_s_per_gpu'] / un['tokens_per_s_per_gpu']:.2f}x",
        f"- scaling efficiency 1 -> {args.gpus} GPUs (patched, tokens/s per GPU): "
        f"{pn['tokens_per_s_per_gpu'] / p1['tokens_per_s_per_gpu']:.0%}",
        f"- largest per-step loss gap: {args.gpus} vs 1 GPU {gap_1:.2e}, patched vs unpatched {gap_u:.2e}; "
        f"trained LoRA weights {args.gpus} vs 1 GPU {werr:.2e}",
    ]
    if pn.get("peak_gib_per_gpu") and un.get("peak_gib_per_gpu"):
        lines.append(
            f"- peak memory per GPU, patched / unpatched: {pn['peak_gib_per_gpu'] / un['peak_gib_per_gpu']:.0%}"
        )
    lines.append("- " + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)))
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
