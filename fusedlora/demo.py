"""The training demo: fine-tune a Llama-shaped model (random weights, no downloads) on the Python standard
library's sources as byte tokens, once with HF+PEFT and once patched by fusedlora, each in a fresh process;
print tokens/s, peak memory, first-step time and the losses side by side, and plot them.

    python -m fusedlora.demo                       # GPU: 1B shape, QLoRA, batch 4 x 2048
    python -m fusedlora.demo --model 8b --lora --gc --packed --steps 40
On a machine with no GPU it runs the tiny shape under the Triton interpreter (slow, but the loss parity
shows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .workload import RunSpec, add_run_args, run_in_subprocess


def table(results, log_every: int = 1) -> str:
    ok = [r for r in results if "error" not in r]
    lines = ["| | " + " | ".join(r["variant"] for r in ok) + " |", "|---|" + "---|" * len(ok)]

    def row(name, fmt):
        lines.append(f"| {name} | " + " | ".join(fmt(r) for r in ok) + " |")

    row("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}")
    row("step ms", lambda r: f"{r['step_ms']:.1f}")
    row("peak GPU memory GiB", lambda r: "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}")
    row("first step s", lambda r: f"{r['first_step_s']:.2f}")
    if len(ok) >= 2:
        base = ok[0]
        row(f"speed vs {base['variant']}", lambda r: f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    n = min(len(r["losses"]) for r in ok) if ok else 0
    for i in sorted({*range(0, n, log_every), n - 1} if n else ()):
        row(f"loss @ step {i + 1}", lambda r, i=i: f"{r['losses'][i]:.4f}")
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['variant']}: failed ({r['error']})")
    return "\n".join(lines)


def plot(results, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in ok:
        axes[0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["variant"])
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[0].legend()
    names = [r["variant"] for r in ok]
    colors = ["#888", "#2a7", "#27a"][: len(ok)]
    speed = [r["tokens_per_s"] for r in ok]
    axes[1].bar_label(axes[1].bar(names, speed, color=colors), labels=[f"{v:,.0f}" for v in speed])
    axes[1].set(title="tokens / s (higher is better)")
    axes[1].margins(y=0.12)
    if all(r["peak_gib"] is not None for r in ok):
        peak = [r["peak_gib"] for r in ok]
        axes[2].bar_label(axes[2].bar(names, peak, color=colors), labels=[f"{v:.2f}" for v in peak])
        axes[2].set(title="peak GPU memory GiB (lower is better)")
        axes[2].margins(y=0.12)
    else:
        axes[2].axis("off")
    r0 = ok[0] if ok else {}
    fig.suptitle(
        f"{r0.get('model')} {r0.get('mode')} batch {r0.get('batch')} x {r0.get('seq')}"
        f"{' gc' if r0.get('gc') else ''}{' packed' if r0.get('packed') else ''} on {r0.get('device')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    import torch

    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(
        prog="python -m fusedlora.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_args(ap, steps=40 if gpu else 12, batch=4 if gpu else 2, seq=2048 if gpu else 64)
    ap.set_defaults(model="1b" if gpu else "tiny", log_every=5 if gpu else 3)
    ap.add_argument("--out", default="fusedlora_demo", help="folder for demo.png, demo.md and demo.json")
    ap.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="a third run: patched and each decoder layer replayed as CUDA graphs (fusedlora.cuda_graph_layers)",
    )
    args = ap.parse_args(argv)
    env = {}
    if not gpu:
        if args.model != "tiny":
            ap.error(f"--model {args.model} needs a CUDA GPU; this machine has none (use --model tiny)")
        if args.cuda_graphs:
            ap.error("--cuda-graphs needs a CUDA GPU; this machine has none")
        env["TRITON_INTERPRET"] = "1"
        print(
            "No CUDA GPU: running the tiny shape on the CPU under the Triton interpreter (kernels are "
            "emulated, so fusedlora is slower here; the point is the loss parity).",
            file=sys.stderr,
        )
    results = []
    for variant in ("hf", "fusedlora") + (("fusedlora_graphs",) if args.cuda_graphs else ()):
        print(
            f"[{variant}] {args.model} {args.mode}, batch {args.batch} x {args.seq}, {args.steps} steps "
            "(fresh process)",
            file=sys.stderr,
        )
        results.append(run_in_subprocess(RunSpec.from_args(args, variant=variant), env))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, args.log_every)
    patched = next((r.get("patch") for r in results if r.get("patch")), None)
    print(md)
    if patched:
        print("\n" + patched["table"])
    (out / "demo.md").write_text(md + "\n")
    (out / "demo.json").write_text(json.dumps(results, indent=1))
    if plot(results, out / "demo.png"):
        print(f"\nplot: {out / 'demo.png'}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
