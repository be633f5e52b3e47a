"""Which part of a decoder layer's training call can be captured as a CUDA graph: one layer of the tiny Llama
(HF+PEFT, or patched by fusedlora), its forward alone or forward and backward, per SDPA backend and capture
mode, each case in its own process (a failed capture can leave the allocator recording). Prints OK or the
first error with its traceback's tail. Needs a CUDA GPU.

    python -m build_tools.cuda_graph_probe [--cases all|NAME,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback

CASES = {}
for variant in ("hf", "fusedlora"):
    CASES[f"{variant}-default-fwd-thread_local"] = (variant, "default", "fwd", "thread_local")
    for sdpa in ("default", "flash", "math"):  # (SDPA's efficient backend had no kernel for these inputs)
        CASES[f"{variant}-{sdpa}-fwdbwd-thread_local"] = (variant, sdpa, "fwdbwd", "thread_local")
for mode in ("global", "relaxed"):
    CASES[f"fusedlora-default-fwdbwd-{mode}"] = ("fusedlora", "default", "fwdbwd", mode)
CASES["fusedlora-default-make_graphed_callables-global"] = ("fusedlora", "default", "mgc", "global")


def one(variant, sdpa, phase, mode):
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fusedlora import workload

    model, _ = workload.build("tiny", "lora", variant, "cuda", False)
    layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    hf = next(m for m in model.modules() if type(m).__name__ == "LlamaModel")
    x = torch.randn(2, 64, hf.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(64, device="cuda")[None].expand(2, -1)
    cos, sin = hf.rotary_emb(x, pos)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}.get(sdpa)
    ctx = sdpa_kernel(backend) if backend else contextlib.nullcontext()
    params = [p for p in layer.parameters() if p.requires_grad]

    def call(h):
        return layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)

    with ctx, torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        for _ in range(2):  # eager warm-up on the default stream, as training's first steps
            call(x).float().sum().backward()
        if phase == "mgc":

            class Wrap(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.layer = layer

                def forward(self, h):
                    return call(h)

            g = torch.cuda.make_graphed_callables(Wrap(), (x.detach().clone().requires_grad_(),))
            g(x).float().sum().backward()
            torch.cuda.synchronize()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = call(x)
            torch.autograd.grad(out, [x] + params, torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        fwd = torch.cuda.CUDAGraph()
        static = x.detach().clone().requires_grad_()
        with torch.cuda.graph(fwd, pool=pool, capture_error_mode=mode):
            out = call(static)
        fwd.replay()
        if phase == "fwdbwd":
            bwd = torch.cuda.CUDAGraph()
            gout = torch.ones_like(out)
            with torch.cuda.graph(bwd, pool=pool, capture_error_mode=mode):
                torch.autograd.grad(out, [static] + params, gout, retain_graph=True, allow_unused=True)
            bwd.replay()
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_tools.cuda_graph_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="all")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("build_tools.cuda_graph_probe: needs a CUDA GPU (CUDA graphs); this machine has none", file=sys.stderr)
        return 2
    if args.one:
        try:
            one(*CASES[args.one])
        except Exception:  # noqa: BLE001 - the probe's report
            print("".join(traceback.format_exc().splitlines(True)[-14:]))
            return 1
        print("OK")
        return 0
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    for name in names:
        r = subprocess.run(
            [sys.executable, "-m", "build_tools.cuda_graph_probe", "--one", name],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [l for l in r.stdout.strip().splitlines() if l.strip()]
        verdict = "OK" if r.returncode == 0 else "FAILED"
        print(f"{name}: {verdict}")
        if r.returncode:
            print("    " + "\n    ".join(lines[-14:] or r.stderr.strip().splitlines()[-8:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
