"""Property tests: every public op and the fused LoRA functions on drawn shapes (one row, odd sizes, ranks 1-64),
dtypes, layouts (column slices of wider buffers, transposed views), ignore_index and position_ids patterns;
forward and every gradient against the fp64 reference, norm-wise and element-wise (conftest.assert_close).

Example counts are bounded so CI stays within minutes under the interpreter: FUSEDLORA_FUZZ_EXAMPLES (default 15
per test on CPU, 60 on a GPU). CI runs a fixed (derandomised) sequence; FUSEDLORA_FUZZ_RANDOM=1 draws fresh ones.
"""

import copy
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fusedlora import lora  # noqa: E402
from fusedlora.ops import (  # noqa: E402
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
from fusedlora.quant import dequantize_gptq  # noqa: E402
from fusedlora.testing import DEVICE, HAS_CUDA, assert_close  # noqa: E402

EXAMPLES = int(os.environ.get("FUSEDLORA_FUZZ_EXAMPLES", 60 if HAS_CUDA else 15))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUSEDLORA_FUZZ_RANDOM") != "1",
    suppress_health_check=list(HealthCheck),
    database=None,
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: sums of up to a few thousand terms; 16-bit: one or two roundings of the output (2^-8 / 2^-11 each)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _tol(*dtypes):
    return max(TOL[d] for d in dtypes)


def _laid_out(t, layout, dim=-1):
    """The same values as `t` in another memory layout: a column slice of a wider buffer, or contiguous."""
    if layout == "slice":
        pad = list(t.shape)
        pad[dim] += 3
        wide = torch.zeros(pad, dtype=t.dtype, device=t.device)
        view = wide.narrow(dim % t.dim(), 1, t.shape[dim])
        view.copy_(t)
        return view
    return t.clone()


def _leaf(t):
    return t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()


# ----------------------------------------------------------------------------------------- ops
@FUZZ
@given(st.data())
def test_fuzz_rms_norm(data):
    rows = data.draw(st.sampled_from([(1,), (3,), (2, 5), (9,)]))
    cols = data.draw(st.sampled_from([1, 3, 17, 64, 100, 257, 1000, 2050]))
    dtype = data.draw(st.sampled_from(DTYPES))
    wdtype = data.draw(st.sampled_from([dtype, torch.float32]))
    casting, offset = data.draw(st.sampled_from([("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)]))
    layout = data.draw(st.sampled_from(["contiguous", "slice"]))
    x = _laid_out(torch.randn(*rows, cols, device=DEVICE).to(dtype), layout)
    w = (1 + 0.3 * torch.randn(cols, device=DEVICE)).to(wdtype)
    xk = x.detach().requires_grad_()
    wk = w.clone().requires_grad_()
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    dy = torch.randn(y.shape, device=DEVICE).to(y.dtype)  # the reference gets the same (rounded) dy
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.double().requires_grad_()
    y64 = naive_rms_norm(x64, w64, 1e-5, offset, casting)
    y64.backward(dy.double())
    tol = _tol(dtype, wdtype)
    assert y.dtype == naive_rms_norm(x, w, 1e-5, offset, casting).dtype
    assert_close(y, y64, tol, "y")
    # dx = rstd (w dy - x_hat mean(x_hat w dy)) cancels terms of size |w dy| rstd (to ~eps when cols is 1), so
    # its rounding error scales with them, not with |dx|: the error is measured against that scale
    rstd = (x64.detach().pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    terms = float(((w64.detach() + offset) * dy.double()).abs().mul(rstd).max())
    assert_close(xk.grad, x64.grad, 2 * tol, "dx", floor=max(1e-2, terms))
    assert_close(wk.grad, w64.grad, 2 * tol, "dw")


@FUZZ
@given(st.data())
def test_fuzz_rms_norm_none_casting_and_no_weight(data):
    rows = data.draw(st.sampled_from([(1,), (3,), (2, 5)]))
    cols = data.draw(st.sampled_from([1, 17, 100, 257, 1000]))
    dtype = data.draw(st.sampled_from(DTYPES))
    casting = data.draw(st.sampled_from(["none", "llama", "gemma"]))
    has_weight = data.draw(st.booleans())
    offset = data.draw(st.sampled_from([0.0, 1.0])) if has_weight else 0.0
    x = _laid_out(
        torch.randn(*rows, cols, device=DEVICE).to(dtype), data.draw(st.sampled_from(["contiguous", "slice"]))
    )
    w = (1 + 0.3 * torch.randn(cols, device=DEVICE)).to(dtype) if has_weight else None
    xk = x.detach().requires_grad_()
    wk = w.clone().requires_grad_() if has_weight else None
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    dy = torch.randn(y.shape, device=DEVICE).to(y.dtype)
    x64 = x.detach().double().requires_grad_()
    w64 = w.double().requires_grad_() if has_weight else None
    y64 = naive_rms_norm(x64, w64, 1e-5, offset, casting)
    leaves, leaves64 = ((xk, wk), (x64, w64)) if has_weight else ((xk,), (x64,))
    grads = torch.autograd.grad(y, leaves, dy)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    tol = 2 * _tol(dtype) if casting == "none" else _tol(dtype)  # "none" also rounds rstd and xhat
    assert y.dtype == naive_rms_norm(x, w, 1e-5, offset, casting).dtype == dtype
    assert_close(y, y64, tol, "y")
    for name, g, g64 in zip(("dx", "dw"), grads, grads64):
        assert_close(g, g64, 2 * tol, name)


@FUZZ
@given(st.data())
def test_fuzz_rope(data):
    b = data.draw(st.integers(1, 3))
    hq = data.draw(st.integers(1, 5))
    hk = data.draw(st.integers(1, hq))
    s = data.draw(st.integers(1, 13))
    d = data.draw(st.sampled_from([2, 6, 16, 40, 64]))
    r = data.draw(st.sampled_from([x for x in (2, 4, 16, 32, 64) if x <= d] + [d]))
    dtype = data.draw(st.sampled_from(DTYPES))
    cache_dtype = data.draw(st.sampled_from([dtype, torch.float32]))
    mode = data.draw(st.sampled_from(["per_token", "per_token_broadcast", "cache_packed", "cache_random"]))
    hf_layout = data.draw(st.booleans())
    q = (
        torch.randn(b, s, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
        if hf_layout
        else torch.randn(b, hq, s, d, device=DEVICE).to(dtype)
    )
    k = torch.randn(b, hk, s, d, device=DEVICE).to(dtype)
    pos = None
    if mode.startswith("per_token"):
        rows = 1 if mode.endswith("broadcast") else b
        cos, sin = torch.randn(rows, s, r, device=DEVICE), torch.randn(rows, s, r, device=DEVICE)
    else:
        cos, sin = torch.randn(20, r, device=DEVICE), torch.randn(20, r, device=DEVICE)
        if mode == "cache_packed":  # documents packed in a row: positions restart
            cut = data.draw(st.integers(0, s))
            pos = torch.cat([torch.arange(cut), torch.arange(s - cut)]).expand(b, s).contiguous().to(DEVICE)
        else:
            pos = torch.randint(0, 20, (data.draw(st.sampled_from([1, b])), s), device=DEVICE)
    cos, sin = cos.to(cache_dtype), sin.to(cache_dtype)
    qk, kk = _leaf(q), _leaf(k)
    qo, ko = rope(qk, kk, cos, sin, pos)
    gq, gk = torch.randn(qo.shape, device=DEVICE), torch.randn(ko.shape, device=DEVICE)
    torch.autograd.backward((qo, ko), (gq.to(dtype), gk.to(dtype)))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qe, ke = naive_rope(q64, k64, cos.double(), sin.double(), pos)
    torch.autograd.backward((qe, ke), (gq.double(), gk.double()))
    tol = _tol(dtype)
    for got, want, name in ((qo, qe, "q"), (ko, ke, "k"), (qk.grad, q64.grad, "dq"), (kk.grad, k64.grad, "dk")):
        assert_close(got, want, tol, name)


@FUZZ
@given(st.data())
def test_fuzz_glu(data):
    rows = data.draw(st.integers(1, 5))
    cols = data.draw(st.sampled_from([1, 7, 64, 333, 700]))
    op, naive, kw = data.draw(
        st.sampled_from(
            [
                (swiglu, naive_swiglu, {}),
                (geglu, naive_geglu, {"approximate": "none"}),
                (geglu, naive_geglu, {"approximate": "tanh"}),
            ]
        )
    )
    dtype = data.draw(st.sampled_from(DTYPES))
    one_buffer = data.draw(st.booleans())
    if one_buffer:  # gate and up as column blocks of one [rows, 2 * cols] buffer (the LoRA MLP's layout)
        buf = torch.randn(rows, 2 * cols, device=DEVICE).to(dtype)
        e, g = buf[:, :cols], buf[:, cols:]
    else:
        e, g = torch.randn(rows, cols, device=DEVICE).to(dtype), torch.randn(rows, cols, device=DEVICE).to(dtype)
    ek, gk = e.detach().requires_grad_(), g.detach().requires_grad_()
    h = op(ek, gk, **kw)
    dh = torch.randn(h.shape, device=DEVICE)
    h.backward(dh.to(dtype))
    e64, g64 = e.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    h64 = naive(e64, g64, **kw)
    h64.backward(dh.double())
    tol = _tol(dtype)
    assert_close(h, h64, tol, "h")
    assert_close(ek.grad, e64.grad, 2 * tol, "de")
    assert_close(gk.grad, g64.grad, 2 * tol, "dg")


def _draw_labels(data, rows, vocab, ignore_index):
    y = torch.randint(0, vocab, (rows,), device=DEVICE)
    pattern = data.draw(st.sampled_from(["none", "some", "all_but_one", "all"]))
    if pattern == "some":
        y[::3] = ignore_index
    elif pattern == "all_but_one":
        y[1:] = ignore_index
    elif pattern == "all":
        y[:] = ignore_index
    return y, pattern


@FUZZ
@given(st.data())
def test_fuzz_cross_entropy(data):
    rows = data.draw(st.integers(1, 12))
    vocab = data.draw(st.sampled_from([1, 2, 7, 129, 1001, 4099]))
    dtype = data.draw(st.sampled_from(DTYPES))
    ignore_index = data.draw(st.sampled_from([-100, 0]))
    kw = dict(
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
        softcap=data.draw(st.sampled_from([None, 3.0])),
        logit_scale=data.draw(st.sampled_from([None, 0.5])),
        ignore_index=ignore_index,
    )
    if kw["reduction"] == "mean":
        kw["num_items_in_batch"] = data.draw(st.sampled_from([None, 5]))
    if kw["label_smoothing"] == 0.0 and data.draw(st.booleans()):  # per-class weights (not with smoothing)
        kw["weight"] = torch.rand(vocab, device=DEVICE) + 0.05
    y, pattern = _draw_labels(data, rows, vocab, ignore_index)
    z = _laid_out(
        (4 * torch.randn(rows, vocab, device=DEVICE)).to(dtype), data.draw(st.sampled_from(["contiguous", "slice"]))
    )
    zk = z.detach().requires_grad_()
    loss = cross_entropy(zk, y, **kw)
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, **kw)
    if kw["reduction"] == "mean" and kw.get("num_items_in_batch") is None and pattern == "all":
        # documented: a mean over no labels is 0 with zero gradients (torch's is NaN)
        loss.backward()
        assert loss.item() == 0.0 and not zk.grad.any()
        return
    g = torch.rand(ref.shape, device=DEVICE, dtype=torch.float64) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    # a loss that cancels to ~0 (one class, label smoothing) keeps the rounding of its logit-sized terms
    assert_close(loss, ref, 1e-5, "loss", floor=z.abs().max().item())
    assert zk.grad.dtype == dtype
    assert_close(zk.grad, z64.grad, _tol(dtype), "dlogits")


@FUZZ
@given(st.data())
def test_fuzz_fused_linear_cross_entropy(data):
    rows = data.draw(st.integers(1, 40))
    hidden = data.draw(st.sampled_from([8, 33, 64]))
    vocab = data.draw(st.sampled_from([5, 129, 1001]))
    dtype = data.draw(st.sampled_from(DTYPES))
    with_bias = data.draw(st.booleans())
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    chunk_bytes = data.draw(st.sampled_from([1, 4096, 2**27]))  # one row per chunk .. one chunk
    y, pattern = _draw_labels(data, rows, vocab, -100)
    if pattern == "all":
        y[0] = 1
    h = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    b = (0.1 * torch.randn(vocab, device=DEVICE)).to(dtype) if with_bias else None
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if with_bias else None
    loss = fused_linear_cross_entropy(hk, wk, y, bias=bk, reduction=reduction, max_chunk_bytes=chunk_bytes)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if with_bias else None
    ref = naive_linear_cross_entropy(h64, w64, y, bias=b64, reduction=reduction)
    g = torch.rand(ref.shape, device=DEVICE, dtype=torch.float64) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    tol = _tol(dtype)
    assert_close(loss, ref, max(tol, 1e-5), "loss")
    assert_close(hk.grad, h64.grad, 2 * tol, "dh")
    assert_close(wk.grad, w64.grad, 2 * tol, "dw")
    if with_bias:
        assert_close(bk.grad, b64.grad, 2 * tol, "db")


@FUZZ
@given(st.data())
def test_fuzz_chunked_linear_loss(data):
    rows = data.draw(st.integers(1, 30))
    hidden, vocab = data.draw(st.sampled_from([(8, 5), (33, 17)]))
    chunks = data.draw(st.integers(1, 5))
    y, pattern = _draw_labels(data, rows, vocab, -100)
    if pattern == "all":
        y[0] = 0
    h = torch.randn(rows, hidden, device=DEVICE).requires_grad_()
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden**0.5).requires_grad_()

    def per_item(z, t):
        return torch.nn.functional.cross_entropy(z.float(), t, reduction="none")

    chunked_linear_loss(h, w, y, per_item, num_chunks=chunks).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    naive_cross_entropy(h64 @ w64.t(), y).backward()
    # fp32 logits (one GEMM) carry 2^-24 x |logit| each, which the softmax gradient passes on: TOL[fp32]
    assert_close(h.grad, h64.grad, TOL[torch.float32], "dh")
    assert_close(w.grad, w64.grad, TOL[torch.float32], "dw")


@FUZZ
@given(st.data())
def test_fuzz_dequantize_gptq(data):
    from fusedlora.testing import pack_int_words

    bits = data.draw(st.sampled_from([2, 4, 8]))
    per = 32 // bits
    group = data.draw(st.sampled_from([16, 32, 64, -1]))
    n_in = data.draw(st.sampled_from([64, 128, 192]))
    n_out = per * data.draw(st.integers(1, 6))
    act_order = data.draw(st.booleans())
    fmt = data.draw(st.sampled_from(["gptq", "gptq_v2"]))
    out_dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    gs = n_in if group == -1 else group
    n_groups = n_in // gs
    q = torch.randint(0, 2**bits, (n_in, n_out))
    z = torch.randint(1, 2**bits, (n_groups, n_out))
    s = (torch.rand(n_groups, n_out) * 0.1 + 0.01).to(torch.float16)
    g_idx = (torch.randperm(n_in) // gs) if act_order else torch.arange(n_in) // gs
    qweight, qzeros = pack_int_words(q, bits, 0), pack_int_words(z - 1 if fmt == "gptq" else z, bits, 1)
    out = dequantize_gptq(
        qweight.to(DEVICE),
        qzeros.to(DEVICE),
        s.to(DEVICE),
        g_idx.to(DEVICE, torch.int32) if act_order else None,
        bits=bits,
        group_size=group,
        format=fmt,
        out_dtype=out_dtype,
    )
    want = ((q - z[g_idx]).double() * s.double()[g_idx]).t().to(DEVICE)
    assert out.dtype == out_dtype
    assert_close(out, want, 1e-6 if out_dtype == torch.float32 else _tol(out_dtype))


# ------------------------------------------------------------------------------- LoRA functions
def _peft_block(hidden, inter, q_out, kv_out, r, bias, dtype):
    pytest.importorskip("peft")
    from fusedlora.testing import make

    return make(r=r, bias=bias, hidden=hidden, inter=inter, q_out=q_out, kv_out=kv_out).to(dtype)


@FUZZ
@given(st.data())
def test_fuzz_lora_functions(data):
    hidden = data.draw(st.sampled_from([16, 40, 64]))
    inter = data.draw(st.sampled_from([24, 96, 176]))
    q_out, kv_out = data.draw(st.sampled_from([(hidden, hidden // 2), (2 * hidden, hidden), (hidden, hidden)]))
    r = data.draw(st.sampled_from([1, 2, 7, 16, 64]))
    tokens = data.draw(st.integers(1, 9))
    bias = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    act = data.draw(st.sampled_from(["silu", "gelu_tanh"]))
    fused = _peft_block(hidden, inter, q_out, kv_out, r, bias, dtype)
    fused.mlp.act = act
    ref, peft_same = copy.deepcopy(fused).double(), copy.deepcopy(fused)
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    xf, xr, xp = x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()
    q, k, v = lora.apply_lora_qkv(fused.self_attn, xf)
    o = lora.apply_lora_o(fused.self_attn, q)
    apply_mlp = (
        lora.apply_lora_mlp_swiglu
        if act == "silu"
        else lambda mlp, x: lora.apply_lora_mlp_geglu(mlp, x, approximate="tanh")
    )
    m = apply_mlp(fused.mlp, xf)
    (
        q.float().sum()
        + k.float().square().sum()
        + v.float().sum()
        + o.float().square().sum()
        + m.float().square().sum()
    ).backward()
    outs = {}
    for model, xin in ((ref, xr), (peft_same, xp)):  # PEFT in fp64 (the reference) and in x's own dtype
        at = model.self_attn
        qr, kr, vr = at.q_proj(xin), at.k_proj(xin), at.v_proj(xin)
        orf = at.o_proj(qr)
        mr = model.mlp(xin)
        (
            qr.double().sum()
            + kr.double().square().sum()
            + vr.double().sum()
            + orf.double().square().sum()
            + mr.double().square().sum()
        ).backward()
        outs[model is ref] = (qr, kr, vr, orf, mr)
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    for got, want, name in zip((q, k, v, o, m), outs[True], ("q", "k", "v", "o", "mlp")):
        assert_close(got, want, tol, name)
    assert_close(xf.grad, xr.grad, 2 * tol, "dX")
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    same = {n: p.grad for n, p in peft_same.named_parameters() if p.grad is not None}
    for n, p in fused.named_parameters():
        if n in grads:
            # a gradient that cancels (rank 1, one token) carries the rounding of its large terms in any 16-bit
            # implementation: at least 4x PEFT's own error in the same dtype is allowed
            peft_err = ((same[n].double() - grads[n]).abs().max() / grads[n].abs().max().clamp_min(1e-2)).item()
            assert_close(p.grad, grads[n], max(2 * tol, 4 * peft_err), n)
