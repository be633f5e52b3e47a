"""Two-process FSDP2 check of the fused LoRA functions; tests/test_fsdp.py runs it through torchrun.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py fp32|bf16

Each rank builds the same PEFT-wrapped block (test_lora.make), routes its attention and MLP through
fusedlora (apply_lora_qkv / apply_lora_o / apply_lora_mlp_swiglu, called from the modules' forward so that
FSDP2's hooks unshard the weights first), shards it with fully_shard (bf16: MixedPrecisionPolicy with bf16
parameters, fp32 reductions) and trains two SGD steps on its own batch. An unsharded float64 copy with
PEFT's own layers takes the same steps on every rank's batch (losses averaged, as FSDP2 averages
gradients). Each rank compares its output, its dX and every LoRA gradient (the sharded DTensor gathered
with full_tensor()); the second step checks that the weights are read at call time (FSDP2 reshards and
swaps the parameters between steps, and SGD has changed them)."""

import copy
import os
import sys
from types import MethodType

import torch
import torch.distributed as dist


def mlp_fused(self, x):
    from fusedlora import lora

    return lora.apply_lora_mlp_swiglu(self, x)


def block_forward(self, x):
    h = x + self.self_attn(x)
    return h + self.mlp(h)


def main(mode: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import DEVICE, rel_err  # sets TRITON_INTERPRET on CPU before any kernel is imported
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fusedlora.testing import attn_fused, attn_peft, make

    fused = make(r=8)  # seeded: the same block on every rank
    ref = copy.deepcopy(fused).double()
    for model, attn in ((fused, attn_fused), (ref, attn_peft)):
        model.forward = MethodType(block_forward, model)
        model.self_attn.forward = MethodType(attn, model.self_attn)
    fused.mlp.forward = MethodType(mlp_fused, fused.mlp)

    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mode == "bf16"
        else MixedPrecisionPolicy()
    )
    for m in (fused.self_attn, fused.mlp, fused):
        fully_shard(m, mesh=mesh, mp_policy=mp)
    # fp32: float32 kernels and GEMMs against float64 (~1e-6). bf16: parameters, activations and every
    # product rounded to bf16 (2^-9 relative each, a handful along each path) against float64.
    tol = 1e-5 if mode == "fp32" else 4e-2

    gen = torch.Generator().manual_seed(100)
    batches = [torch.randn(2, 5, 64, generator=gen).to(DEVICE) for _ in range(world)]
    opt_f = torch.optim.SGD([p for p in fused.parameters() if p.requires_grad], lr=0.2)
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.2)
    for step in range(2):
        xf = batches[rank].clone().requires_grad_()
        y = fused(xf)
        y.float().square().mean().backward()
        for r, xb in enumerate(batches):
            xr = xb.double().requires_grad_()
            yr = ref(xr)
            (yr.square().mean() / world).backward()
            if r == rank:
                y_ref, dx_ref = yr.detach(), xr.grad * world
        assert rel_err(y, y_ref) < tol, (step, "output", rel_err(y, y_ref))
        assert rel_err(xf.grad, dx_ref) < tol, (step, "dX", rel_err(xf.grad, dx_ref))
        ref_params = dict(ref.named_parameters())
        n_checked = 0
        for name, p in fused.named_parameters():
            if not p.requires_grad:
                continue
            assert type(p).__name__ == "DTensor", (name, type(p))
            g = p.grad.full_tensor()
            assert rel_err(g, ref_params[name].grad) < tol, (step, name, rel_err(g, ref_params[name].grad))
            n_checked += 1
        assert n_checked == 14, n_checked  # A and B of q, k, v, o, gate, up, down
        opt_f.step(), opt_r.step()
        opt_f.zero_grad(), opt_r.zero_grad()
    dist.barrier()
    print(f"rank {rank}: FSDP2 OK ({mode}, {'cuda' if cuda else 'cpu'}, {n_checked} LoRA gradients x 2 steps)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fp32")
