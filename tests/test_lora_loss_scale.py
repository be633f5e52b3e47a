"""fp16 autocast with a loss scale (what torch.amp.GradScaler runs: loss * 65536, gradients unscaled after)
through LoRA_QKV, LoRA_O and LoRA_MLP (fused and unfused paths), against PEFT in float64: every gradient
finite and as close to the reference as PEFT's own fp16 autocast run (within 2x its error, or fp16's unit)."""

import copy

import pytest
import torch

from fusedlora import lora
from fusedlora.testing import DEVICE, rel_err

pytest.importorskip("peft")
from fusedlora.testing import make  # noqa: E402

SCALE = 65536.0
FP16_UNIT = 2.0**-11


def _weight(i, shape):
    """The loss's fixed weights for output i (the same in every run)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(DEVICE)


def _step(model, x, fused, scale):
    """The scaled loss's backward under fp16 autocast; returns (outputs, input gradient, LoRA gradients), all
    unscaled, in float64."""
    x = x.detach().clone().requires_grad_()
    at, mlp = model.self_attn, model.mlp
    with torch.autocast(DEVICE, dtype=torch.float16, enabled=scale is not None):
        if fused:
            q, k, v = lora.apply_lora_qkv(at, x)
            outs = (q, k, v, lora.apply_lora_o(at, q), lora.apply_lora_mlp_swiglu(mlp, x))
        else:
            q = at.q_proj(x)
            outs = (q, at.k_proj(x), at.v_proj(x), at.o_proj(q), mlp(x))
    # a mean-reduced loss, as a training loss is: the scaled gradients stay within fp16's range
    loss = sum((o.double() * _weight(i, o.shape)).mean() + o.double().square().mean() for i, o in enumerate(outs))
    (loss * (scale or 1.0)).backward()
    unscale = 1.0 / (scale or 1.0)
    grads = [x.grad.double() * unscale] + [
        p.grad.double() * unscale for n, p in model.named_parameters() if "lora_" in n
    ]
    model.zero_grad(set_to_none=True)
    return [o.detach().double() for o in outs], grads


@pytest.mark.parametrize("glu_lora", [True, False], ids=["fused_mlp", "unfused_mlp"])
def test_fp16_autocast_with_loss_scale_matches_peft(glu_lora, monkeypatch):
    if not glu_lora:
        monkeypatch.setattr(lora, "_mlp_fusable", lambda *a: False)
    model = make(r=8)
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 9, 64, device=DEVICE)
    want_outs, want = _step(ref, x.double(), False, None)
    peft_outs, peft = _step(model, x, False, SCALE)
    ours_outs, ours = _step(model, x, True, SCALE)
    for i, (r, p, o) in enumerate(zip(want_outs + want, peft_outs + peft, ours_outs + ours)):
        assert torch.isfinite(o).all(), i
        e_peft, e_ours = rel_err(p, r), rel_err(o, r)
        assert e_ours <= max(2 * e_peft, FP16_UNIT), (i, e_ours, e_peft)
