"""Fused LoRA functions against PEFT's own LoRA layers on the same modules: outputs and every gradient
(dX, dA, dB of each projection, d bias). fp32 on CPU (interpreter for the GLU / dequant kernels):
agreement to ~1e-6 relative; on a GPU the same tests run in fp32 too."""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedlora.quant
from fusedlora import lora, lora_ops
from fusedlora.quant import naive_dequantize_gptq
from fusedlora.testing import DEVICE, Block, attn_fused, attn_peft, gptq_lora_block, make, rel_err

peft = pytest.importorskip("peft")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(ref_model, fused_model, out_ref, out_fused, x_ref, x_fused, peft32=None):
    """Outputs and every gradient of fused_model vs ref_model within 1e-5 relative. With `peft32` (PEFT's own
    float32 model after the same step) the tolerance of each gradient is also at least 4x PEFT's own
    float32 error against the (float64) reference: a gradient that cancels to a small result (r=1, one
    token) carries the rounding of its large terms in any float32 implementation."""
    outs = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    fouts = out_fused if isinstance(out_fused, tuple) else (out_fused,)
    for o, f in zip(outs, fouts):
        assert o.shape == f.shape
        assert rel_err(f, o) < 1e-5
    gr, gf = grads(ref_model), grads(fused_model)
    g32 = grads(peft32) if peft32 is not None else {}
    assert set(gr) == set(gf) and gr
    for n in gr:
        tol = max(1e-5, 4 * rel_err(g32[n], gr[n])) if n in g32 else 1e-5
        assert rel_err(gf[n], gr[n]) < tol, n
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-5


def _x(t=7, hidden=64):
    x = torch.randn(1 if t == 1 else 2, t, hidden, device=DEVICE)  # t == 1: a single token row
    return x.clone().requires_grad_(), x.clone().requires_grad_()


def _reference_and_inputs(fused, tokens):
    """PEFT in float64 (the reference for our float32), its float64 input, and our float32 input."""
    xr, xf = _x(t=tokens)
    return copy.deepcopy(fused).double(), xr.detach().double().requires_grad_(), xf


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r", [1, 4, 64])
def test_qkv_and_o_match_peft(r, bias, tokens):
    fused = make(r=r, bias=bias)
    ref, xr, xf = _reference_and_inputs(fused, tokens)
    peft32 = copy.deepcopy(fused)
    ref_outs = []
    for model, x in ((ref, xr), (peft32, xf.detach().clone())):
        at = model.self_attn
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
        o = at.o_proj(q)
        (q.square().sum() + 2 * k.sum() + v.pow(3).sum() + o.sum()).backward()
        ref_outs.append((q, k, v, o))
    fa = fused.self_attn
    qf, kf, vf = lora.apply_lora_qkv(fa, xf)
    of = lora.apply_lora_o(fa, qf)
    (qf.square().sum() + 2 * kf.sum() + vf.pow(3).sum() + of.sum()).backward()
    compare(ref, fused, ref_outs[0], (qf, kf, vf, of), xr, xf, peft32)


@pytest.mark.parametrize("glu_lora", [True, False])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("r", [4, 64, "mixed"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_mlp_matches_peft(act, r, tokens, glu_lora, monkeypatch):
    """Both paths: the fused one (base e | g from the GEMMs into one buffer, the adapter terms added in
    glu_lora_forward; the adapter products inside the GLU backward, glu_lora_backward, then glu_lora_dyb into
    that buffer; one dX GEMM) and the separate GEMMs (taken when the fused path does not apply: custom
    activations, dropout...)."""
    calls = []
    for name in ("glu_lora_forward", "glu_lora_backward", "glu_lora_dyb"):
        real = getattr(lora, name)
        monkeypatch.setattr(lora, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    if not glu_lora:
        monkeypatch.setattr(lora, "_mlp_fusable", lambda *a: False)
    fused = make(r=r, act=act)
    ref, xr, xf = _reference_and_inputs(fused, tokens)
    y = ref.mlp(xr)
    y.backward(torch.ones_like(y) * 0.5 + y.detach())
    apply = (
        lora.apply_lora_mlp_swiglu
        if act == "silu"
        else functools.partial(lora.apply_lora_mlp_geglu, approximate="tanh")
    )
    yf = apply(fused.mlp, xf)
    yf.backward(torch.ones_like(yf) * 0.5 + y.detach().float())
    compare(ref, fused, y, yf, xr, xf)
    assert calls == (["glu_lora_forward", "glu_lora_backward", "glu_lora_dyb"] if glu_lora else [])


def test_mlp_fused_not_inplace_and_input_without_grad():
    """The fused MLP with inplace=False (gradients into new buffers: the saved e, g stay intact, so a second
    backward through the same graph agrees) and with an input that needs no gradient (no dX GEMMs; the
    adapters' gradients unchanged)."""
    fused = make(r=8)
    ref, xr, xf = _reference_and_inputs(fused, 5)
    y = ref.mlp(xr)
    y.backward(y.detach())
    yf = lora.apply_lora_mlp_swiglu(fused.mlp, xf, inplace=False)
    yf.backward(y.detach(), retain_graph=True)
    compare(ref, fused, y, yf, xr, xf)
    first = grads(fused)
    fused.zero_grad()
    xf.grad = None
    yf.backward(y.detach())
    compare(ref, fused, y, yf, xr, xf)
    fused.zero_grad()
    yn = lora.apply_lora_mlp_swiglu(fused.mlp, xf.detach())
    yn.backward(y.detach())
    assert rel_err(yn, y) < 1e-5
    for n, g in grads(fused).items():
        assert rel_err(g, first[n]) < 1e-6, n


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_geglu_mlp_defaults_to_the_exact_gelu(approximate):
    """apply_lora_mlp_geglu follows the seed API (kernels.lora): the exact erf GELU unless approximate="tanh"
    is asked for (the two differ by ~2e-4 relative, far above fp32 agreement)."""
    fused = make(r=4, act="gelu_tanh" if approximate == "tanh" else "gelu")
    ref, xr, xf = _reference_and_inputs(fused, 5)
    y = ref.mlp(xr)
    y.backward(y.detach())
    kw = {} if approximate is None else {"approximate": approximate}
    yf = lora.apply_lora_mlp_geglu(fused.mlp, xf, **kw)
    yf.backward(y.detach().float())
    compare(ref, fused, y, yf, xr, xf)


def test_geglu_mlp_names_a_bad_approximation():
    with pytest.raises(ValueError, match="apply_lora_mlp_geglu: approximate must be 'none' or 'tanh', got 'erf'"):
        lora.apply_lora_mlp_geglu(make(r=4).mlp, torch.randn(2, 64, device=DEVICE), approximate="erf")


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


def _check_o_against_dense(W, quant, W_dense, tokens, scale, r=4):
    """LoRA_O over a quantised base weight vs plain autograd over its dense (reference-dequantised) value."""
    out_f, in_f = W_dense.shape
    A = (0.1 * torch.randn(r, in_f, device=DEVICE)).requires_grad_()
    B = (0.1 * torch.randn(out_f, r, device=DEVICE)).requires_grad_()
    x = torch.randn(tokens, in_f, device=DEVICE, requires_grad=True)
    y = lora.LoRA_O.apply(x, W, quant, A, B, scale)
    y.square().sum().backward()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ W_dense.T + scale * (x2 @ A2.T) @ B2.T
    y2.square().sum().backward()
    assert rel_err(y, y2) < 1e-5
    for a, b in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        assert rel_err(a, b) < 1e-5


def test_o_with_gptq_base_weight():
    """A GPTQ base weight is dequantised by the kernel in forward and backward."""
    in_f, out_f, bits = 64, 48, 4
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64).to(torch.int32).to(DEVICE)
    qz = torch.randint(-(2**31), 2**31 - 1, (2, out_f // 8), dtype=torch.int64).to(torch.int32).to(DEVICE)
    sc = (torch.rand(2, out_f) * 0.02).to(DEVICE)
    state = lora.GPTQState(qz, sc, None, bits, 32)
    W = naive_dequantize_gptq(qw, qz, sc, None, bits=bits, group_size=32)
    _check_o_against_dense(qw, state, W, tokens=9, scale=2.0)


def test_o_with_nf4_base_weight():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(48, 64, device=DEVICE)
    q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    _check_o_against_dense(q, qs, bnbf.dequantize_4bit(q, qs), tokens=5, scale=0.5)


def test_qkv_mixed_bases_ranks_scales_and_unused_output():
    """The stacked q/k/v path with an NF4 q, a GPTQ k and a plain v, different ranks and scales, a bias on k
    only, and V unused by the loss (its gradient None); then k without adapter (per-projection path)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    hid, T = 64, 6
    Wq = torch.randn(48, hid, device=DEVICE)
    q4, qs = bnbf.quantize_4bit(Wq, blocksize=64, compress_statistics=True, quant_type="nf4")
    qw = torch.randint(-(2**31), 2**31 - 1, (hid // 8, 16), dtype=torch.int64).to(torch.int32).to(DEVICE)
    qz = torch.randint(-(2**31), 2**31 - 1, (2, 16 // 8), dtype=torch.int64).to(torch.int32).to(DEVICE)
    sc = (torch.rand(2, 16) * 0.02).to(DEVICE)
    Wv = torch.randn(16, hid, device=DEVICE)
    dense = [bnbf.dequantize_4bit(q4, qs), naive_dequantize_gptq(qw, qz, sc, None, bits=4, group_size=32), Wv]
    bases = [(q4, qs), (qw, lora.GPTQState(qz, sc, None, 4, 32)), (Wv, None)]
    ranks, scales = (2, 5, 3), (0.5, 2.0, 1.0)
    k_bias = torch.randn(16, device=DEVICE, requires_grad=True)
    for k_adapter in (True, False):
        k_bias.grad = None
        AB = [
            (
                (0.1 * torch.randn(r, hid, device=DEVICE)).requires_grad_(),
                (0.1 * torch.randn(W.shape[0], r, device=DEVICE)).requires_grad_(),
            )
            for r, W in zip(ranks, dense)
        ]
        if not k_adapter:
            AB[1] = (None, None)
        x = torch.randn(T, hid, device=DEVICE, requires_grad=True)
        args = [t for (W, Q), (A, B), s in zip(bases, AB, scales) for t in (W, Q, A, B, s if A is not None else None)]
        q, k, v = lora.LoRA_QKV.apply(x, *args, True, None, k_bias, None)
        (q.square().sum() + (k * torch.arange(16, device=DEVICE)).sum()).backward()
        leaves = [x, k_bias] + [t for ab in AB for t in ab if t is not None]
        got = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        outs = []
        for W, (A, B), s, b in zip(dense, AB, scales, (None, k_bias, None)):
            y = x @ W.T + (0 if A is None else s * (x @ A.T) @ B.T) + (0 if b is None else b)
            outs.append(y)
        (outs[0].square().sum() + (outs[1] * torch.arange(16, device=DEVICE)).sum()).backward()
        for a, b in zip((q, k, v), outs):
            assert rel_err(a, b) < 1e-5
        for t, g in zip(leaves, got):  # V's adapter is outside the loss: PEFT leaves None, we give zeros
            assert rel_err(g, t.grad if t.grad is not None else torch.zeros_like(t)) < 1e-5


def _to_nf4(block, dtype):
    """The block with every base Linear replaced by a bitsandbytes NF4 Linear4bit (nested) on the GPU, and
    the block's own weights set to the dequantised values (the float reference)."""
    import bitsandbytes as bnb

    q = copy.deepcopy(block)
    for parent in (q.self_attn, q.mlp):
        for name, lin in list(parent.named_children()):
            l4 = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            l4.weight = bnb.nn.Params4bit(
                lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if lin.bias is not None:
                l4.bias = nn.Parameter(lin.bias.data.cpu())
            setattr(parent, name, l4.cuda())
    for (pname, lin), l4 in zip(
        [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)],
        [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)],
    ):
        lin.weight.data = bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state).float()
    return q


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("hidden,inter", [(64, 176), (5120, 13824)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_peft_on_gpu(dtype, hidden, inter, nf4):
    """Under autocast (fp32 adapters, as PEFT trains them), outputs and every gradient are as close to a
    float64 reference as PEFT's own autocast run: within 2x its error, or the dtype's rounding unit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if nf4:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = Block(hidden=hidden, inter=inter, q_out=hidden, kv_out=hidden // 4).cuda()
    base = _to_nf4(plain, dtype) if nf4 else copy.deepcopy(plain)
    cfg = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    )
    model = peft.inject_adapter_in_model(cfg, base).cuda()
    ref = peft.inject_adapter_in_model(cfg, plain).cuda()
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02)
            if "lora_" in n:
                p2.copy_(p)
    ref = ref.double()
    for m in (model, ref):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    x = torch.randn(3, 37, hidden, device="cuda")
    runs = {}
    for name, m, fn in (("ref", ref, None), ("peft", model, None), ("ours", model, "fused")):
        xx = x.detach().clone().double() if name == "ref" else x.detach().clone()
        xx.requires_grad_()
        at, mlp = m.self_attn, m.mlp
        with torch.autocast("cuda", dtype=dtype, enabled=name != "ref"):
            if fn is None:
                outs = (at.q_proj(xx), at.k_proj(xx), at.v_proj(xx), mlp(xx))
            else:
                outs = (*lora.apply_lora_qkv(at, xx), lora.apply_lora_mlp_swiglu(mlp, xx))
        g = torch.Generator(device="cuda").manual_seed(1)
        ups = [torch.randn(o.shape, device="cuda", generator=g).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, ups)
        runs[name] = (
            [o.detach().double() for o in outs]
            + [xx.grad.double()]
            + [p.grad.double() for n, p in m.named_parameters() if "lora_" in n]
        )
        for p in m.parameters():
            p.grad = None
    unit = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    for i, (r, p, o) in enumerate(zip(runs["ref"], runs["peft"], runs["ours"])):
        e_peft, e_ours = rel_err(p, r), rel_err(o, r)
        assert e_ours <= max(2 * e_peft, unit), (i, e_ours, e_peft)


@pytest.mark.parametrize("with_adapter", ["gate", "up", "down", "none"])
def test_mlp_with_adapters_on_some_projections(with_adapter):
    """LoRA_MLP with an adapter on one projection only (the others plain) vs plain torch autograd."""
    torch.manual_seed(0)
    hid, inter, T = 32, 80, 5
    Ws = [
        torch.randn(inter, hid, device=DEVICE) * 0.2,
        torch.randn(inter, hid, device=DEVICE) * 0.2,
        torch.randn(hid, inter, device=DEVICE) * 0.2,
    ]
    ABs = []
    for name, W in zip(("gate", "up", "down"), Ws):
        if name == with_adapter:
            ABs.append(
                (
                    (0.1 * torch.randn(3, W.shape[1], device=DEVICE)).requires_grad_(),
                    (0.1 * torch.randn(W.shape[0], 3, device=DEVICE)).requires_grad_(),
                    1.5,
                )
            )
        else:
            ABs.append((None, None, None))
    x = torch.randn(T, hid, device=DEVICE, requires_grad=True)
    args = [t for W, (A, B, s) in zip(Ws, ABs) for t in (W, None, A, B, s)]
    y = lora.LoRA_MLP.apply(x, *args, lora.swiglu_fg, lora.swiglu_fg_backward, True)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x] + [t for A, B, _ in ABs if A is not None for t in (A, B)]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    def proj(inp, W, A, B, s):
        return inp @ W.T + (0 if A is None else s * (inp @ A.T) @ B.T)

    ref = proj(F.silu(proj(x, Ws[0], *ABs[0])) * proj(x, Ws[1], *ABs[1]), Ws[2], *ABs[2])
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-5
    for t, g in zip(leaves, got):
        assert rel_err(g, t.grad) < 1e-5


@pytest.mark.parametrize("hidden", [64, 96])
def test_mlp_with_nf4_gate_up_down(hidden, monkeypatch):
    """LoRA_MLP with NF4 gate/up/down: the fused path (gate/up weights dequantised straight into the rows of
    one [W_g; W_u] buffer; hidden 96 is not a power of two) against plain autograd on the dequantised
    weights."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    inter, T, r = 128, 6, 4
    dense = [
        torch.randn(inter, hidden, device=DEVICE) * 0.2,
        torch.randn(inter, hidden, device=DEVICE) * 0.2,
        torch.randn(hidden, inter, device=DEVICE) * 0.2,
    ]
    qs = [bnbf.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="nf4") for w in dense]
    Ws = [bnbf.dequantize_4bit(q, s) for q, s in qs]
    ABs = [
        (
            (0.1 * torch.randn(r, W.shape[1], device=DEVICE)).requires_grad_(),
            (0.1 * torch.randn(W.shape[0], r, device=DEVICE)).requires_grad_(),
            1.5,
        )
        for W in Ws
    ]
    x = torch.randn(T, hidden, device=DEVICE, requires_grad=True)
    args = [t for (q, s), (A, B, sc) in zip(qs, ABs) for t in (q, s, A, B, sc)]
    calls = []
    real = lora._dequantize_nf4
    spy = lambda W, qs, out, dtype: calls.append(out is not None) or real(W, qs, out, dtype)  # noqa: E731
    monkeypatch.setattr(lora, "_dequantize_nf4", spy)
    monkeypatch.setattr(
        fusedlora.quant, "_dequantize_nf4", spy
    )  # dequantize_base (the base-weight dispatch) lives there
    y = lora.LoRA_MLP.apply(x, *args, lora.swiglu_fg, lora.swiglu_fg_backward, True)
    assert calls == [True, True, False]  # gate and up straight into one buffer's rows, then down
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x] + [t for A, B, _ in ABs for t in (A, B)]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    def proj(inp, W, A, B, s):
        return inp @ W.T + s * (inp @ A.T) @ B.T

    ref = proj(F.silu(proj(x, Ws[0], *ABs[0])) * proj(x, Ws[1], *ABs[1]), Ws[2], *ABs[2])
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-5
    for t, g in zip(leaves, got):
        assert rel_err(g, t.grad) < 1e-5


# ------------------------------------------------------------------ GPTQ bases under PEFT's GPTQLoraLinear
@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # PEFT: the stand-in is not a gptqmodel class
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False), (2, True)])
def test_gptq_bases_under_peft_gptq_lora_linear(bits, act_order):
    """LoRA_QKV, LoRA_O and LoRA_MLP over GPTQ QuantLinear bases, as PEFT wraps them (GPTQLoraLinear), vs
    PEFT's own forward/backward of the same modules in float64: outputs, dX and every dA, dB."""
    fused = gptq_lora_block(bits=bits, act_order=act_order)
    ref = copy.deepcopy(fused).double()
    assert type(fused.mlp.gate_proj).__name__ == "GPTQLoraLinear"
    xf = torch.randn(2, 7, 64, device=DEVICE, requires_grad=True)
    xr = xf.detach().double().requires_grad_()
    o_ref = attn_peft(ref.self_attn, xr)
    y_ref = ref.mlp(o_ref)
    (y_ref.square().sum() + o_ref.sum()).backward()
    o = attn_fused(fused.self_attn, xf)
    y = lora.apply_lora_mlp_swiglu(fused.mlp, o)
    (y.square().sum() + o.sum()).backward()
    compare(ref, fused, (o_ref, y_ref), (o, y), xr, xf)
    assert len(grads(fused)) == 14


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_gptq_repacked_kernels_are_reported():
    """A QuantLinear kernel that repacks its weight (marlin, exllamav2...) keeps PEFT's path, named."""
    block = gptq_lora_block()
    base = block.self_attn.o_proj.base_layer
    base.QUANT_TYPE = "marlin"
    with pytest.raises(lora.UnsupportedLoRA, match="QUANT_TYPE 'marlin'.*BACKEND.TORCH"):
        lora.get_lora_parameters(block.self_attn.o_proj)
    base.QUANT_TYPE = "torch"
    base.qweight = base.qweight.to(torch.int16)  # gptqmodel's pack_dtype int16
    with pytest.raises(lora.UnsupportedLoRA, match="packs into torch.int16; fusedlora reads int32 packing"):
        lora.get_lora_parameters(block.self_attn.o_proj)


def test_other_lora_variants_are_reported():
    """PEFT's LoRA variants (DoRA, QA-LoRA, aLoRA... in lora_variant) keep PEFT's path."""
    model = make()
    proj = model.mlp.down_proj
    proj.lora_variant["default"] = object()
    with pytest.raises(lora.UnsupportedLoRA, match="the object LoRA variant is not fused"):
        lora.get_lora_parameters(proj)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_16bit_matches_peft_everywhere(dtype):
    """16-bit LoRA MLP (the fused GLU-LoRA path, B non-zero) against PEFT in float64 from the same 16-bit
    weights, on CPU (interpreter: whose bf16 tl.dot is wrong, so the kernels compute their dots in fp32 there)
    and on the GPU. Tolerance: a few 16-bit roundings of the [T, I] intermediates (bf16: 2^-8 each)."""
    fused = make(r=4).to(dtype)
    ref = copy.deepcopy(fused).double()
    x = torch.randn(2, 5, 64, device=DEVICE).to(dtype)
    xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
    ref.mlp(xr).square().sum().backward()
    yf = lora.apply_lora_mlp_swiglu(fused.mlp, xf)
    yf.float().square().sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(yf, ref.mlp(xr).detach()) < tol
    gr, gf = grads(ref), grads(fused)
    assert gr.keys() == gf.keys() and any("lora_B" in n for n in gr)
    for n in gr:
        assert rel_err(gf[n], gr[n]) < 2 * tol, n
    assert rel_err(xf.grad, xr.grad) < 2 * tol


@pytest.mark.parametrize("glu_lora", [True, False])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_a_recomputable_norm_input_changes_no_bit(glu_lora, casting, offset, monkeypatch):
    """q/k/v and the MLP fed a recomputable rms_norm output (they keep the norm's input and weight and
    recompute the output in their backward: fusedlora.patch's recompute_norms) against the same output as a
    plain tensor: bit-identical outputs and gradients (autograd forbids changing the output in place, so the
    output's values at the recompute are its values at the call)."""
    from fusedlora.ops import rms_norm
    from fusedlora.ops.rms_norm import NormSource

    if not glu_lora:
        monkeypatch.setattr(lora, "_mlp_fusable", lambda *a: False)
    recomputes = []
    real = NormSource.recompute
    monkeypatch.setattr(NormSource, "recompute", lambda self, *a: recomputes.append(1) or real(self, *a))
    fused = make(r=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 64, generator=gen).to(DEVICE)
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(DEVICE)

    def run(recomputable):
        fused.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rms_norm(xi, wi, 1e-6, offset, casting, recomputable=recomputable)
        q, k, v = lora.apply_lora_qkv(fused.self_attn, y)
        m = lora.apply_lora_mlp_swiglu(fused.mlp, y)
        (q.square().sum() + (k * v).sum() + m.square().sum()).backward()
        return [q, k, v, m, xi.grad, wi.grad, *grads(fused).values()]

    plain, recomputed = run(False), run(True)
    assert len(recomputes) == 2  # (q/k/v and the MLP each recomputed the norm's output once)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))


def _function_args(kind, W_grad):
    """Positional arguments of LoRA_O / _QKV / _MLP.apply (the custom ops take the same) with plain base
    weights, the one named W_grad requiring grad."""
    torch.manual_seed(0)
    hid, inter, r = 32, 48, 4
    shapes = {
        "o": [("W", hid, hid)],
        "qkv": [("qW", hid, hid), ("kW", 16, hid), ("vW", 16, hid)],
        "mlp": [("gW", inter, hid), ("uW", inter, hid), ("dW", hid, inter)],
    }[kind]
    args = []
    for name, out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, device=DEVICE).requires_grad_(name == W_grad)
        A = torch.randn(r, in_f, device=DEVICE, requires_grad=True)
        args += [W, None, A, torch.randn(out_f, r, device=DEVICE, requires_grad=True), 0.5]
    return torch.randn(3, hid, device=DEVICE, requires_grad=True), args


_APPLY = {
    "o": (lambda X, args: lora.LoRA_O.apply(X, *args), lambda X, args: lora_ops.lora_o(X, *args)),
    "qkv": (lambda X, args: lora.LoRA_QKV.apply(X, *args), lambda X, args: lora_ops.lora_qkv(X, *args)),
    "mlp": (
        lambda X, args: lora.LoRA_MLP.apply(X, *args, lora.swiglu_fg, lora.swiglu_fg_backward),
        lambda X, args: lora_ops.lora_mlp(X, *args, "silu"),
    ),
}


@pytest.mark.parametrize("path", ["function", "custom_op"])
@pytest.mark.parametrize("kind,W_grad", [("o", "W"), ("qkv", "qW"), ("qkv", "vW"), ("mlp", "gW"), ("mlp", "dW")])
def test_base_weight_requiring_grad_is_refused(kind, W_grad, path):
    """A base weight that requires grad would get no gradient (its .grad stays None): each Function (in its
    backward: its forward cannot tell whether grad mode is on) and its custom op (at the call) refuse it,
    naming the Function and the argument; with no gradient wanted (no_grad) both run."""
    X, args = _function_args(kind, W_grad)
    apply = _APPLY[kind][path == "custom_op"]
    fn = {"o": "LoRA_O", "qkv": "LoRA_QKV", "mlp": "LoRA_MLP"}[kind]
    with pytest.raises(
        ValueError,
        match=f"{fn}: the base weight {W_grad} requires grad.*gives base weights no "
        f"gradient.*{W_grad}.requires_grad_\\(False\\)",
    ):
        outs = apply(X, args)
        sum(o.sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
    with torch.no_grad():
        apply(X, args)
    base = range(0, len(args), 5)  # (W, quant, A, B, scale) per projection
    args = [t.detach() if i in base else t for i, t in enumerate(args)]  # every base weight frozen: it runs
    outs = apply(X, args)
    sum(o.sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
    assert X.grad is not None and all(args[i + 2].grad is not None for i in base)


def test_custom_op_schemas_name_every_argument():
    """The LoRA custom ops take each projection's fields by name (<label>_<field>, lora.PROJECTION_ARGS) and
    the base weight as quant.BASE_TENSORS + quant.BaseLayout's named scalars: no packed int or float lists."""
    from fusedlora.quant import BaseLayout

    for op, labels in (
        (lora_ops.LORA_O_OP, ["o"]),
        (lora_ops.LORA_QKV_OP, ["q", "k", "v"]),
        (lora_ops.LORA_MLP_OP, ["gate", "up", "down"]),
    ):
        schema = op._opoverload._schema
        names = [a.name for a in schema.arguments]
        want = [
            "X",
            *(f"{label}_{name}" for label in labels for name, _ in lora_ops.PROJECTION_ARGS),
            "dtype",
            "training",
        ]
        assert names[: len(want)] == want, names
        types = {a.name: str(a.type) for a in schema.arguments}
        assert types[f"{labels[0]}_A"] == "Optional[Tensor]" and types[f"{labels[0]}_base"] == "List[Optional[Tensor]]"
        assert all(f"{labels[-1]}_{field}" in names for field in BaseLayout._fields)
        assert not [t for t in types.values() if t in ("List[int]", "List[float]", "List[SymInt]")], types
    assert [a.name for a in lora_ops.LORA_MLP_OP._opoverload._schema.arguments][-2:] == ["activation", "inplace"]
