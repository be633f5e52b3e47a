"""Host time of one training step, measured on a CPU: the patched model of the 1B's topology (16 layers,
LoRA on 7 projections, QLoRA or LoRA) at tiny widths, the Triton kernels launched but not run (their CPU
path replaced by a no-op here), so what is timed is the Python and torch dispatch work a GPU step waits for
when it is host-bound. Prints ms per step (median), kernel launches and aten ops per step, and the top
functions by own time.

    python -m build_tools.host_overhead [--mode qlora|lora] [--variant fusedlora|hf] [--gc] [--graphs] [--top 30]
    python -m build_tools.host_overhead --compile-time [--mode lora]   # first compiled step, aot_eager on a CPU

With --gpu MODEL (1b or 8b; a CUDA GPU): the real step of that shape instead, its host side under cProfile (3
steady steps; kernels run): the functions with the most own time, which is where a host-bound step goes. With
--gpu MODEL --syncs [--graphs]: every host sync of one steady step, by call site (a sync idles the GPU).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import os
import pstats
import statistics
import time


@contextlib.contextmanager
def launched_not_run(launches: collections.Counter | None = None):
    """Kernels launched but not run (their CPU path a no-op, counted into `launches`), device-side asserts off
    (the kernels' outputs are garbage here; on a GPU it never waits) and one CPU thread (a GPU step's host
    side is one thread; CPU GEMM threads only add noise); all restored on exit."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from fusedlora import loader

    def skipped(self, grid, args, constexprs):  # the host's side of a launch only
        if launches is not None:
            launches[self.spec.name] += 1

    threads = torch.get_num_threads()
    original_cpu, original_assert = loader.KernelLauncher._cpu, torch._assert_async
    torch.set_num_threads(1)
    loader.KernelLauncher._cpu = skipped
    torch._assert_async = lambda *a, **k: None
    try:
        yield
    finally:
        loader.KernelLauncher._cpu, torch._assert_async = original_cpu, original_assert
        torch.set_num_threads(threads)


def measure(mode="qlora", variant="fusedlora", gc=False, steps=10, seq=64, profile_top=0, graphs=False) -> dict:
    """graphs: the decoder layers under fusedlora.cuda_graphs with fake graphs (fusedlora.testing.fake_cuda_graphs),
    captured in the first steps, then replays that do nothing: the host time a graphed step still takes."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusedlora import workload

    launches = collections.Counter()
    with contextlib.ExitStack() as stack:
        if graphs:
            from fusedlora import testing

            stack.enter_context(testing.fake_cuda_graphs())
        stack.enter_context(launched_not_run(launches))
        # as on a GPU: bf16 base weights, PEFT's fp32 adapters, bf16 autocast
        model, _ = workload.build("host", mode, variant, "cpu", gc, dtype=torch.bfloat16)
        if graphs:
            from fusedlora import cuda_graphs

            wrappers = cuda_graphs.graph_modules(
                [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")], warmup=1
            )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, workload.SHAPES["host"]["vocab_size"], (1, seq))

        def step(optimizer=True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if optimizer:  # (torch's CPU AdamW reads each step count with .item(): a GPU's fused one does not)
                opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        if graphs:
            if not all(w.replays for w in wrappers):
                raise RuntimeError(f"the layers did not replay: {[w.failed for w in wrappers][:1]}")
            stack.callback(setattr, testing.FakeCUDAGraph, "replay", testing.FakeCUDAGraph.replay)
            testing.FakeCUDAGraph.replay = lambda self: None  # the host's side only

        class CountOps(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = collections.Counter()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        launches.clear()
        with CountOps() as counted:
            step(optimizer=False)
        n_launches, top_launches = sum(launches.values()), launches.most_common(8)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        top = None
        if profile_top:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                step()
            prof.disable()
            top = prof
    return {
        "ms_per_step": statistics.median(times) * 1e3,
        "launches": n_launches,
        "aten_ops": sum(counted.ops.values()),
        "top_ops": counted.ops.most_common(12),
        "top_launches": top_launches,
        "profile": top,
    }


def gpu_step(model_shape="1b", mode="qlora", variant="fusedlora", graphs=False, batch=4, seq=2048):
    """A training step of the real shape on the GPU (bf16 autocast, fused AdamW, fresh random tokens once),
    after 3 warm-up steps (CUDA graphs captured by then when `graphs`)."""
    import torch

    import fusedlora
    from fusedlora import workload

    model, _ = workload.build(model_shape, mode, variant, "cuda", False)
    if graphs:
        fusedlora.cuda_graph_layers(model, warmup=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, workload.SHAPES[model_shape]["vocab_size"], (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def profile_gpu(model_shape="1b", mode="qlora", variant="fusedlora", top=40, batch=4, seq=2048):
    """cProfile of 3 steady training steps of the real shape on the GPU (the host side of a step as it runs)."""
    import torch

    step = gpu_step(model_shape, mode, variant, False, batch, seq)
    # Without cProfile: the host's time to issue a step (no sync inside) against the GPU's time for it. Issue
    # time close to the GPU time means the GPU waits for the host.
    issue, gpu = [], []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        issue.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3)
    print(
        f"{variant} {mode} {model_shape}: host issues a step in {statistics.median(issue) * 1e3:.1f} ms, "
        f"the GPU runs it in {statistics.median(gpu) * 1e3:.1f} ms (medians of 5)"
    )
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof.disable()
    print(
        f"{variant} {mode} {model_shape} on {torch.cuda.get_device_name()}: "
        f"{(time.perf_counter() - t0) / 3 * 1e3:.1f} ms per step under cProfile"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def sync_sites(stacks, skip=("site-packages/torch/", "<frozen", "warnings.py", "host_overhead.py")) -> list:
    """(count, site) per host-sync call site, most frequent first. A site: the innermost frame outside torch
    (and this tool) with the frame outside that one, and, when the sync itself happened deeper, inside torch,
    that innermost frame in brackets (a C++ sync under a torch Python function: the optimizer, backward...)."""
    import collections

    def where(f):
        return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"

    sites = collections.Counter()
    for stack in stacks:
        mine = [k for k, f in enumerate(stack) if not any(x in f.filename for x in skip)]
        site = ""
        if mine:
            inner = stack[mine[-1]]
            site = f"{where(inner)} in {inner.name}" + (f" <- {where(stack[mine[-2]])}" if len(mine) > 1 else "")
        if stack and (not mine or mine[-1] != len(stack) - 1):
            site += f" [{stack[-1].filename.split('site-packages/')[-1]}:{stack[-1].lineno} in {stack[-1].name}]"
        sites[site.strip()] += 1
    return [(n, site) for site, n in sites.most_common()]


def find_syncs(model_shape="1b", mode="qlora", variant="fusedlora", graphs=False, batch=4, seq=2048) -> list:
    """Every host sync of one steady training step of the real shape on the GPU (torch.cuda's sync debug mode,
    each warning's Python stack kept): sync_sites of them. A sync in a step leaves the GPU idle until the host
    catches up again."""
    import traceback
    import warnings

    import torch

    step = gpu_step(model_shape, mode, variant, graphs, batch, seq)
    stacks = []
    shown = warnings.showwarning

    def keep(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            while stack and stack[-1].filename.endswith("warnings.py"):  # (the warning machinery itself)
                stack.pop()
            stacks.append(stack)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = keep
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    torch.cuda.synchronize()
    return sync_sites(stacks)


COMPILE_VARIANTS = ("hf", "fusedlora", "compile_layers", "fusedlora_compile_layers")


def compile_time(variant: str, mode: str = "lora") -> float:
    """First training step (s) of the host-shape model under torch.compile with backend "aot_eager" on a CPU
    (Dynamo tracing and AOTAutograd, no Inductor code generation; kernels launched, not run): the
    backend-independent part of a first compiled step. "hf" / "fusedlora": torch.compile(model);
    "*compile_layers": fusedlora.compile_layers (each decoder layer). Run each variant in a fresh process."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import fusedlora
    from fusedlora import workload

    with launched_not_run():
        base = "fusedlora" if variant.startswith("fusedlora") else "hf"
        model, _ = workload.build("host", mode, base, "cpu", False, dtype=torch.bfloat16)
        if variant.endswith("compile_layers"):
            fusedlora.compile_layers(model, backend="aot_eager")
        else:
            model = torch.compile(model, backend="aot_eager")
        ids = torch.randint(0, workload.SHAPES["host"]["vocab_size"], (1, 64))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_tools.host_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("qlora", "lora"), default="qlora")
    ap.add_argument("--variant", choices=("fusedlora", "hf"), default="fusedlora")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="the decoder layers as (fake) CUDA graphs: what a graphed step's host side still does",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=0, help="print the N functions with the most own time")
    ap.add_argument("--gpu", choices=("1b", "8b"), default=None, help="profile the real shape's step on the GPU")
    ap.add_argument(
        "--compile-time",
        action="store_true",
        help="first compiled step (aot_eager, CPU) of HF / patched, whole model / compile_layers",
    )
    ap.add_argument(
        "--syncs",
        action="store_true",
        help="with --gpu: every host sync of one steady step, by call site (--graphs: the layers as real CUDA graphs)",
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(f"{compile_time(args.one, args.mode):.2f}")
        return 0
    if args.compile_time:
        import subprocess
        import sys

        times = {}
        for v in COMPILE_VARIANTS:
            r = subprocess.run(
                [sys.executable, "-m", "build_tools.host_overhead", "--mode", args.mode, "--one", v],
                capture_output=True,
                text=True,
                timeout=1200,
            )
            times[v] = float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")
            if r.returncode:
                print(f"{v} failed:\n" + "\n".join(r.stderr.strip().splitlines()[-6:]))
        for v, t in times.items():
            print(f"{args.mode} {v}: first compiled step {t:.1f} s ({t / times['hf']:.0%} of HF torch.compile(model))")
        return 0
    if args.gpu and args.syncs:
        sites = find_syncs(args.gpu, args.mode, args.variant, args.graphs)
        print(
            f"{args.variant}{' + cuda graphs' if args.graphs else ''} {args.mode} {args.gpu}: "
            f"{sum(n for n, _ in sites)} host syncs in one steady step"
        )
        for n, site in sites:
            print(f"  {n:4d}  {site}")
        return 0
    if args.gpu:
        profile_gpu(args.gpu, args.mode, args.variant, args.top or 40)
        return 0
    r = measure(args.mode, args.variant, args.gc, args.steps, profile_top=args.top, graphs=args.graphs)
    print(
        f"{args.variant}{' + cuda graphs' if args.graphs else ''} {args.mode} gc={args.gc}: "
        f"{r['ms_per_step']:.1f} ms host per step, "
        f"{r['launches']} Triton launches and {r['aten_ops']} aten ops in forward + backward"
    )
    print("most frequent aten ops:", ", ".join(f"{k} {v}" for k, v in r["top_ops"]))
    print("launches:", ", ".join(f"{k} {v}" for k, v in r["top_launches"]))
    if r["profile"] is not None:
        pstats.Stats(r["profile"]).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
