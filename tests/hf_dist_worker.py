"""Two-process check of a patched HF + PEFT model under FSDP2 (fully_shard per decoder layer, then the root,
as accelerate and TRL set it up) or DDP; tests/test_distributed.py runs it through torchrun on CPU (gloo,
Triton's interpreter), and ci/multi_gpu_check.py is its multi-GPU counterpart.

    torchrun --standalone --nproc_per_node=2 tests/hf_dist_worker.py fsdp2|ddp VARIANT[,VARIANT...]

(VARIANT: patched, offload, gc, qlora, unpatched; several run one after another in one launch, each printing its
OK line, so the launch's start-up is paid once; the first that fails ends the launch.)

Every rank builds the same seeded tiny Llama with LoRA adapters, shards or wraps it, and takes three AdamW
steps on its own batch. An unsharded copy in the same process takes the same steps on every rank's batch, the
per-rank losses averaged (what FSDP2 / DDP's gradient averaging computes). Checked per step: the global loss
(all-reduced mean) against the reference's, and after training every LoRA weight (gathered)."""

import copy
import os
import sys

import torch
import torch.distributed as dist


def _qlora_model(device):
    import peft
    import transformers

    from fusedlora.testing import TARGETS, tiny_config
    from fusedlora.workload import quantize_linears_nf4

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.intermediate_size = 128  # bitsandbytes 0.50's CPU dequantize_4bit (the unpatched reference here) is wrong
    # when a row is not a whole number of 64-value blocks (down_proj [64, 96]); its CUDA path is right
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
    quantize_linears_nf4(model, torch.float32, quant_storage=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def main(kind: str, variants: str) -> None:
    cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.get_rank())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # noqa: F401  (sets TRITON_INTERPRET on CPU before any kernel is imported)

    for variant in variants.split(","):
        check(kind, variant, cuda)
    dist.destroy_process_group()


def check(kind: str, variant: str, cuda: bool) -> None:
    from conftest import DEVICE, rel_err

    import fusedlora
    from fusedlora.testing import batch, make_model

    rank, world = dist.get_rank(), dist.get_world_size()
    if variant.startswith("qlora"):  # bitsandbytes NF4 bases stored in fp32 (quant_storage), FSDP-shardable
        model = _qlora_model(DEVICE)
    else:
        model = make_model("llama")  # seeded: the same weights on every rank
    ref = copy.deepcopy(model)
    report = None
    if variant in ("patched", "offload", "gc", "qlora"):  # offload: fusedlora's offloaded checkpointing too
        report = fusedlora.patch(model, offload_checkpoints=variant == "offload")
        assert report.n_patched == 10, str(report)
    if variant == "gc":  # HF's own (non-reentrant) gradient checkpointing over the patched layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), ref.train()
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    data = [[batch(seed=10 * step + r) for r in range(world)] for step in range(3)]
    tol = 1e-5
    for step, per_rank in enumerate(data):
        ids, labels = per_rank[rank]
        loss = trained(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        ref_loss = 0.0
        for ids_r, labels_r in per_rank:
            lr = ref(input_ids=ids_r, labels=labels_r).loss / world
            lr.backward()
            ref_loss += lr.detach()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        assert rel_err(global_loss, ref_loss) < tol, (step, float(global_loss), float(ref_loss))
    ref_params = dict(ref.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if type(p).__name__ == "DTensor" else p
        assert rel_err(full.detach(), ref_params[name].detach()) < tol, (name, rel_err(full, ref_params[name]))
        n += 1
    assert n == 28, n
    # every call took the fused path (a lost quant state, say, would have run PEFT's forward instead)
    assert report is None or not report.fallbacks.counts, dict(report.fallbacks.counts)
    dist.barrier()
    print(
        f"rank {rank}: {kind.upper()} {variant} OK ({'cuda' if cuda else 'cpu'}, 3 AdamW steps, {n} LoRA weights)",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
