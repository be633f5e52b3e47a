"""Tests aimed at faults the norm-wise suites let through: element-wise checks against references that emulate
the exact cast a kernel must do, caches whose halves differ, wide rows whose last column counts, the recompute
paths, an independent GPTQ reference (packing from the format, never unpacking), and the dtype / option
combinations no other test runs on the CPU."""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from fusedlora import lora
from fusedlora.ops import (
    chunked_linear_loss,
    cross_entropy,
    fused_linear_cross_entropy,
    geglu,
    naive_cross_entropy,
    naive_geglu,
    naive_linear_cross_entropy,
    naive_rms_norm,
    naive_rope,
    naive_swiglu,
    rms_norm,
    rope,
    swiglu,
)
from fusedlora.quant import dequantize_gptq
from fusedlora.testing import DEVICE, HAS_CUDA, assert_close, kernel_round, pack_int_words, rel_err

ce_module = importlib.import_module("fusedlora.ops.cross_entropy")  # the package exports a function of that name


# ------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_llama_rounds_xhat_to_x_dtype_before_the_weight(dtype):
    """HF Llama: weight * xhat.to(x.dtype) with an fp32 weight gives an fp32 output whose values carry x's
    rounding; a kernel that skips the cast is ~2^-9 off, far above this test's 1e-6."""
    x = torch.randn(6, 200, device=DEVICE).to(dtype)
    w = 1 + 0.3 * torch.randn(200, device=DEVICE)
    y = rms_norm(x, w, 1e-5)
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert y.dtype == torch.float32
    assert_close(y, w * kernel_round(xhat, dtype).float(), 1e-6)


def test_rms_norm_mixed_dtype_backward():
    """bf16 x, fp32 weight (the usual QLoRA layout): dx in bf16, dw in fp32, both vs fp64."""
    x = torch.randn(9, 96, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.3 * torch.randn(96, device=DEVICE)).requires_grad_()
    dy = torch.randn(9, 96, device=DEVICE)
    rms_norm(x, w, 1e-6).backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    naive_rms_norm(x64, w64, 1e-6).backward(dy.double())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_close(x.grad, x64.grad, 2e-2)
    assert_close(w.grad, w64.grad, 2e-2)


@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_rms_norm_fp16(casting, offset):
    x = torch.randn(5, 130, device=DEVICE, dtype=torch.float16).requires_grad_()
    w = (0.3 * torch.randn(130, device=DEVICE)).to(torch.float16).requires_grad_()
    y = rms_norm(x, w, 1e-6, offset, casting)
    y.backward(torch.ones_like(y))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = naive_rms_norm(x64, w64, 1e-6, offset, casting)
    y64.backward(torch.ones_like(y64))
    assert y.dtype == torch.float16
    assert_close(y, y64, 3e-3)
    assert_close(x.grad, x64.grad, 1e-2)
    assert_close(w.grad, w64.grad, 1e-2)


# ---------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("cached", [False, True])
def test_rope_caches_whose_halves_differ(cached):
    """HF's caches repeat their halves (cat(freqs, freqs)); a kernel that swapped or reused the halves would
    still pass on those. Random cos/sin tell the halves apart."""
    b, hq, hk, s, d = 2, 3, 1, 5, 16
    q = torch.randn(b, s, hq, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, hk, s, d, device=DEVICE)
    if cached:
        cos, sin = torch.randn(11, d, device=DEVICE), torch.randn(11, d, device=DEVICE)
        pos = torch.randint(0, 11, (b, s), device=DEVICE)
    else:
        cos, sin, pos = torch.randn(b, s, d, device=DEVICE), torch.randn(b, s, d, device=DEVICE), None
    qr, kr = [t.detach().clone().requires_grad_() for t in (q, k)]
    qo, ko = rope(qr, kr, cos, sin, pos)
    (qo * 1.5 + 0).sum().backward(retain_graph=True)
    (ko.square()).sum().backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qe, ke = naive_rope(q64, k64, cos.double(), sin.double(), pos)
    (qe * 1.5).sum().backward(retain_graph=True)
    ke.square().sum().backward()
    assert_close(qo, qe, 1e-5)
    assert_close(ko, ke, 1e-5)
    assert_close(qr.grad, q64.grad, 1e-5)
    assert_close(kr.grad, k64.grad, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_16bit_qk_with_fp32_cache(dtype):
    """bf16/fp16 q, k with an fp32 cache (HF under autocast): computed in fp32, rounded once to q's dtype."""
    q = torch.randn(1, 4, 6, 32, device=DEVICE).to(dtype)
    k = torch.randn(1, 2, 6, 32, device=DEVICE).to(dtype)
    cos, sin = torch.randn(1, 6, 32, device=DEVICE), torch.randn(1, 6, 32, device=DEVICE)
    qo, ko = rope(q, k, cos, sin)
    qe, ke = naive_rope(q.double(), k.double(), cos.double(), sin.double())
    assert qo.dtype == dtype
    assert_close(qo, kernel_round(qe.float(), dtype), 1e-6 if dtype == torch.bfloat16 else 1e-3)
    assert_close(ko, kernel_round(ke.float(), dtype), 1e-6 if dtype == torch.bfloat16 else 1e-3)


# ----------------------------------------------------------------------------------------- GLU
@pytest.mark.parametrize(
    "op,naive,kw",
    [
        (swiglu, naive_swiglu, {}),
        (geglu, naive_geglu, {"approximate": "none"}),
        (geglu, naive_geglu, {"approximate": "tanh"}),
    ],
)
def test_glu_fp16(op, naive, kw):
    e = torch.randn(7, 129, device=DEVICE, dtype=torch.float16).requires_grad_()
    g = torch.randn(7, 129, device=DEVICE, dtype=torch.float16).requires_grad_()
    h = op(e, g, **kw)
    h.backward(torch.ones_like(h))
    e64, g64 = e.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    h64 = naive(e64, g64, **kw)
    h64.backward(torch.ones_like(h64))
    assert_close(h, h64, 3e-3)
    assert_close(e.grad, e64.grad, 3e-3)
    assert_close(g.grad, g64.grad, 3e-3)


# ------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("vocab", [1001, 1003, 4099])
def test_cross_entropy_every_column_counts(vocab):
    """Per-row losses and every gradient element vs fp64: a kernel that drops one column of wide rows (the last
    logit, say) moves one element of the gradient by ~1/V, which a norm over the whole tensor hides."""
    z = (3 * torch.randn(6, vocab, device=DEVICE)).requires_grad_()
    y = torch.randint(0, vocab, (6,), device=DEVICE)
    y[2] = vocab - 1  # a label in the last column
    z.data[4, -1] = 12.0  # the last logit dominates one row
    loss = cross_entropy(z, y, reduction="none")
    loss.backward(torch.ones_like(loss))
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, reduction="none")
    ref.backward(torch.ones_like(ref))
    assert_close(loss, ref, 1e-6)
    assert_close(z.grad, z64.grad, 1e-5)


@pytest.mark.parametrize("reduction", ["none"])
def test_cross_entropy_recompute_path_runs_and_matches(monkeypatch, reduction):
    """reduction='none' keeps the logits and computes the gradient in the backward (the 'grad' launch)."""
    modes = []
    real = ce_module.ce_launch

    def spy(*args):
        modes.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ce_module, "ce_launch", spy)
    z = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 33, (5,), device=DEVICE)
    y[1] = -100
    w = torch.rand(5, device=DEVICE)
    (g,) = torch.autograd.grad((cross_entropy(z, y, reduction=reduction) * w).sum(), z)
    assert modes == ["loss", "grad"]
    z64 = z.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad((naive_cross_entropy(z64, y, reduction=reduction) * w.double()).sum(), z64)
    assert_close(g, g64, 1e-5)


def test_cross_entropy_fp16():
    z = (4 * torch.randn(5, 300, device=DEVICE)).to(torch.float16).requires_grad_()
    y = torch.randint(0, 300, (5,), device=DEVICE)
    cross_entropy(z, y).backward()
    z64 = z.detach().double().requires_grad_()
    naive_cross_entropy(z64, y).backward()
    assert z.grad.dtype == torch.float16
    assert_close(z.grad, z64.grad, 3e-3)


def test_fused_linear_cross_entropy_bf16_and_recompute():
    """bf16 hidden and head over several chunks, mean (gradients made in the forward) and 'none' (recomputed)."""
    h = torch.randn(37, 64, device=DEVICE).to(torch.bfloat16)
    w = (0.1 * torch.randn(301, 64, device=DEVICE)).to(torch.bfloat16)
    y = torch.randint(0, 301, (37,), device=DEVICE)
    y[::5] = -100
    for reduction in ("mean", "none"):
        hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_cross_entropy(hk, wk, y, reduction=reduction, max_chunk_bytes=4096)
        (loss.sum() if reduction == "none" else loss).backward()
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        ref = naive_linear_cross_entropy(h64, w64, y, reduction=reduction)
        (ref.sum() if reduction == "none" else ref).backward()
        assert_close(loss, ref, 2e-2)
        assert_close(hk.grad, h64.grad, 3e-2)
        assert_close(wk.grad, w64.grad, 3e-2)


def test_chunked_linear_loss_bf16():
    h = torch.randn(20, 32, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w = (0.2 * torch.randn(7, 32, device=DEVICE)).to(torch.bfloat16).requires_grad_()
    t = torch.randn(20, 7, device=DEVICE)
    chunked_linear_loss(h, w, t, lambda z, u: (z.float() - u).pow(2), num_chunks=3).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (F.linear(h64, w64) - t.double()).pow(2).mean().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert_close(h.grad, h64.grad, 2e-2)
    assert_close(w.grad, w64.grad, 2e-2)


# ---------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 16, True), (8, 64, False), (2, 32, True)])
def test_gptq_against_an_independent_reference(bits, group, act_order, fmt):
    """Integer weights, zeros and scales are drawn, packed as the format says (zeros stored minus one in
    'gptq'), and the kernel's output is compared element-wise with (q - z) * s computed from the draws."""
    g = torch.Generator().manual_seed(bits * 100 + group)
    n_in, n_out = 128, 48
    q = torch.randint(0, 2**bits, (n_in, n_out), generator=g)
    n_groups = n_in // group
    z = torch.randint(1, 2**bits, (n_groups, n_out), generator=g)
    s = torch.rand(n_groups, n_out, generator=g) * 0.1 + 0.01
    g_idx = (torch.randperm(n_in, generator=g) // group) if act_order else torch.arange(n_in) // group
    stored_z = z - 1 if fmt == "gptq" else z
    qweight, qzeros = pack_int_words(q, bits, 0), pack_int_words(stored_z, bits, 1)
    expect = ((q - z[g_idx]).double() * s.double()[g_idx]).t()  # [out, in]
    out = dequantize_gptq(
        qweight.to(DEVICE),
        qzeros.to(DEVICE),
        s.to(DEVICE, torch.float16),
        g_idx.to(DEVICE, torch.int32) if act_order else None,
        bits=bits,
        group_size=group,
        format=fmt,
        out_dtype=torch.float32,
    )
    assert out.shape == (n_out, n_in)
    s16 = s.to(torch.float16).double()
    assert_close(out, ((q - z[g_idx]).double() * s16[g_idx]).t().to(DEVICE), 1e-6)
    assert rel_err(out, expect.to(DEVICE)) < 1e-3  # the scales' fp16 rounding only


# ---------------------------------------------------------------------------------------- LoRA
def _block(dtype):
    from fusedlora.testing import make

    return make(r=4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_qkv_and_o_16bit(dtype):
    fused = _block(dtype)
    ref = copy.deepcopy(fused).double()
    x = torch.randn(2, 5, 64, device=DEVICE).to(dtype)
    xf, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    q, k, v = lora.apply_lora_qkv(fused.self_attn, xf)
    o = lora.apply_lora_o(fused.self_attn, q)
    (q.float().sum() + k.float().square().sum() + v.float().sum() + o.float().square().sum()).backward()
    at = ref.self_attn
    qr, kr, vr = at.q_proj(xr), at.k_proj(xr), at.v_proj(xr)
    orf = at.o_proj(qr)
    (qr.sum() + kr.square().sum() + vr.sum() + orf.square().sum()).backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in ((q, qr), (k, kr), (v, vr), (o, orf)):
        assert_close(got, want, tol)
    gf = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    gr = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert gf.keys() == gr.keys() and gf
    for n in gr:
        assert_close(gf[n], gr[n], 2 * tol, name=n)


def test_lora_mlp_geglu_exact_matches_peft():
    from fusedlora.testing import make

    fused = make(r=4)
    ref = copy.deepcopy(fused).double()
    x = torch.randn(3, 64, device=DEVICE)
    xf, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    lora.apply_lora_mlp_geglu(fused.mlp, xf, approximate="none").square().sum().backward()
    m = ref.mlp
    m.down_proj(F.gelu(m.gate_proj(xr)) * m.up_proj(xr)).square().sum().backward()  # PEFT layers, exact GELU
    assert_close(xf.grad, xr.grad, 1e-5)
    for (n, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            assert_close(p.grad, pr.grad, 1e-5, name=n)


def test_lora_o_under_autocast():
    """apply_lora_o inside torch.autocast: bf16 compute from fp32 weights and input, fp32 adapter gradients."""
    fused = _block(torch.float32)
    ref = copy.deepcopy(fused)
    x = torch.randn(4, 64, device=DEVICE)
    dev = "cuda" if HAS_CUDA else "cpu"
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = lora.apply_lora_o(fused.self_attn, x)
        yr = ref.self_attn.o_proj(x)
    assert y.dtype == yr.dtype == torch.bfloat16
    y.float().square().sum().backward()
    yr.float().square().sum().backward()
    assert_close(y, yr, 2e-2)
    for (n, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            assert p.grad.dtype == torch.float32
            assert_close(p.grad, pr.grad, 5e-2, name=n)
