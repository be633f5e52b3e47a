"""One fine-tuning run of one variant in this process: the workload behind `fusedlora.demo` and
`fusedlora.bench e2e` (each variant runs in a fresh process: `python -m fusedlora.workload --variant ...`).

A Llama-shaped model with random weights (no downloads), LoRA r16 on all seven projections (QLoRA: NF4
bitsandbytes bases, as HF's bitsandbytes loader makes them), bf16 autocast as the HF Trainer's bf16=True,
fused AdamW on the adapters, SDPA attention. The text is the Python standard library's own sources as byte
tokens, so the loss shows real learning. Timing follows the HF Trainer: no host sync inside a step except
at logging steps. Prints one JSON line (prefixed RESULT) with throughput, memory, first step and losses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

# *compile: torch.compile(model); *compile_layers: each decoder layer compiled (fusedlora.compile_layers);
# *_ro: the same under mode="reduce-overhead" (torch.compile's CUDA graphs); fusedlora_graphs: each decoder
# layer replayed as CUDA graphs (fusedlora.cuda_graph_layers); unsloth: the peer, where it is installed (its
# gradient checkpointing is its own, offloaded one)
VARIANTS = ("hf", "liger", "unsloth", "compile", "compile_layers", "fusedlora", "fusedlora_compile",
            "fusedlora_compile_layers", "fusedlora_compile_layers_ro", "fusedlora_graphs")
UNSLOTH_PATH = "FUSEDLORA_UNSLOTH_PATH"  # a folder with Unsloth and its packages (python -m build_tools.peer_bundle)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B shapes; "tiny" runs under the Triton interpreter on a CPU
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=384, tie_word_embeddings=True),
    # the 1B's topology (16 layers, GQA, tied head) at tiny widths: host time per step (build_tools/host_overhead)
    "host": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
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
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta", **storage)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64, module=q, **storage)
                if lin.bias is not None:
                    q.bias = lin.bias
                setattr(parent, name, q.to(device))
                del lin
    return model


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


def _config(shape):
    import transformers
    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def _build_unsloth(shape, mode, gc, seed, dtype):
    """The same random Llama, saved with a trivial tokenizer (Unsloth always loads one) and loaded through
    FastLanguageModel (its NF4 through bitsandbytes for QLoRA), LoRA r16 on the same projections."""
    import tempfile

    import torch
    import transformers
    from tokenizers import Tokenizer, models
    from unsloth import FastLanguageModel
    folder = tempfile.mkdtemp(prefix="fusedlora_unsloth_")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        transformers.LlamaForCausalLM(_config(shape)).to(dtype).save_pretrained(folder)
    torch.cuda.empty_cache()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    model, _ = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=131072, dtype=dtype,
                                                 load_in_4bit=mode == "qlora", local_files_only=True)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            bias="none", use_gradient_checkpointing="unsloth" if gc else False,
                                            random_state=seed + 1)


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


def build(shape, mode, variant, device, gc, seed=0, offload=False, dtype=None, patch_options=None):
    import torch
    on_gpu = device == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    if variant == "unsloth":
        if not on_gpu:
            raise SystemExit("the unsloth variant needs a CUDA GPU")
        _import_unsloth_first()  # (before transformers, imported below)
        model = _build_unsloth(shape, mode, gc, seed, dtype)
        model.train()
        return model, None
    import transformers
    import peft
    torch.manual_seed(seed)
    cfg = _config(shape)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if mode == "qlora":
        quantize_linears_nf4(model, dtype)
    if on_gpu:  # the fp32 random init and its cast, which loading a checkpoint does not do: every variant's
        torch.cuda.empty_cache()  # reserved memory is then its training's (8B: 26 GiB of cached init blocks)
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
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


def run(args) -> dict:
    t_start = time.perf_counter()
    import torch
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:  # before any kernel module is imported: triton.jit reads it then
        os.environ.setdefault("TRITON_INTERPRET", "1")
    offload = getattr(args, "offload", False)
    if offload and not args.variant.startswith("fusedlora"):
        raise SystemExit("--offload is fusedlora's offloaded checkpointing: only for the fusedlora variants")
    patch_options = json.loads(getattr(args, "patch_options", None) or "{}")
    if patch_options and not args.variant.startswith("fusedlora"):
        raise SystemExit("--patch-options are fusedlora.patch's keyword arguments: only for the fusedlora variants")
    model, report = build(args.model, args.mode, args.variant, device, args.gc, offload=offload,
                          patch_options=patch_options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=on_gpu)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    if getattr(args, "find_context", 0):
        return {"variant": args.variant, "mode": args.mode, "model": args.model, "gc": args.gc, "offload": offload,
                **find_context(model, opt, autocast, SHAPES[args.model]["vocab_size"], device, args.find_context,
                               args.seq, getattr(args, "context_step", 1024)),
                "versions": _versions(), "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    data = batches(args.steps, args.batch, args.seq, args.packed, device)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, logged, first_step_s, t_window, warmup_peak = [], [], None, None, 0
    warmup = min(2, args.steps - 1)
    bar = _progress(args.steps, f"{args.variant} {args.mode} {args.model}")
    for step, (ids, labels, pos) in enumerate(data):
        if step == warmup:
            _sync(on_gpu)
            t_window = time.perf_counter()
            if on_gpu:  # the timed steps' own peak, apart from the first steps' (CUDA-graph capture, say)
                warmup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=labels, position_ids=pos).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step == 0:
            _sync(on_gpu)
            first_step_s = time.perf_counter() - t0
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            logged.extend(float(l) for l in losses[len(logged):])  # the logging step's host sync
            bar.set_postfix(loss=f"{logged[-1]:.3f}")
        bar.update(1)
    _sync(on_gpu)
    t_end = time.perf_counter()
    bar.close()
    profile = None
    if args.profile and on_gpu:
        from . import step_profile

        def one_step(batch=data[-1]):
            ids, labels, pos = batch
            with autocast:
                loss = model(input_ids=ids, labels=labels, position_ids=pos).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        kernels, gemm_ops, wall_us = step_profile.profile_steps(one_step, args.profile)
        profile = step_profile.summarize(kernels, gemm_ops, args.profile, wall_us, args.peak_tflops)
    saved = None
    if getattr(args, "saved", False):
        ids, labels, pos = data[-1]
        saved = saved_activations(lambda: model(input_ids=ids, labels=labels, position_ids=pos).loss, autocast)
        opt.zero_grad(set_to_none=True)
    timed_steps = args.steps - warmup
    from . import loader
    from .ops._common import interpreting
    return {
        "variant": args.variant, "mode": args.mode, "model": args.model, "gc": args.gc, "offload": offload,
        "packed": args.packed, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "tokens_per_s": timed_steps * args.batch * args.seq / (t_end - t_window),
        "step_ms": (t_end - t_window) / timed_steps * 1e3,
        "first_step_s": first_step_s, "process_s": t_end - t_start,
        "peak_gib": max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30 if on_gpu else None,
        "steady_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        # what the process holds from the GPU at most (CUDA-graph pools included: a replay allocates nothing,
        # so allocated-memory statistics do not see the memory a graph reuses)
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        "losses": logged,  # every step's loss, read at the logging steps
        "fusedlora_jit_kernels": loader.get_loader().stats.get("jit", 0) if args.variant.startswith("fusedlora") else None,
        "patch": report, "versions": _versions(), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "interpreter": interpreting(),
        "profile": profile,  # [(family, ms per step, share, note)] under torch.profiler, or None
        "saved": saved,      # what autograd keeps for the backward (--saved), or None
        "patch_options": patch_options,
    }


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
    return {"gib": sum(v[0] for v in storages.values()) / 2**30,
            "largest": [{"shape": list(shape), "dtype": dtype, "storages": n, "gib": b / 2**30}
                        for (shape, dtype), (n, b) in largest]}


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
                    _sync(on_gpu)
                    t0 = time.perf_counter()
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            _sync(on_gpu)
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
    return {"longest": longest, **(result or {"tokens_per_s": None, "peak_gib": None}), "tried": tried,
            "rates": sorted(rates.items())}


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


def _versions() -> dict:
    out = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "unsloth"):
        if name == "unsloth" and name not in sys.modules:  # (importing it would patch transformers)
            continue
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed (or no __version__)
            pass
    from . import __version__
    out["fusedlora"] = __version__
    return out


def add_run_args(ap, steps=20, batch=4, seq=2048):
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
    ap.add_argument("--find-context", type=int, default=0, metavar="MAX",
                    help="instead of timed steps: the longest sequence (batch 1, up to MAX) whose step fits")
    ap.add_argument("--context-step", type=int, default=1024, help="--find-context's length granularity")
    ap.add_argument("--packed", action="store_true", help="padding-free packed rows (position_ids restart per document)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, help="after the timed steps, N more under torch.profiler (GPU)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the GEMM peak the profile compares with")
    ap.add_argument("--saved", action="store_true", help="after the timed steps, one more step listing what "
                    "autograd saves for the backward (total and largest groups)")
    ap.add_argument("--patch-options", default="", help="fusedlora.patch keyword arguments as JSON, e.g. "
                    "'{\"recompute_norms\": false}' (fusedlora variants)")


def run_in_subprocess(variant, args, extra_env=None) -> dict:
    """One variant in a fresh Python process; its progress bar goes to our stderr, its result comes back."""
    import subprocess
    cmd = [sys.executable, "-m", "fusedlora.workload", "--variant", variant, "--model", args.model, f"--{args.mode}",
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--lr", str(args.lr),
           "--log-every", str(args.log_every), "--profile", str(getattr(args, "profile", 0)),
           "--peak-tflops", str(getattr(args, "peak_tflops", 790.0))] + (["--gc"] if args.gc else []) + \
        (["--packed"] if args.packed else []) + (["--offload"] if getattr(args, "offload", False) else []) + \
        (["--saved"] if getattr(args, "saved", False) else []) + \
        (["--patch-options", args.patch_options] if getattr(args, "patch_options", "") and variant.startswith("fusedlora")
         else []) + \
        (["--find-context", str(args.find_context), "--context-step", str(getattr(args, "context_step", 1024))]
         if getattr(args, "find_context", 0) else [])
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"variant": variant, "mode": args.mode, "model": args.model, "gc": args.gc, "error":
            f"exit code {proc.returncode}; stdout tail: {proc.stdout[-400:]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fusedlora.workload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    add_run_args(ap)
    args = ap.parse_args(argv)
    print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
