"""Fused LoRA functions against PEFT's own LoRA layers on the same modules: outputs and every gradient
(dX, dA, dB of each projection, d bias). fp32 on CPU (interpreter for the GLU / dequant kernels):
agreement to ~1e-6 relative; on a GPU the same tests run in fp32 too."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE, rel_err
from fusedlora import lora
from fusedlora.quant import naive_dequantize_gptq

peft = pytest.importorskip("peft")


class Attn(nn.Module):
    def __init__(self, hidden=64, q_out=64, kv_out=32, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(hidden, q_out, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=bias)


class MLP(nn.Module):
    def __init__(self, hidden=64, inter=176, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        a = F.silu if self.act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
        return self.down_proj(a(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, bias=False, act="silu"):
        super().__init__()
        self.self_attn = Attn(bias=bias)
        self.mlp = MLP(act=act)


def make(r=4, dropout=0.0, bias=False, act="silu", use_dora=False):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=use_dora,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.inject_adapter_in_model(cfg, Block(bias=bias, act=act)).to(DEVICE)
    with torch.no_grad():  # PEFT starts B at zero: make the adapter path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.endswith("bias"))
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(ref_model, fused_model, out_ref, out_fused, x_ref, x_fused):
    outs = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    fouts = out_fused if isinstance(out_fused, tuple) else (out_fused,)
    for o, f in zip(outs, fouts):
        assert o.shape == f.shape
        assert rel_err(f, o) < 1e-5
    gr, gf = grads(ref_model), grads(fused_model)
    assert set(gr) == set(gf) and gr
    for n in gr:
        assert rel_err(gf[n], gr[n]) < 1e-5, n
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-5


def _x(t=7, hidden=64):
    x = torch.randn(1 if t == 1 else 2, t, hidden, device=DEVICE)  # t == 1: a single token row
    return x.clone().requires_grad_(), x.clone().requires_grad_()


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r", [1, 4, 64])
def test_qkv_and_o_match_peft(r, bias, tokens):
    ref = make(r=r, bias=bias)
    fused = copy.deepcopy(ref)
    xr, xf = _x(t=tokens)
    at = ref.self_attn
    q, k, v = at.q_proj(xr), at.k_proj(xr), at.v_proj(xr)
    o = at.o_proj(q)
    (q.square().sum() + 2 * k.sum() + v.pow(3).sum() + o.sum()).backward()
    fa = fused.self_attn
    qf, kf, vf = lora.apply_lora_qkv(fa, xf)
    of = lora.apply_lora_o(fa, qf)
    (qf.square().sum() + 2 * kf.sum() + vf.pow(3).sum() + of.sum()).backward()
    compare(ref, fused, (q, k, v, o), (qf, kf, vf, of), xr, xf)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("r", [4, 64])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_mlp_matches_peft(act, r, tokens):
    ref = make(r=r, act=act)
    fused = copy.deepcopy(ref)
    xr, xf = _x(t=tokens)
    y = ref.mlp(xr)
    y.backward(torch.ones_like(y) * 0.5 + y.detach())
    apply = lora.apply_lora_mlp_swiglu if act == "silu" else lora.apply_lora_mlp_geglu
    yf = apply(fused.mlp, xf)
    yf.backward(torch.ones_like(yf) * 0.5 + y.detach())
    compare(ref, fused, y, yf, xr, xf)


def test_dropout_matches_peft_masks():
    ref = make(dropout=0.25)
    fused = copy.deepcopy(ref)
    ref.train(), fused.train()
    xr, xf = _x()
    torch.manual_seed(123)
    at = ref.self_attn
    q, k, v = at.q_proj(xr), at.k_proj(xr), at.v_proj(xr)
    y = ref.mlp(xr)
    (q.sum() + k.square().sum() + v.sum() + y.square().sum()).backward()
    torch.manual_seed(123)
    qf, kf, vf = lora.apply_lora_qkv(fused.self_attn, xf)
    yf = lora.apply_lora_mlp_swiglu(fused.mlp, xf)
    (qf.sum() + kf.square().sum() + vf.sum() + yf.square().sum()).backward()
    compare(ref, fused, (q, k, v, y), (qf, kf, vf, yf), xr, xf)


def test_disabled_adapter_is_the_base_layer():
    ref = make()
    at = ref.self_attn
    at.o_proj.enable_adapters(False)  # PEFT API
    W, quant, A, B, s = lora.get_lora_parameters(at.o_proj)
    assert A is None and B is None and s is None and W is at.o_proj.base_layer.weight
    x = torch.randn(3, 64, device=DEVICE)
    assert torch.allclose(lora.apply_lora_o(at, x), at.o_proj.base_layer(x), atol=1e-6)


def test_dora_is_reported():
    model = make(use_dora=True)
    with pytest.raises(lora.UnsupportedLoRA, match="DoRA"):
        lora.get_lora_parameters(model.self_attn.q_proj)


def test_adapter_shape_mismatch_is_named():
    W = torch.randn(32, 64, device=DEVICE)
    A, B = torch.randn(4, 63, device=DEVICE), torch.randn(32, 4, device=DEVICE)
    with pytest.raises(ValueError, match="LoRA_O: LoRA A \\(4, 63\\) / B \\(32, 4\\) do not match a \\[32, 64\\]"):
        lora.LoRA_O.apply(torch.randn(3, 64, device=DEVICE), W, None, A, B, 2.0)


def test_matmul_lora():
    X = torch.randn(2, 5, 64, device=DEVICE)
    W, A, B = torch.randn(32, 64, device=DEVICE), torch.randn(4, 64, device=DEVICE), torch.randn(32, 4, device=DEVICE)
    got = lora.matmul_lora(X, W, None, A, B, 0.5)
    assert rel_err(got, X @ W.T + 0.5 * (X @ A.T) @ B.T) < 1e-6
    assert rel_err(lora.matmul_lora(X, W, None, None, None, None), X @ W.T) < 1e-6


def test_o_with_gptq_base_weight():
    """A GPTQ base weight is dequantised by the kernel in forward and backward."""
    in_f, out_f, bits = 64, 48, 4
    qw = torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64).to(torch.int32).to(DEVICE)
    qz = torch.randint(-2**31, 2**31 - 1, (2, out_f // 8), dtype=torch.int64).to(torch.int32).to(DEVICE)
    sc = (torch.rand(2, out_f) * 0.02).to(DEVICE)
    state = lora.GPTQState(qz, sc, None, bits, 32)
    W = naive_dequantize_gptq(qw, qz, sc, None, bits=bits, group_size=32)
    A = (0.1 * torch.randn(4, in_f, device=DEVICE)).requires_grad_()
    B = (0.1 * torch.randn(out_f, 4, device=DEVICE)).requires_grad_()
    x = torch.randn(9, in_f, device=DEVICE, requires_grad=True)
    y = lora.LoRA_O.apply(x, qw, state, A, B, 2.0)
    y.square().sum().backward()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ W.T + 2.0 * (x2 @ A2.T) @ B2.T
    y2.square().sum().backward()
    assert rel_err(y, y2) < 1e-5
    for a, b in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        assert rel_err(a, b) < 1e-5


def test_o_with_nf4_base_weight():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(48, 64, device=DEVICE)
    q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    Wd = bnbf.dequantize_4bit(q, qs)
    A = (0.1 * torch.randn(4, 64, device=DEVICE)).requires_grad_()
    B = (0.1 * torch.randn(48, 4, device=DEVICE)).requires_grad_()
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    y = lora.LoRA_O.apply(x, q, qs, A, B, 0.5)
    y.square().sum().backward()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ Wd.T + 0.5 * (x2 @ A2.T) @ B2.T
    y2.square().sum().backward()
    assert rel_err(y, y2) < 1e-5
    for a, b in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        assert rel_err(a, b) < 1e-5
