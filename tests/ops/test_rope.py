"""RoPE of q and k (GQA; fusedlora.ops.rope) vs an fp64 reference of HF's apply_rotary_pos_emb, with
position_ids: reference comparison, property tests (layouts, caches, packed positions), caches whose halves
differ, 16-bit q/k with an fp32 cache, bad input, torch.compile.

fp32: ~1e-6; fp16/bf16: one output rounding, so ~2^-11 / 2^-8 relative in norm."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlora.ops import (
    naive_rope,
    rope,
)
from fusedlora.testing import (
    DEVICE,
    FUZZ_DTYPES,
    HAS_CUDA,
    assert_close,
    assert_device_assert,
    fuzz_settings,
    fuzz_tol,
    kernel_round,
    op_compile_tests,
    randn_leaf,
    rel_err,
    reset_dynamo,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.bfloat16]


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


# (B, Hq, Hk, S, D, rotary dim)
CASES = [(1, 1, 1, 1, 64, 64), (2, 5, 3, 7, 80, 80), (2, 4, 2, 9, 96, 32), (1, 3, 1, 3, 256, 256)]


if HAS_CUDA:
    CASES += [(4, 32, 8, 2048, 128, 128), (2, 40, 8, 333, 128, 64)]


def _cache(max_pos, r, device, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64, device=device) / r))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=device), inv)
    e = torch.cat([f, f], -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def _positions(b, s, kind):
    if kind == "packed":  # sequences packed in one row: positions restart
        p = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)])
        return p.expand(b, s).clone()
    if kind == "offset":  # left padding / cache offsets: a different start per row
        return torch.stack([torch.arange(s) + 3 * i for i in range(b)])
    return torch.arange(s)[None] + 5  # [1, S] broadcast over the batch


@pytest.mark.parametrize("mode", ["hf", "packed", "offset", "broadcast"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rope_matches_reference(case, dtype, mode):
    b, hq, hk, s, d, r = case
    q = torch.randn(b, s, hq, d, device=DEVICE).to(dtype).transpose(1, 2)  # HF's layout: a transposed view
    k = torch.randn(b, hk, s, d, device=DEVICE).to(dtype)
    cos, sin = _cache(s + 3 * b + 8, r, DEVICE, dtype)
    if mode == "hf":
        pos = _positions(b, s, "offset").to(DEVICE)
        args = (cos[pos], sin[pos], None)
        ref_args = (cos[pos].double(), sin[pos].double(), None)
    else:
        pos = _positions(b, s, {"packed": "packed", "offset": "offset", "broadcast": "bcast"}[mode]).to(DEVICE)
        args = (cos, sin, pos)
        ref_args = (cos.double(), sin.double(), pos)
    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = rope(qk, kk, *args)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    qr, kr = naive_rope(q64, k64, *ref_args)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [gq, gk])
    torch.autograd.backward([qr, kr], [gq.double(), gk.double()])
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    tol = TOL[dtype]
    for a, ref in ((qo, qr), (ko, kr), (qk.grad, q64.grad), (kk.grad, k64.grad)):
        assert rel_err(a, ref) < tol


def test_fp32_cache_with_bf16_inputs_and_only_q_used():
    q = torch.randn(2, 4, 5, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 64, device=DEVICE, requires_grad=True)
    cos, sin = _cache(16, 64, DEVICE, torch.float32)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], device=DEVICE)
    qo, _ = rope(q, k, cos, sin, pos)
    qo.sum().backward()
    q64 = q.detach().double().requires_grad_()
    naive_rope(q64, k.detach().double(), cos.double(), sin.double(), pos)[0].sum().backward()
    assert rel_err(q.grad, q64.grad) < 1e-5 and torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda q, k, c, s, p: rope(q, k[:, :, :3], c, s, p), "must share B, S and D"),
        (lambda q, k, c, s, p: rope(q, k.double(), c, s, p), "k has dtype float64"),
        (lambda q, k, c, s, p: rope(q, k, c[:, :63], s[:, :63], p), "must be even"),
        (lambda q, k, c, s, p: rope(q, k, c, s[:, :32], p), "must match"),
        (lambda q, k, c, s, p: rope(q, k, c[None], s[None], p), "must be a \\[max_pos, rotary_dim\\] cache"),
        (lambda q, k, c, s, p: rope(q, k, c, s, p[:, :2]), "position_ids has shape"),
        (lambda q, k, c, s, p: rope(q, k, c, s, p.float()), "position_ids has dtype float32"),
        (lambda q, k, c, s, p: rope(q, k, c[:4][None], s[:4][None], None), "cos/sin have shape"),
        (lambda q, k, c, s, p: rope(q[0], k, c, s, p), "must be \\[B, H, S, D\\]"),
    ],
)
def test_bad_input(bad, match):
    q = torch.randn(2, 4, 5, 64, device=DEVICE)
    k = torch.randn(2, 2, 5, 64, device=DEVICE)
    cos, sin = _cache(16, 64, DEVICE, torch.float32)
    pos = torch.arange(5, device=DEVICE)[None].expand(2, 5)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(q, k, cos, sin, pos)


OOR_POS = """
import torch
from fusedlora.ops import rope
q = torch.randn(1, 2, 3, 64, device="cuda")
cos = torch.randn(4, 64, device="cuda")
rope(q, q, cos, cos, torch.tensor([[0, 1, 4]], device="cuda"))
torch.cuda.synchronize()
"""


def test_out_of_range_position_raises():
    if HAS_CUDA:  # a device-side assert ends the CUDA context: check it in its own process
        assert_device_assert(OOR_POS, "position_ids must be in")
        return
    q = torch.randn(1, 2, 3, 64)
    cos, sin = _cache(4, 64, DEVICE, torch.float32)
    with pytest.raises(RuntimeError, match="position_ids must be in \\[0, 4\\)"):
        rope(q, q, cos, sin, torch.tensor([[0, 1, 4]]))


def test_rope_shape_errors_print_real_alternatives():
    from fusedlora.ops import rope

    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos/sin have shape \(1, 4, 8\); expected \[1, 5, rotary_dim\] \(or a"):
        rope(q, q, torch.randn(1, 4, 8, device=DEVICE), torch.randn(1, 4, 8, device=DEVICE))
    q2 = torch.randn(3, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \[3, 5, rotary_dim\] or \[1, 5, rotary_dim\]"):
        rope(q2, q2, torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE))


# ----------------------------------------------------------------------------------- property tests


FUZZ = fuzz_settings()


def _leaf(t):
    return t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()


@FUZZ
@given(st.data())
def test_fuzz_rope(data):
    b = data.draw(st.integers(1, 3))
    hq = data.draw(st.integers(1, 5))
    hk = data.draw(st.integers(1, hq))
    s = data.draw(st.integers(1, 13))
    d = data.draw(st.sampled_from([2, 6, 16, 40, 64]))
    r = data.draw(st.sampled_from([x for x in (2, 4, 16, 32, 64) if x <= d] + [d]))
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
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
    tol = fuzz_tol(dtype)
    for got, want, name in ((qo, qe, "q"), (ko, ke, "k"), (qk.grad, q64.grad, "dq"), (kk.grad, k64.grad, "dk")):
        assert_close(got, want, tol, name)


# ---------------------------------------------------------- faults the norm-wise checks let through


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


# ------------------------------------------------------------------------------------ torch.compile
fresh_dynamo = pytest.fixture(reset_dynamo)  # (the compile cases': Dynamo's caches empty around each)

COMPILE_CASES = {
    "rope": lambda: (
        rope,
        (randn_leaf(2, 5, 4, 16).transpose(1, 2), randn_leaf(2, 2, 5, 16), *_compile_cos_sin(5, 16)),
    ),
    "rope_positions": lambda: (
        rope,
        (randn_leaf(2, 4, 5, 16), randn_leaf(2, 2, 5, 16), *_compile_cos_sin(12, 16, cache=True), _compile_positions()),
    ),
}


def _compile_cos_sin(seq, dim, cache=False):
    f = torch.outer(torch.arange(seq, device=DEVICE, dtype=torch.float32), torch.rand(dim // 2, device=DEVICE))
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    return (cos, sin) if cache else (cos[None], sin[None])


def _compile_positions():
    return torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]], device=DEVICE)


test_public_op_compiles_whole_and_matches_eager, test_ops_compile_where_is_compiling_holds_only_in_dynamo = (
    op_compile_tests(COMPILE_CASES, "rope")
)
