"""Per-kernel GPU time of one LoRA fwd+bwd step, fusedlora vs PEFT, from torch.profiler (needs a GPU).

    python -m build_tools.profile_lora [MLP|QKV] [--nf4] [--cpu | --py | --shapes] [--warm=N]

Prints each implementation's kernels (summed over the step, largest first; --cpu: host time by op; --shapes:
GPU time by torch op and input shapes, to tell which GEMM a kernel is) so optimisation work can
target where the time goes. --warm=N runs N unprofiled steps first (default 3): kernel times under
sustained load, as a long benchmark or training run sees them (clocks drop as the GPU heats). Shapes and modules are the benchmark's (fusedlora.bench.lora_modules)."""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fusedlora.bench import LORA_SHAPES, lora_cases, lora_modules


def _steps(fn, x, grads, n):
    for _ in range(n):
        torch.autograd.backward(fn(x), grads)
    torch.cuda.synchronize()


def _profiled(fn, x, grads, steps, activities, warmup=3, **kwargs):
    """torch.profiler over `steps` fwd+bwd steps, after `warmup` unprofiled ones."""
    _steps(fn, x, grads, warmup)
    with profile(activities=activities, **kwargs) as prof:
        _steps(fn, x, grads, steps)
    return prof


def cpu_table(fn, x, grads, steps=5, top=30):
    """Host time per step by op (self CPU time): where launch-bound steps spend it."""
    prof = _profiled(fn, x, grads, steps, [ProfilerActivity.CPU], warmup=0)
    rows = [(e.key, e.self_cpu_time_total / steps, e.count // steps) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    print(f"  host self time {sum(r[1] for r in rows) / 1e3:.3f} ms per step (profiler overhead included)")
    for name, us, n in rows[:top]:
        print(f"  {us:9.1f} us  x{n:<3d} {name[:110]}")


def python_table(fn, x, grads, steps=50, top=25):
    """Python-level host time per step (cProfile, by own time)."""
    import cProfile
    import pstats
    _steps(fn, x, grads, 3)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        torch.autograd.backward(fn(x), grads)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def kernel_table(fn, x, grads, steps=5, top=25, warmup=3):
    prof = _profiled(fn, x, grads, steps, [ProfilerActivity.CUDA], warmup=warmup)
    rows = [(e.key, e.device_time_total / steps, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"  total kernel time {total / 1e3:.3f} ms per step")
    for name, us, n in rows[:top]:
        print(f"  {us:9.1f} us  x{n:<3d} {name[:110]}")


def shapes_table(fn, x, grads, steps=5, top=30, warmup=3):
    """GPU time per step by torch op and its input shapes (which matmul is which kernel)."""
    prof = _profiled(fn, x, grads, steps, [ProfilerActivity.CPU, ProfilerActivity.CUDA], warmup=warmup,
                     record_shapes=True)
    rows = [(e.key, str(e.input_shapes)[:90], e.self_device_time_total / steps, e.count // steps)
            for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    for name, shapes, us, n in rows[:top]:
        print(f"  {us:9.1f} us  x{n:<3d} {name[:28]:28s} {shapes}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    nf4 = "--nf4" in argv
    warm = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--warm=")), 3)
    works = [a for a in argv if not a.startswith("--")] or ["MLP", "QKV"]
    cases = lora_cases(lora_modules(nf4))
    x = torch.randn(4, LORA_SHAPES["tokens"] // 4, LORA_SHAPES["hidden"], device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    for work in works:
        peft_fn, ours_fn = cases[f"LoRA_{work}"]
        with torch.no_grad():
            grads = [torch.randn_like(t) for t in peft_fn(x)]
        for name, fn in (("PEFT", peft_fn), ("fusedlora", ours_fn)):
            print(f"\n== LoRA_{work} {'NF4' if nf4 else 'bf16'} base: {name}")
            if "--cpu" in argv:
                cpu_table(fn, x, grads)
            elif "--py" in argv:
                python_table(fn, x, grads)
            else:
                (shapes_table if "--shapes" in argv else kernel_table)(fn, x, grads, warmup=warm)


if __name__ == "__main__":
    main()
