"""Per-kernel GPU time of one LoRA fwd+bwd step, fusedlora vs PEFT, from torch.profiler (needs a GPU).

    python -m build_tools.profile_lora [MLP|QKV] [--nf4] [--cpu | --py | --shapes | --gaps | --energy] [--warm=N]

Prints each implementation's kernels (summed over the step, largest first; --cpu: host time by op; --shapes:
GPU time by torch op and input shapes, to tell which GEMM a kernel is; --gaps: each kernel of a CUDA-graph
replay in order with the idle time before it; --energy: time, energy and average power per step under
sustained replay, from NVML) so optimisation work can
target where the time goes. --warm=N runs N unprofiled steps first (default 3): kernel times under
sustained load, as a long benchmark or training run sees them (clocks drop as the GPU heats). Shapes and modules are the benchmark's (benchmarks.peers.lora_modules)."""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.peers import LORA_SHAPES, lora_cases, lora_modules


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
    rows = [
        (e.key, e.device_time_total / steps, e.count // steps) for e in prof.key_averages() if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"  total kernel time {total / 1e3:.3f} ms per step")
    for name, us, n in rows[:top]:
        print(f"  {us:9.1f} us  x{n:<3d} {name[:110]}")


def shapes_table(fn, x, grads, steps=5, top=30, warmup=3):
    """GPU time per step by torch op and its input shapes (which matmul is which kernel)."""
    prof = _profiled(
        fn, x, grads, steps, [ProfilerActivity.CPU, ProfilerActivity.CUDA], warmup=warmup, record_shapes=True
    )
    rows = [
        (e.key, str(e.input_shapes)[:90], e.self_device_time_total / steps, e.count // steps)
        for e in prof.key_averages(group_by_input_shape=True)
        if e.self_device_time_total > 0
    ]
    rows.sort(key=lambda r: -r[2])
    for name, shapes, us, n in rows[:top]:
        print(f"  {us:9.1f} us  x{n:<3d} {name[:28]:28s} {shapes}")


def captured(fn, warmup):
    """A CUDA graph of fn() captured on a side stream, after `warmup` eager calls and followed by `warmup`
    replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(warmup):
            graph.replay()
    torch.cuda.synchronize()
    return graph


def _captured_step(fn, x, grads, warmup):
    """A CUDA graph of one fwd+bwd step (as the benchmark's GPU time replays it), warmed up."""

    def step():
        torch.autograd.backward(fn(x), grads)
        x.grad = None

    return captured(step, warmup)


def gap_table(fn, x, grads, reps=20, warmup=3):
    """The step's CUDA graph replayed under the profiler: per kernel in launch order, its median duration and
    the idle time before it. Shows what the replay spends between kernels (launch gaps, dependent-kernel
    ramp-up), which a kernel-time sum leaves out."""
    import statistics

    graph = _captured_step(fn, x, grads, warmup)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    ks = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(ks) // reps
    if per == 0 or len(ks) % reps:
        print(f"  ({len(ks)} device events over {reps} replays: not one trace per replay)")
        return
    steps = [ks[i * per : (i + 1) * per] for i in range(reps)]
    wall = statistics.median(s[-1].time_range.end - s[0].time_range.start for s in steps)
    busy = statistics.median(sum(k.time_range.elapsed_us() for k in s) for s in steps)
    print(
        f"  replay: {wall / 1e3:.3f} ms first kernel start to last end, {busy / 1e3:.3f} ms in kernels, "
        f"{(wall - busy) / 1e3:.3f} ms between them ({per} kernels)"
    )
    for i in range(per):
        dur = statistics.median(s[i].time_range.elapsed_us() for s in steps)
        gap = statistics.median(s[i].time_range.start - s[i - 1].time_range.end for s in steps) if i else 0.0
        print(f"  {dur:8.1f} us  gap {gap:6.1f}  {steps[0][i].name[:100]}")


def graph_energy(graph, settle_s=2.0, measure_s=4.0):
    """(ms, joules, SM MHz at the end, power cap W) per replay of a CUDA graph replayed back to back: settle_s
    to reach the sustained power / clock state, then measure_s measured with NVML's energy counter."""
    import time

    import pynvml

    pynvml.nvmlInit()
    dev = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())  # (NVML ignores CUDA_VISIBLE_DEVICES)
    one = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    per_call = max(1, int(0.05 / max(time.perf_counter() - one, 1e-5)))  # replays per host sync: ~50 ms

    def run(seconds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(per_call):
                graph.replay()
            n += per_call
            torch.cuda.synchronize()
        return n

    run(settle_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(dev)
    start.record()
    n = run(measure_s)
    end.record()
    torch.cuda.synchronize()
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(dev)
    return (
        start.elapsed_time(end) / n,
        (e1 - e0) / 1e3 / n,
        pynvml.nvmlDeviceGetClockInfo(dev, pynvml.NVML_CLOCK_SM),
        pynvml.nvmlDeviceGetEnforcedPowerLimit(dev) / 1e3,
    )


def energy_table(fn, x, grads, warmup=3, settle_s=2.0, measure_s=4.0):
    """Time, energy and power per step over seconds of back-to-back graph replays (the benchmark's sustained
    load), from NVML's energy counter: on a power-capped GPU a step cannot run faster than its energy over
    the cap, whatever its cold kernel times."""
    ms, joules, sm, cap = graph_energy(_captured_step(fn, x, grads, warmup), settle_s, measure_s)
    print(
        f"  sustained: {ms:.3f} ms/step, {joules:.3f} J/step, {joules / ms * 1e3:.0f} W average (cap {cap:.0f} W), "
        f"SM clock {sm} MHz at the end; energy / cap = {joules / cap * 1e3:.3f} ms"
    )


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    nf4 = "--nf4" in argv
    warm = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--warm=")), 3)
    works = [a for a in argv if not a.startswith("--")] or ["MLP", "QKV"]
    cases = lora_cases(lora_modules(nf4))
    x = torch.randn(
        4, LORA_SHAPES["tokens"] // 4, LORA_SHAPES["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
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
            elif "--gaps" in argv:
                gap_table(fn, x, grads, warmup=warm)
            elif "--energy" in argv:
                energy_table(fn, x, grads, warmup=warm)
            else:
                (shapes_table if "--shapes" in argv else kernel_table)(fn, x, grads, warmup=warm)


if __name__ == "__main__":
    main()
