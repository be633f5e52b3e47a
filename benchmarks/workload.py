"""The benchmarks' workload: fusedlora.workload's run (the demo's, installed) plus what only measurements need -
the peers (Liger-Kernel's patches, Unsloth from its own folder), the step profile under torch.profiler, what
autograd saves, and the longest-sequence search. Each variant runs in a fresh process:
`python -m benchmarks.workload --variant ...` (from a checkout: benchmarks/ is not installed). The MoE shapes
(Qwen3-30B-A3B, Mixtral-8x7B layers) are benchmarks/moe.py's."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

from fusedlora import workload

from . import moe

VARIANTS = workload.VARIANTS + ("liger", "unsloth")  # unsloth: where it is installed (its gradient checkpointing
UNSLOTH_PATH = "FUSEDLORA_UNSLOTH_PATH"  # is its own, offloaded one); a folder with Unsloth and its packages
PEERS = ("liger_kernel", "unsloth")  # (python -m build_tools.peer_bundle)
CHECKOUT = str(Path(__file__).resolve().parent.parent)


@dataclasses.dataclass(frozen=True)
class BenchSpec(workload.RunSpec):
    """A benchmark run: the workload's options and the measurements' own (add_bench_args)."""

    profile: int = 0  # after the timed steps, this many more under torch.profiler (GPU)
    peak_tflops: float = 790.0  # the GEMM peak the profile compares with
    saved: bool = False  # one more step listing what autograd saves for the backward
    find_context: int = 0  # instead of timed steps: the longest sequence (batch 1, up to this) that fits
    context_step: int = 1024  # find_context's length granularity
    layers: int = 0  # a MoE shape's decoder layers (0: the shape's own count, benchmarks/moe.py)

    def check(self) -> None:
        super().check()
        if moe.is_moe(self.model):
            moe.layer_count(self.model, self.layers)
            if self.variant not in moe.MOE_VARIANTS:
                raise SystemExit(
                    f"the MoE shape {self.model!r} runs the variants {', '.join(moe.MOE_VARIANTS)}; "
                    f"got {self.variant!r}"
                )
        elif self.layers:
            raise SystemExit(
                f"--layers is for the MoE shapes ({', '.join(moe.MOE_SHAPES)}); {self.model!r} has its own layer count"
            )


def add_bench_args(ap, **defaults):
    workload.add_run_args(ap, **defaults)
    for action in ap._actions:  # the workload's --model lists its Llama shapes: the MoE shapes are ours
        if action.dest == "model":
            action.choices = sorted(set(action.choices) | set(moe.MOE_SHAPES))
    ap.add_argument(
        "--layers",
        type=int,
        default=0,
        help="a MoE shape's decoder layers (default: the shape's "
        "own: " + ", ".join(f"{k} {v.layers}" for k, v in moe.MOE_SHAPES.items()) + ")",
    )
    ap.add_argument(
        "--find-context",
        type=int,
        default=0,
        metavar="MAX",
        help="instead of timed steps: the longest sequence (batch 1, up to MAX) whose step fits",
    )
    ap.add_argument("--context-step", type=int, default=1024, help="--find-context's length granularity")
    ap.add_argument("--profile", type=int, default=0, help="after the timed steps, N more under torch.profiler (GPU)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the GEMM peak the profile compares with")
    ap.add_argument(
        "--saved",
        action="store_true",
        help="after the timed steps, one more step listing what "
        "autograd saves for the backward (total and largest groups)",
    )


def _unsloth_on_path(first: bool):
    path = os.environ.get(UNSLOTH_PATH)
    if path and path not in sys.path:
        if first:
            sys.path.insert(0, path)
        else:
            sys.path.append(path)


def unsloth_findable() -> bool:
    """Whether Unsloth is installed or in $FUSEDLORA_UNSLOTH_PATH: found, not imported (importing it patches
    transformers)."""
    import importlib.util

    _unsloth_on_path(first=False)
    return importlib.util.find_spec("unsloth") is not None


def _import_unsloth_first():
    """Unsloth patches transformers and PEFT when imported, so it comes first in its own process. Its per-layer
    torch.compile is off: on torch 2.11 it made its step slower and its first step 26-36 s (H200, 2026-12-01)."""
    _unsloth_on_path(first=True)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_BLOCK_COMPILE", "0")
    import unsloth  # noqa: F401


def _apply_liger(model):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
    )


def _unsloth_checkpoint(make_model, seed) -> str:
    """A folder holding `make_model()` (random weights, made on the GPU) and a trivial tokenizer (Unsloth always
    loads one), for Unsloth's loader; the model itself is freed."""
    import atexit
    import shutil
    import tempfile

    import torch
    import transformers
    from tokenizers import Tokenizer, models

    folder = tempfile.mkdtemp(prefix="fusedlora_unsloth_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # (a MoE checkpoint is 11 GB; one per run)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = make_model()
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(folder)
    return folder


def _build_unsloth(shape, mode, gc, seed, dtype):
    """The same random Llama, saved and loaded through FastLanguageModel (its NF4 through bitsandbytes for
    QLoRA), LoRA r16 on the same projections."""
    import transformers
    from unsloth import FastLanguageModel

    folder = _unsloth_checkpoint(lambda: transformers.LlamaForCausalLM(workload._config(shape)).to(dtype), seed)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder, max_seq_length=131072, dtype=dtype, load_in_4bit=mode == "qlora", local_files_only=True
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=workload.TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth" if gc else False,
        random_state=seed + 1,
    )


def _build_unsloth_moe(shape, layers, mode, gc, seed, dtype):
    """Unsloth's MoE path: the same random MoE model, saved (transformers writes the per-expert checkpoint
    layout, as the published models are) and loaded through FastModel, which FastLanguageModel hands
    qwen3_moe and mixtral to: unsloth_zoo's patches run the experts as grouped GEMMs with the LoRA kept apart
    from the frozen stacks, and its QLoRA quantises the 3-D experts to NF4 too (transformers' bitsandbytes loader
    would not). LoRA r16 on attention and, through target_parameters, on the experts."""
    from unsloth import FastModel

    folder = _unsloth_checkpoint(lambda: moe.random_model(shape, layers, "cuda", dtype, seed), seed)
    checkpointing = "unsloth" if gc else False
    longest = moe.moe_config(shape).max_position_embeddings
    model, _ = FastModel.from_pretrained(
        model_name=folder,
        max_seq_length=longest,
        dtype=dtype,
        load_in_4bit=mode == "qlora",
        local_files_only=True,
        use_gradient_checkpointing=checkpointing,
    )
    return FastModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=moe.ATTENTION_TARGETS,
        target_parameters=moe.EXPERT_TARGETS,
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=seed + 1,
    )


def build(shape, mode, variant, device, gc, seed=0, offload=False, dtype=None, patch_options=None, layers=0):
    """fusedlora.workload.build, plus the peers: liger (HF+PEFT with Liger's Llama patches), unsloth; and the
    MoE shapes (benchmarks/moe.py; `layers`: their decoder layers, 0 for the shape's own)."""
    import torch

    if variant == "unsloth":
        if device != "cuda":
            raise SystemExit("the unsloth variant needs a CUDA GPU")
        _import_unsloth_first()  # (before transformers)
        if moe.is_moe(shape):
            model = _build_unsloth_moe(shape, layers, mode, gc, seed, dtype or torch.bfloat16)
        else:
            model = _build_unsloth(shape, mode, gc, seed, dtype or torch.bfloat16)
        model.train()
        return model, None
    if moe.is_moe(shape):
        return moe.build(shape, mode, variant, device, gc, seed, offload, dtype, patch_options, layers)
    if variant == "liger":
        return workload.build(
            shape, mode, "hf", device, gc, seed, offload, dtype, patch_options, prepare_base=_apply_liger
        )
    return workload.build(shape, mode, variant, device, gc, seed, offload, dtype, patch_options)


def run(spec: BenchSpec) -> dict:
    """One benchmark run in this process: the workload's timed steps, then the profile and the saved
    activations when asked; or, with find_context, the context search instead of timed steps."""
    t = workload.setup(spec, build_model=functools.partial(build, layers=spec.layers))
    on_gpu = t.device == "cuda"
    shape = {}  # a MoE run's layer count and how its experts are stored
    if moe.is_moe(spec.model):
        shape = {"layers": moe.layer_count(spec.model, spec.layers), "experts": moe.experts_storage(t.model)}
    if spec.find_context:
        return {
            "variant": spec.variant,
            "mode": spec.mode,
            "model": spec.model,
            "gc": spec.gc,
            "offload": spec.offload,
            **shape,
            **find_context(
                t.model,
                t.optimizer,
                t.autocast,
                vocab_size(spec.model),
                t.device,
                spec.find_context,
                spec.seq,
                spec.context_step,
            ),
            "versions": versions(),
            "device": workload.device_name(on_gpu),
        }
    data = workload.batches(spec.steps, spec.batch, spec.seq, spec.packed, t.device)
    clock = StepClock(data, on_gpu)
    result = workload.train(t, clock)
    result.update(shape)
    result.update(clock.median_rate(first_timed=min(2, spec.steps - 1), tokens_per_step=spec.batch * spec.seq))
    result["versions"] = versions()
    result["profile"] = None  # [(family, ms per step, share, note)] under torch.profiler, or None
    if spec.profile and on_gpu:
        from . import step_profile

        kernels, gemm_ops, wall_us = step_profile.profile_steps(lambda: workload.train_step(t, *data[-1]), spec.profile)
        result["profile"] = step_profile.summarize(kernels, gemm_ops, spec.profile, wall_us, spec.peak_tflops)
    result["saved"] = None  # what autograd keeps for the backward (--saved), or None
    if spec.saved:
        ids, labels, pos = data[-1]
        result["saved"] = saved_activations(
            lambda: t.model(input_ids=ids, labels=labels, position_ids=pos).loss, t.autocast
        )
        t.optimizer.zero_grad(set_to_none=True)
    return result


def vocab_size(shape: str) -> int:
    return moe.MOE_SHAPES[shape].config["vocab_size"] if moe.is_moe(shape) else workload.SHAPES[shape]["vocab_size"]


class StepClock:
    """A run's batches, marking each step's start as the training loop takes its batch, and the last step's end:
    a CUDA event recorded on the stream (no host sync inside the steps, as in the loop itself), or the host
    clock without a GPU. After the loop has synchronised, median_rate() gives the median step's time."""

    def __init__(self, batches, on_gpu: bool):
        self.batches, self.on_gpu, self.marks = batches, on_gpu, []

    def _mark(self):
        if self.on_gpu:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __iter__(self):
        for batch in self.batches:
            self._mark()
            yield batch
        self._mark()

    def step_ms(self) -> list[float]:
        if self.on_gpu:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]

    def median_rate(self, first_timed: int, tokens_per_step: int) -> dict:
        """The median of the steps from `first_timed` on (the training loop's untimed warm-up before it) and its
        tokens/s; every step's ms for the raw report."""
        every = self.step_ms()
        median = statistics.median(every[first_timed:])
        return {"step_ms_median": median, "tokens_per_s_median": tokens_per_step / median * 1e3, "step_ms_each": every}


def versions() -> dict:
    """The workload's versions and the peers' (Unsloth only where this process imported it: importing it
    would patch transformers)."""
    peers = [p for p in PEERS if p != "unsloth" or p in sys.modules]
    return workload.versions(("torch", "triton", "transformers", "peft", "bitsandbytes", *peers))


def saved_activations(loss_fn, autocast, top: int = 12) -> dict:
    """What autograd keeps for one step's backward: the total over distinct storages, and the largest
    groups of saved tensors by (shape, dtype) with how many storages each (one forward under
    saved_tensors_hooks, then its backward)."""
    import torch

    storages: dict = {}

    def pack(t):
        st = t.untyped_storage()
        storages.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", "")))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = loss_fn()
    loss.backward()
    groups: dict = {}
    for nbytes, shape, dtype in storages.values():
        g = groups.setdefault((shape, dtype), [0, 0])
        g[0] += 1
        g[1] += nbytes
    largest = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "gib": sum(v[0] for v in storages.values()) / 2**30,
        "largest": [
            {"shape": list(shape), "dtype": dtype, "storages": n, "gib": b / 2**30}
            for (shape, dtype), (n, b) in largest
        ],
    }


def search_longest(fits, start: int, limit: int, granularity: int):
    """The longest length in [start, limit] for which fits(length) (a result, or None when it does not fit):
    doubling from start, then bisection to `granularity`. Returns (length, its result, [(length, fitted)])
    with length 0 when not even `start` fits."""
    tried, best, best_r, bad = [], 0, None, None
    n = start
    while n <= limit:
        r = fits(n)
        tried.append((n, r is not None))
        if r is None:
            bad = n
            break
        best, best_r = n, r
        if n == limit:
            break
        n = min(limit, 2 * n)
    if best == 0:
        return 0, None, tried
    while bad is not None and bad - best > granularity:
        mid = (best + bad) // 2 // granularity * granularity
        if mid <= best:
            break
        r = fits(mid)
        tried.append((mid, r is not None))
        if r is None:
            bad = mid
        else:
            best, best_r = mid, r
    return best, best_r, tried


def find_context(model, opt, autocast, vocab, device, limit, start=1024, granularity=1024):
    """The longest sequence (batch 1) whose training step fits on this GPU: search_longest over lengths
    (multiples of `granularity`), two steps per length (the second timed); an out-of-memory error means "does
    not fit" and its memory is freed before the next try. `rates`: tokens/s at every length that fitted."""
    import gc as pygc

    import torch

    on_gpu = device == "cuda"

    rates = {}

    def fits(seq):
        oom = False
        try:
            ids = torch.randint(0, vocab, (1, seq), device=device)
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for step in range(2):
                if step == 1:
                    workload._sync(on_gpu)
                    t0 = time.perf_counter()
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            workload._sync(on_gpu)
            dt = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            oom = True  # (the exception's frames hold the step's tensors: freed after the except block)
        if oom:
            opt.zero_grad(set_to_none=True)
            pygc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            return None
        rates[seq] = seq / dt
        return {"tokens_per_s": seq / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}

    longest, result, tried = search_longest(fits, start, limit, granularity)
    return {
        "longest": longest,
        **(result or {"tokens_per_s": None, "peak_gib": None}),
        "tried": tried,
        "rates": sorted(rates.items()),
    }


def run_in_subprocess(spec: BenchSpec, extra_env=None) -> dict:
    """One benchmark run in a fresh `python -m benchmarks.workload` process, this checkout importable after
    whatever PYTHONPATH already names (the installed wheel first, say)."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), CHECKOUT) if p)
    r = workload.run_in_subprocess(spec, {"PYTHONPATH": path, **(extra_env or {})}, module="benchmarks.workload")
    if moe.is_moe(spec.model) and "error" in r:  # (a failed run's row stays beside its shape's others)
        r["layers"] = moe.layer_count(spec.model, spec.layers)
    return r


def main(argv=None):
    workload.main(
        argv,
        variants=VARIANTS,
        spec_type=BenchSpec,
        add_args=add_bench_args,
        run_spec=run,
        prog="python -m benchmarks.workload",
    )


if __name__ == "__main__":
    main()
