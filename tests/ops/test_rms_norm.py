"""RMSNorm (fusedlora.ops.rms_norm) against plain-torch references (fp64 for gradients): forward and both
gradients over shapes, dtypes and castings; the weight-less and casting="none" modes; the repeated-backward /
loss-scale standard; property tests; fault-aimed element-wise cases; bad input; torch.compile.

Tolerances: fp32 kernels agree with fp64 to ~1e-6 relative (sums of a few thousand fp32 terms); 16-bit
outputs carry one rounding (2^-8 / 2^-11)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlora.ops import (
    naive_rms_norm,
    rms_norm,
)
from fusedlora.ops.rms_norm import norm_source
from fusedlora.testing import (
    DEVICE,
    FUZZ_DTYPES,
    HAS_CUDA,
    assert_close,
    fuzz_settings,
    fuzz_tol,
    kernel_round,
    laid_out,
    op_compile_tests,
    randn_leaf,
    rel_err,
    reset_dynamo,
)

# (5, 1): strides equal to 1; (2, 75, 128): head_dim rows, 16 a block, more blocks than programs, a partial one
SHAPES_CPU = [(1, 64), (7, 333), (3, 5, 96), (1, 5120), (2, 2048), (5, 1), (2, 75, 128)]


SHAPES_GPU = SHAPES_CPU + [(4096, 4096), (513, 16384), (9, 8192), (1, 65536), (4, 2047, 32, 128)]


DTYPES_CPU = [torch.float32, torch.bfloat16]  # the interpreter is slow in fp16 emulation; GPU covers all


DTYPES_GPU = [torch.float32, torch.float16, torch.bfloat16]


def _run(shape, dtype, casting, offset, wdtype=None):
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=DEVICE)).to(wdtype or dtype)
    dy = torch.randn(*shape, device=DEVICE, dtype=dtype)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    y.backward(dy.to(y.dtype))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = naive_rms_norm(x64, w64, 1e-5, offset, casting)
    y64.backward(dy.double())
    y_same = naive_rms_norm(x, w, 1e-5, offset, casting)
    return y, y_same, y64, xk.grad, x64.grad, wk.grad, w64.grad


@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)])
@pytest.mark.parametrize("dtype", DTYPES_GPU if HAS_CUDA else DTYPES_CPU)
@pytest.mark.parametrize("shape", SHAPES_GPU if HAS_CUDA else SHAPES_CPU)
def test_rms_norm_matches_reference(shape, dtype, casting, offset):
    y, y_same, y64, dx, dx64, dw, dw64 = _run(shape, dtype, casting, offset)
    assert y.shape == y_same.shape and y.dtype == y_same.dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    # Triton's interpreter truncates fp32 -> bf16 instead of rounding: two truncations in Llama mode.
    assert rel_err(y, y64) < (tol if HAS_CUDA or dtype == torch.float32 else 2e-2)
    # Same-dtype reference: at most one rounding step apart anywhere; on the interpreter bf16 (two truncations
    # against the reference's two roundings) up to 2.5 ulps, 2^-7 each relative at a binade's bottom.
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2 if HAS_CUDA else 2.5 * 2**-7}[dtype]
    assert torch.allclose(y.float(), y_same.float(), rtol=ulp, atol=ulp)
    assert dx.dtype == dtype and dw.dtype == dtype
    if shape[-1] == 1:  # dx = rstd * (g - xhat * g * xhat) cancels to ~0: compare absolutely at fp32 scale
        assert torch.allclose(dx.double(), dx64, atol=1e-4 if dtype == torch.float32 else 5e-2)
    else:
        assert rel_err(dx, dx64) < tol
    assert rel_err(dw, dw64) < tol


def test_mixed_dtypes_follow_hf_promotion():
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.float32)
    w = torch.randn(64, device=DEVICE, dtype=torch.bfloat16)
    y = rms_norm(x, w, casting="llama")
    ref = naive_rms_norm(x, w, casting="llama")
    assert y.dtype == ref.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    assert rms_norm(x, w, casting="gemma").dtype == torch.float32


def test_non_contiguous_input_and_weight_without_grad():
    base = torch.randn(6, 2 * 96, device=DEVICE)
    x = base[:, ::2].requires_grad_()  # last stride 2: copied to rows
    w = torch.randn(96, device=DEVICE)
    y = rms_norm(x, w)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    naive_rms_norm(x64, w.double()).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5


def test_empty_rows():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x, w: rms_norm(x, w[:-1]), "weight has shape"),
        (lambda x, w: rms_norm(x.long(), w), "x has dtype int64"),
        (lambda x, w: rms_norm(x, w.to(torch.int32)), "weight has dtype int32"),
        (lambda x, w: rms_norm(x, w, casting="phi"), "casting must be one of"),
        (lambda x, w: rms_norm(x, w[None]), "weight has shape"),
        (lambda x, w: rms_norm(x.numpy(), w), "x must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    if "numpy" in str(bad.__code__.co_names) and DEVICE != "cpu":
        x = x.cpu()
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, w)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="x is on cpu; fusedlora kernels need CUDA tensors"):
        rms_norm(torch.randn(2, 64), torch.randn(64))


@pytest.mark.gpu
def test_mismatched_devices_are_refused():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        rms_norm(torch.randn(2, 64, device="cuda"), torch.randn(64))


def test_too_wide_rows_are_refused():
    with pytest.raises(ValueError, match="at most 65536"):
        rms_norm(torch.randn(1, 65537, device=DEVICE), torch.randn(65537, device=DEVICE))


# ------------------------------------------------------------------------- casting modes, no weight


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


SHAPES = [(7, 333), (3, 5, 96), (2, 1), (1, 1000)] + ([(513, 4096), (9, 8191)] if HAS_CUDA else [])


MODES = [
    ("llama", True, 0.0),
    ("gemma", True, 1.0),
    ("none", True, 0.0),
    ("none", True, 1.0),
    ("llama", False, 0.0),
    ("gemma", False, 0.0),
    ("none", False, 0.0),
]


def _ulps(dtype, casting):
    """Same-dtype agreement: one rounding's worth, doubled for the interpreter's bf16 truncation, and more for
    "none", whose rstd is itself rounded (a flip there moves a whole row by an ulp)."""
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if dtype != torch.float32 and casting == "none":
        ulp *= 2
    return ulp * (2 if dtype == torch.bfloat16 and not HAS_CUDA else 1)


def _rounded_steps(x, w, eps, offset):
    """casting="none" as torch's CUDA ops compute it on x's dtype: each op in fp32, rounded once to its
    dtype. (Torch's CPU rsqrt on fp16 rounds its sqrt first, an ulp off: naive_rms_norm there is not exact.)"""

    def rounded(t, dtype=x.dtype):
        return t.to(dtype).float()

    xf = x.float()
    mean_sq = rounded(rounded(xf * xf).mean(-1, keepdim=True))
    xhat = rounded(xf * rounded(torch.rsqrt(rounded(mean_sq + eps))))
    if w is None:
        return xhat.to(x.dtype)
    return (xhat * rounded(w.float() + offset, w.dtype)).to(torch.promote_types(x.dtype, w.dtype))


def _inputs(shape, dtype, has_weight):
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=DEVICE)).to(dtype) if has_weight else None
    return x, w


@pytest.mark.parametrize("casting,has_weight,offset", MODES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_reference(shape, dtype, casting, has_weight, offset):
    x, w = _inputs(shape, dtype, has_weight)
    dy = torch.randn(*shape, device=DEVICE, dtype=dtype)
    xk = x.clone().requires_grad_()
    wk = w.clone().requires_grad_() if has_weight else None
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    y_same = naive_rms_norm(x, w, 1e-5, offset, casting)
    assert y.shape == x.shape and y.dtype == y_same.dtype == dtype
    ulp = _ulps(dtype, casting)
    assert torch.allclose(y.float(), y_same.float(), rtol=ulp, atol=ulp), (y.float() - y_same.float()).abs().max()
    if casting == "none" and (dtype == torch.float16 or (dtype == torch.bfloat16 and HAS_CUDA)):
        # the same bits as each step rounded once (Llama's casting matches ~2/3 of them), but where an fp32
        # rounding difference (the GPU's approximate sqrt and division) flips one of rstd's roundings
        assert (y == _rounded_steps(x, w, 1e-5, offset)).float().mean() >= 0.99
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_() if has_weight else None
    y64 = naive_rms_norm(x64, w64, 1e-5, offset, casting)
    tol = 2e-5 if dtype == torch.float32 else (1e-2 if HAS_CUDA or dtype == torch.float16 else 3e-2)
    assert rel_err(y, y64) < tol
    leaves = (xk, wk) if has_weight else (xk,)
    grads = torch.autograd.grad(y, leaves, dy)
    grads64 = torch.autograd.grad(y64, (x64, w64) if has_weight else (x64,), dy.double())
    gtol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, g, g64 in zip(("dx", "dw"), grads, grads64):
        assert g.dtype == dtype, name
        if shape[-1] == 1 and name == "dx":  # dx cancels to ~0 for a one-element row: compare absolutely
            assert torch.allclose(g.double(), g64, atol=1e-4 if dtype == torch.float32 else 5e-2), name
        else:
            assert rel_err(g, g64) < gtol, (name, rel_err(g, g64))


@pytest.mark.parametrize("casting,has_weight,offset", MODES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_second_backward_and_loss_scale(dtype, casting, has_weight, offset):
    """A second backward (retain_graph) gives the same gradients and leaves the first ones as they were (the
    saved tensors are never overwritten); an fp16 loss scale of 2^10 scales every gradient exactly (the
    kernels compute in fp32, where a power of two commutes with every rounding)."""
    x, w = _inputs((5, 72), dtype, has_weight)
    xk = x.clone().requires_grad_()
    wk = w.clone().requires_grad_() if has_weight else None
    leaves = (xk, wk) if has_weight else (xk,)
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    for a, b, k in zip(first, second, kept):
        assert torch.equal(a, b) and torch.equal(a, k)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
    scaled = torch.autograd.grad(y, leaves, dy * 1024, retain_graph=True)
    for a, s in zip(first, scaled):
        # exact, but where the unscaled gradient is an fp16 subnormal (spacing 2^-24, lost to its rounding)
        assert torch.isfinite(s).all() and (s.float() / 1024 - a.float()).abs().max() <= 2**-25
    y.backward(dy)  # and .grad accumulation through the same graph
    assert torch.equal(xk.grad, first[0])


def test_recomputable_output_without_weight_recomputes_the_same_bits():
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16)
    for casting in ("llama", "none"):
        y = rms_norm(x, None, 1e-6, casting=casting, recomputable=True)
        source = norm_source(y)
        assert source.weight is None and torch.equal(source.recompute(source.x2d, None).view_as(y), y)


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            lambda x, w: rms_norm(x, None, offset=1.0),
            r"rms_norm: offset=1.0 is added to the weight, but weight is None",
        ),
        (lambda x, w: rms_norm(x, w[:-1], casting="none"), r"expected weight of shape \(64,\) or None"),
        (lambda x, w: rms_norm(x, w, casting="fp32"), r"casting must be one of \('llama', 'gemma', 'none'\)"),
        (lambda x, w: rms_norm(x[0, 0], None), r"rms_norm: x is a scalar"),
    ],
)
def test_bad_input_is_named(bad, match):
    x, w = torch.randn(4, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        bad(x, w)


# ----------------------------------------------------------------------------------- property tests


FUZZ = fuzz_settings()


@FUZZ
@given(st.data())
def test_fuzz_rms_norm(data):
    rows = data.draw(st.sampled_from([(1,), (3,), (2, 5), (9,)]))
    cols = data.draw(st.sampled_from([1, 3, 17, 64, 100, 257, 1000, 2050]))
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
    wdtype = data.draw(st.sampled_from([dtype, torch.float32]))
    casting, offset = data.draw(st.sampled_from([("llama", 0.0), ("gemma", 1.0), ("llama", 1.0)]))
    layout = data.draw(st.sampled_from(["contiguous", "slice"]))
    x = laid_out(torch.randn(*rows, cols, device=DEVICE).to(dtype), layout)
    w = (1 + 0.3 * torch.randn(cols, device=DEVICE)).to(wdtype)
    xk = x.detach().requires_grad_()
    wk = w.clone().requires_grad_()
    y = rms_norm(xk, wk, 1e-5, offset, casting)
    dy = torch.randn(y.shape, device=DEVICE).to(y.dtype)  # the reference gets the same (rounded) dy
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.double().requires_grad_()
    y64 = naive_rms_norm(x64, w64, 1e-5, offset, casting)
    y64.backward(dy.double())
    tol = fuzz_tol(dtype, wdtype)
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
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
    casting = data.draw(st.sampled_from(["none", "llama", "gemma"]))
    has_weight = data.draw(st.booleans())
    offset = data.draw(st.sampled_from([0.0, 1.0])) if has_weight else 0.0
    x = laid_out(torch.randn(*rows, cols, device=DEVICE).to(dtype), data.draw(st.sampled_from(["contiguous", "slice"])))
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
    tol = 2 * fuzz_tol(dtype) if casting == "none" else fuzz_tol(dtype)  # "none" also rounds rstd and xhat
    assert y.dtype == naive_rms_norm(x, w, 1e-5, offset, casting).dtype == dtype
    assert_close(y, y64, tol, "y")
    for name, g, g64 in zip(("dx", "dw"), grads, grads64):
        assert_close(g, g64, 2 * tol, name)


# ---------------------------------------------------------- faults the norm-wise checks let through


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


def test_rms_norm_empty_last_dimension():
    from fusedlora.ops import rms_norm

    with pytest.raises(
        ValueError, match=r"rms_norm: x has shape \(4, 0\): its last dimension \(the one normalised\) is empty"
    ):
        rms_norm(torch.randn(4, 0, device=DEVICE), torch.ones(0, device=DEVICE))


# ------------------------------------------------------------------------------------ torch.compile
fresh_dynamo = pytest.fixture(reset_dynamo)  # (the compile cases': Dynamo's caches empty around each)

COMPILE_CASES = {
    "rms_norm": lambda: (lambda x, w: rms_norm(x, w, 1e-6), (randn_leaf(2, 5, 64), randn_leaf(64))),
    "rms_norm_gemma": lambda: (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "gemma"), (randn_leaf(3, 48), randn_leaf(48))),
    "rms_norm_none": lambda: (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "none"), (randn_leaf(3, 48), randn_leaf(48))),
    "rms_norm_no_weight": lambda: (lambda x: rms_norm(x, None, 1e-6, casting="none"), (randn_leaf(2, 3, 40),)),
}


test_public_op_compiles_whole_and_matches_eager, test_ops_compile_where_is_compiling_holds_only_in_dynamo = (
    op_compile_tests(COMPILE_CASES, "rms_norm")
)
