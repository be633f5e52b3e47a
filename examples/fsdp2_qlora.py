"""QLoRA (or LoRA) fine-tuning of a Llama-shaped model under FSDP2, patched by fusedlora.

    torchrun --nproc-per-node 2 examples/fsdp2_qlora.py --model 8b --steps 20
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_qlora.py --model 8b
    torchrun --nproc-per-node 2 examples/fsdp2_qlora.py --model tiny --steps 3      # CPU (gloo, interpreter)

Each rank builds the same randomly initialised model (`--model` a shape of fusedlora.workload: tiny, 1b, 8b;
or `--hf-model NAME` to load a checkpoint), quantises its decoder linears to bitsandbytes NF4 with bf16 storage
(FSDP shards the packed weights like any bf16 tensor; the quant state stays on each Linear4bit), adds LoRA r16
on all seven projections, calls fusedlora.patch, then fully_shard on every decoder layer and on the root (what
accelerate's FSDP2 plugin and TRL do), bf16 parameters with fp32 gradient reductions. Every step trains on its
rank's slice of one global batch, so any GPU count trains the same thing. Prints per-step global loss, tokens/s
per GPU and peak memory per GPU; `--out` writes them (and the trained LoRA weights with `--save-lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="a fusedlora.workload shape: tiny, 1b, 8b")
    ap.add_argument("--hf-model", default=None, help="load this HF checkpoint instead of a random shape")
    ap.add_argument("--mode", choices=("qlora", "lora"), default="qlora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8, help="rows per step over all ranks")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-patch", action="store_true", help="HF + PEFT as they are (the baseline)")
    ap.add_argument("--offload", action="store_true", help="fusedlora's offloaded activation checkpointing")
    ap.add_argument("--gc", action="store_true", help="HF's gradient checkpointing (non-reentrant)")
    ap.add_argument("--no-shard", action="store_true", help="one process, no FSDP (the single-GPU reference)")
    ap.add_argument(
        "--cpu-offload",
        action="store_true",
        help="FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer state in host memory",
    )
    ap.add_argument("--out", default=None, help="JSON results (rank 0)")
    ap.add_argument("--save-lora", action="store_true", help="include the trained LoRA weights in --out (.pt beside)")
    return ap.parse_args(argv)


def build(args, device):
    import peft
    import torch
    import transformers

    from fusedlora.workload import SHAPES, TARGETS, enable_checkpointing, quantize_linears_nf4

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)  # the same model on every rank
    if args.hf_model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_model, torch_dtype=dtype).to(device)
    else:
        cfg = transformers.LlamaConfig(**SHAPES[args.model], max_position_embeddings=131072, use_cache=False)
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if args.mode == "qlora":
        quantize_linears_nf4(model, dtype, quant_storage=dtype)
    if args.gc:
        enable_checkpointing(model)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    report = None
    if not args.no_patch:
        import fusedlora

        report = fusedlora.patch(model, offload_checkpoints=args.offload)
    return model, report


def shard(model, device, world, cpu_offload=False):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    on_gpu = device.type == "cuda"
    kw = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if on_gpu
        else MixedPrecisionPolicy()
    }
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=on_gpu)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def global_batches(args):
    """The same token stream on every rank and for any GPU count: step s is rows [s*G, (s+1)*G)."""
    from fusedlora.workload import batches

    return batches(args.steps, args.global_batch, args.seq, False, "cpu")


def train(args) -> dict:
    import torch
    import torch.distributed as dist

    distributed = not args.no_shard and "RANK" in os.environ  # launched by torchrun / accelerate
    cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} ranks")
    model, report = build(args, device)
    if distributed:
        shard(model, device, world, args.cpu_offload)
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=cuda and not args.cpu_offload
    )  # (offloaded: the step runs on the host)
    per_rank = args.global_batch // world
    losses, t0 = [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for step, (ids, labels, _) in enumerate(global_batches(args)):
        if step == min(2, args.steps - 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        with autocast:
            loss = model(input_ids=ids[rows].to(device), labels=labels[rows].to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = loss.detach().float().clone()
        if distributed:
            dist.all_reduce(g)
            g /= world
        losses.append(g)
    if cuda:
        torch.cuda.synchronize()
    timed = args.steps - min(2, args.steps - 1)
    tokens_per_gpu = timed * per_rank * args.seq / (time.perf_counter() - t0)
    lora = {}
    if args.save_lora:
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if type(p).__name__ == "DTensor" else p
                lora[name] = full.detach().float().cpu()
    result = {
        "world": world,
        "patched": not args.no_patch,
        "mode": args.mode,
        "model": args.hf_model or args.model,
        "losses": [float(x) for x in losses],
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "peak_gib_per_gpu": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "fallbacks": {f"{k}: {r}": n for (k, r), n in report.fallbacks.counts.items()} if report else None,
    }
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
        print("losses " + " ".join(f"{x:.4f}" for x in result["losses"]))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
            if lora:
                torch.save(lora, args.out.rsplit(".", 1)[0] + ".pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    train(parse())
