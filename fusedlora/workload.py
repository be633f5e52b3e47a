"""One fine-tuning run of one variant in this process: the workload behind `fusedlora.demo` (each variant runs
in a fresh process: `python -m fusedlora.workload --variant ...`). The repository's benchmarks/ (not installed)
extend it with the peer libraries, profiling and the context search.

A Llama-shaped model with random weights (no downloads), LoRA r16 on all seven projections (QLoRA: NF4
bitsandbytes bases, as HF's bitsandbytes loader makes them), bf16 autocast as the HF Trainer's bf16=True,
fused AdamW on the adapters, SDPA attention. The text is the Python standard library's own sources as byte
tokens, so the loss shows real learning. Timing follows the HF Trainer: no host sync inside a step except
at logging steps. Prints one JSON line (prefixed RESULT) with throughput, memory, first step and losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

# *compile: torch.compile(model); *compile_layers: each decoder layer compiled (fusedlora.compile_layers);
# *_ro: the same under mode="reduce-overhead" (torch.compile's CUDA graphs); fusedlora_graphs: each decoder
# layer replayed as CUDA graphs (fusedlora.cuda_graph_layers)
VARIANTS = (
    "hf",
    "compile",
    "compile_layers",
    "fusedlora",
    "fusedlora_compile",
    "fusedlora_compile_layers",
    "fusedlora_compile_layers_ro",
    "fusedlora_graphs",
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B shapes; "tiny" runs under the Triton interpreter on a CPU
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=384,
        tie_word_embeddings=True,
    ),
    # the 1B's topology (16 layers, GQA, tied head) at tiny widths: host time per step (build_tools/host_overhead)
    "host": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def text_tokens(n_tokens: int):
    """The first n_tokens bytes of the standard library's .py sources (sorted paths), as a 1-d int64 tensor
    of byte values, plus the document start offsets (one document per file)."""
    import torch

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, starts, total = [], [], 0
    for path in sorted(root.rglob("*.py")):
        if total >= n_tokens:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        starts.append(total)
        chunks.append(data[: n_tokens - total])
        total += len(chunks[-1])
    buf = bytearray(b"".join(chunks))
    if len(buf) < n_tokens:  # a tiny stdlib: repeat it
        buf = (buf * (n_tokens // max(1, len(buf)) + 1))[:n_tokens]
    return torch.frombuffer(buf, dtype=torch.uint8).to(torch.int64), starts


def batches(steps, bsz, seq, packed, device):
    """Per step: (input_ids, labels, position_ids or None). Packed: position_ids restart at each document
    (TRL's padding_free layout, no attention mask) and the first token of a document is not predicted."""
    import torch

    tokens, starts = text_tokens(steps * bsz * seq)
    restart = torch.zeros(tokens.numel(), dtype=torch.bool)
    restart[torch.tensor(starts, dtype=torch.int64)] = True
    out = []
    for s in range(steps):
        rows = slice(s * bsz * seq, (s + 1) * bsz * seq)
        ids = tokens[rows].view(bsz, seq)
        labels = ids.clone()
        pos = None
        if packed:
            r = restart[rows].view(bsz, seq).clone()
            r[:, 0] = True
            idx = torch.arange(seq).expand(bsz, seq)
            last_start = torch.where(r, idx, torch.zeros_like(idx)).cummax(1).values
            pos = idx - last_start
            labels[r] = -100  # HF shifts labels: no prediction across a document boundary
            pos = pos.to(device)
        out.append((ids.to(device), labels.to(device), pos))
    return out


def quantize_linears_nf4(model, compute_dtype, quant_storage=None):
    """Every nn.Linear in the decoder layers becomes a bitsandbytes NF4 Linear4bit (double-quant, blocksize
    64), as transformers' bitsandbytes integration builds them; the LM head and embeddings stay 16-bit.
    quant_storage (default uint8): the packed weight's dtype (a float dtype for FSDP, as QLoRA-FSDP does)."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is not torch.nn.Linear:
                    continue
                device = lin.weight.device
                storage = {} if quant_storage is None else {"quant_storage": quant_storage}
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=lin.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",
                    **storage,
                )
                q.weight = bnb.nn.Params4bit(
                    lin.weight.data,
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                    blocksize=64,
                    module=q,
                    **storage,
                )
                if lin.bias is not None:
                    q.bias = lin.bias
                setattr(parent, name, q.to(device))
                del lin
    return model


def _config(shape):
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def enable_checkpointing(model):
    """HF's non-reentrant activation checkpointing on every decoder layer, with inputs that require grad:
    activation_checkpointing_enable where transformers has it (5.25; gradient_checkpointing_enable, its
    deprecated alias there, goes in v6), else gradient_checkpointing_enable."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def build(shape, mode, variant, device, gc, seed=0, offload=False, dtype=None, patch_options=None, prepare_base=None):
    """The model of one run, in train mode, and fusedlora.patch's report (None when not patched).
    prepare_base: applied to the base model before checkpointing and PEFT (where a benchmark's peer patches it)."""
    if variant not in VARIANTS:  # (a peer's name would otherwise build plain HF+PEFT under its label)
        raise ValueError(
            f"fusedlora.workload.build: variant {variant!r} is not one of {', '.join(VARIANTS)} (the "
            "peer libraries' variants are in the repository's benchmarks/workload.py)"
        )
    import torch

    on_gpu = device == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = _config(shape)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if mode == "qlora":
        quantize_linears_nf4(model, dtype)
    if on_gpu:  # the fp32 random init and its cast, which loading a checkpoint does not do: every variant's
        torch.cuda.empty_cache()  # reserved memory is then its training's (8B: 26 GiB of cached init blocks)
    if prepare_base is not None:
        prepare_base(model)
    if gc:
        enable_checkpointing(model)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    report = None
    if variant.startswith("fusedlora"):
        import fusedlora

        t0 = time.perf_counter()
        report = fusedlora.patch(model, offload_checkpoints=offload, **(patch_options or {}))
        report = {"seconds": time.perf_counter() - t0, "table": str(report), **report.as_dict()}
    if variant in ("compile", "fusedlora_compile"):
        model = torch.compile(model)
    elif variant in ("compile_layers", "fusedlora_compile_layers", "fusedlora_compile_layers_ro"):
        import fusedlora

        fusedlora.compile_layers(model, **({"mode": "reduce-overhead"} if variant.endswith("_ro") else {}))
    elif variant == "fusedlora_graphs":
        import fusedlora

        fusedlora.cuda_graph_layers(model, warmup=1)  # captured in the second (untimed) step
    model.train()
    return model, report


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the workload: its command-line options (add_run_args) as typed fields. `to_argv` gives the
    command line of `python -m fusedlora.workload` for it: every field is the option of its name (mode: --qlora
    or --lora), so a subclass with more fields (benchmarks/workload.py's) passes them on unchanged."""

    variant: str = "fusedlora"
    model: str = "1b"
    mode: str = "qlora"
    steps: int = 20
    batch: int = 4
    seq: int = 2048
    gc: bool = False
    offload: bool = False
    packed: bool = False
    lr: float = 1e-3
    log_every: int = 5
    patch_options: dict = dataclasses.field(default_factory=dict)  # fusedlora.patch's keyword arguments

    @classmethod
    def from_args(cls, args, **overrides):
        """The spec of parsed options (an argparse.Namespace of add_run_args, --patch-options as JSON text);
        the fields that `args` lacks keep their defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        options = values.get("patch_options")
        if isinstance(options, str):
            try:
                values["patch_options"] = json.loads(options) if options.strip() else {}
            except json.JSONDecodeError as e:
                raise SystemExit(
                    f"--patch-options: expected a JSON object of fusedlora.patch keyword arguments, "
                    f"got {options!r} ({e})"
                ) from None
        if not isinstance(values.get("patch_options", {}), dict):
            raise SystemExit(
                f"--patch-options: expected a JSON object of fusedlora.patch keyword arguments, got {options!r}"
            )
        return cls(**values)

    def to_argv(self) -> list[str]:
        argv = []
        for f in dataclasses.fields(self):
            value, option = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.name == "mode":
                argv.append(f"--{value}")
            elif isinstance(value, bool):
                argv += [option] if value else []
            elif isinstance(value, dict):
                argv += [option, json.dumps(value)] if value else []
            else:
                argv += [option, str(value)]
        return argv

    def check(self) -> None:
        """Options that the variant cannot honour are refused in the user's terms (not silently ignored)."""
        if self.offload and not self.variant.startswith("fusedlora"):
            raise SystemExit("--offload is fusedlora's offloaded checkpointing: only for the fusedlora variants")
        if self.patch_options and not self.variant.startswith("fusedlora"):
            raise SystemExit("--patch-options are fusedlora.patch's keyword arguments: only for the fusedlora variants")


@dataclasses.dataclass
class Training:
    """What setup() built for a run: the model, its optimizer and autocast, on `device`."""

    spec: RunSpec
    model: object
    patch_report: dict | None
    optimizer: object
    autocast: object
    device: str
    started: float  # time.perf_counter() at the run's start


def setup(spec: RunSpec, build_model=build) -> Training:
    """The run's model (`build_model`, build's signature), its AdamW and autocast; with no GPU, the Triton
    interpreter is switched on first."""
    started = time.perf_counter()
    import torch

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:  # before any kernel module is imported: triton.jit reads it then
        os.environ.setdefault("TRITON_INTERPRET", "1")
    spec.check()
    model, report = build_model(
        spec.model, spec.mode, spec.variant, device, spec.gc, offload=spec.offload, patch_options=spec.patch_options
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, fused=on_gpu)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    return Training(spec, model, report, opt, autocast, device, started)


def train_step(t: Training, ids, labels, pos):
    """One optimizer step; returns the loss (on the device: no host sync)."""
    with t.autocast:
        loss = t.model(input_ids=ids, labels=labels, position_ids=pos).loss
    loss.backward()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train(t: Training, data) -> dict:
    """The timed steps over `data` (batches()): the run's result (throughput, memory, first step, losses)."""
    import torch

    spec, on_gpu = t.spec, t.device == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, logged, first_step_s, t_window, warmup_peak = [], [], None, None, 0
    warmup = min(2, spec.steps - 1)
    bar = _progress(spec.steps, f"{spec.variant} {spec.mode} {spec.model}")
    for step, (ids, labels, pos) in enumerate(data):
        if step == warmup:
            _sync(on_gpu)
            t_window = time.perf_counter()
            if on_gpu:  # the timed steps' own peak, apart from the first steps' (CUDA-graph capture, say)
                warmup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        losses.append(train_step(t, ids, labels, pos))
        if step == 0:
            _sync(on_gpu)
            first_step_s = time.perf_counter() - t0
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
            logged.extend(float(l) for l in losses[len(logged) :])  # the logging step's host sync
            bar.set_postfix(loss=f"{logged[-1]:.3f}")
        bar.update(1)
    _sync(on_gpu)
    t_end = time.perf_counter()
    bar.close()
    timed_steps = spec.steps - warmup
    from . import loader
    from .ops._common import interpreting

    return {
        "variant": spec.variant,
        "mode": spec.mode,
        "model": spec.model,
        "gc": spec.gc,
        "offload": spec.offload,
        "packed": spec.packed,
        "batch": spec.batch,
        "seq": spec.seq,
        "steps": spec.steps,
        "tokens_per_s": timed_steps * spec.batch * spec.seq / (t_end - t_window),
        "step_ms": (t_end - t_window) / timed_steps * 1e3,
        "first_step_s": first_step_s,
        "process_s": t_end - t.started,
        "peak_gib": max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30 if on_gpu else None,
        "steady_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        # what the process holds from the GPU at most (CUDA-graph pools included: a replay allocates nothing,
        # so allocated-memory statistics do not see the memory a graph reuses)
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        "losses": logged,  # every step's loss, read at the logging steps
        "fusedlora_jit_kernels": loader.get_loader().stats.get("jit", 0)
        if spec.variant.startswith("fusedlora")
        else None,
        "fusedlora_jit_variants": list(loader.get_loader().jit_variants)
        if spec.variant.startswith("fusedlora")
        else None,
        "fusedlora_jit_callers": list(loader.get_loader().jit_callers)
        if spec.variant.startswith("fusedlora")
        else None,
        "patch": t.patch_report,
        "versions": versions(),
        "device": device_name(on_gpu),
        "interpreter": interpreting(),
        "patch_options": spec.patch_options,
    }


def run(spec: RunSpec) -> dict:
    """One whole run in this process: setup, then the timed steps on the standard library's text."""
    t = setup(spec)
    return train(t, batches(spec.steps, spec.batch, spec.seq, spec.packed, t.device))


def device_name(on_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if on_gpu else "cpu"


def _sync(on_gpu):
    if on_gpu:
        import torch

        torch.cuda.synchronize()


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:  # tqdm is optional: a no-op bar

        class _Bar:
            def update(self, n):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass

        return _Bar()


def versions(packages=("torch", "triton", "transformers", "peft", "bitsandbytes")) -> dict:
    """The installed versions of `packages` (those importable) and fusedlora's."""
    out = {}
    for name in packages:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed (or no __version__)
            pass
    from . import __version__

    out["fusedlora"] = __version__
    return out


def add_run_args(ap, steps=20, batch=4, seq=2048):
    """The options of one run: RunSpec's fields (RunSpec.from_args reads them back)."""
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--qlora", dest="mode", action="store_const", const="qlora")
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora")
    ap.set_defaults(mode="qlora")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--offload", action="store_true", help="fusedlora's offloaded checkpointing (fusedlora variants)")
    ap.add_argument(
        "--packed", action="store_true", help="padding-free packed rows (position_ids restart per document)"
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument(
        "--patch-options",
        default="",
        help="fusedlora.patch keyword arguments as JSON, e.g. '{\"recompute_norms\": false}' (fusedlora variants)",
    )


def run_in_subprocess(spec: RunSpec, extra_env=None, module: str = "fusedlora.workload") -> dict:
    """One run in a fresh Python process (`python -m module` with the spec's options); its progress bar goes to
    our stderr, its result comes back."""
    import subprocess

    cmd = [sys.executable, "-m", module] + spec.to_argv()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {
        "variant": spec.variant,
        "mode": spec.mode,
        "model": spec.model,
        "gc": spec.gc,
        "error": f"exit code {proc.returncode}; stdout tail: {proc.stdout[-400:]}",
    }


def main(
    argv=None,
    variants=VARIANTS,
    spec_type=RunSpec,
    add_args=add_run_args,
    run_spec=run,
    prog="python -m fusedlora.workload",
):
    """`python -m fusedlora.workload --variant ...`: one run, its result as one RESULT line (benchmarks/workload.py
    passes its own variants, spec, options and run)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=variants, required=True)
    add_args(ap)
    spec = spec_type.from_args(ap.parse_args(argv))
    print("RESULT " + json.dumps(run_spec(spec)), flush=True)


if __name__ == "__main__":
    main()
