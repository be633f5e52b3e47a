"""SwiGLU / GeGLU (fusedlora.ops.glu) forward and gradients vs fp64 references: shapes and dtypes, layouts,
property tests, fp16, a second backward through the in-place op (and a refused double backward), bad input,
torch.compile.

fp32 agrees with fp64 to ~1e-6; fp16/bf16 carry one output rounding (2^-11 / 2^-8 relative)."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlora.ops import (
    geglu,
    naive_geglu,
    naive_swiglu,
    swiglu,
)
from fusedlora.testing import (
    DEVICE,
    FUZZ_DTYPES,
    HAS_CUDA,
    assert_close,
    fuzz_settings,
    fuzz_tol,
    op_compile_tests,
    randn_leaf,
    rel_err,
    reset_dynamo,
)

SHAPES = [(1, 1), (7, 333), (2, 3, 64), (1, 5120)] + ([(4096, 14336), (3, 8191)] if HAS_CUDA else [])


DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.bfloat16]


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


OPS = {
    "swiglu": (swiglu, naive_swiglu),
    "geglu": (geglu, naive_geglu),
    "geglu_tanh": (lambda g, u, **kw: geglu(g, u, "tanh", **kw), lambda g, u: naive_geglu(g, u, "tanh")),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_glu_matches_reference(shape, dtype, name, inplace):
    op, ref = OPS[name]
    g = (2 * torch.randn(*shape, device=DEVICE)).to(dtype)
    u = torch.randn(*shape, device=DEVICE).to(dtype)
    dy = torch.randn(*shape, device=DEVICE).to(dtype)
    gk, uk = g.clone().requires_grad_(), u.clone().requires_grad_()
    # in place is for intermediate activations (the gate/up projections' outputs), not leaves
    y = op(gk * 1, uk * 1, inplace=True) if inplace else op(gk, uk)
    y.backward(dy)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    y64 = ref(g64, u64)
    y64.backward(dy.double())
    assert y.dtype == dtype and gk.grad.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(y, y64) < tol
    assert rel_err(gk.grad, g64.grad) < tol
    assert rel_err(uk.grad, u64.grad) < tol
    assert torch.equal(gk.detach(), g), "the caller's gate must never be overwritten"


def test_non_contiguous_inputs():
    base = torch.randn(6, 2 * 96, device=DEVICE)
    g, u = base[:, ::2].requires_grad_(), base[:, 1::2].clone().requires_grad_()
    swiglu(g, u).sum().backward()
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    naive_swiglu(g64, u64).sum().backward()
    assert rel_err(g.grad, g64.grad) < 1e-5 and rel_err(u.grad, u64.grad) < 1e-5


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 5), (7, 333), (5, 2048)] + ([(3000, 8192)] if HAS_CUDA else []))
def test_forward_reads_column_blocks_of_one_buffer(rows, cols, dtype, act):
    """glu_forward on the two halves of one [T, 2I + pad] buffer (the LoRA MLP's gate|up GEMM output) reads
    them in place with their row stride: the same h as from contiguous copies, and a contiguous output. A
    ragged last column block (cols not a multiple of the block) and a single column block per row included."""
    from fusedlora.ops.glu import glu_forward

    buf = (2 * torch.randn(rows, 2 * cols + 24, device=DEVICE)).to(dtype)
    g, u = buf[:, :cols], buf[:, cols : 2 * cols]
    h = glu_forward(g, u, act)
    assert h.is_contiguous() and h.shape == (rows, cols)
    # as from contiguous copies, to one rounding of the dtype plus an erf one fp32 ulp apart: the two layouts may
    # launch different variants (a 16-divisible stride or not), one prebuilt and one JIT-compiled by another Triton
    # (seen on an H100: triton 3.6 JIT beside 3.9 cubins, GELU in bf16 and fp16). In the tail, h = g u (1 + erf) / 2
    # cancels, so that ulp of erf is an absolute error of up to |g u| / 2 * 2^-23, past any relative bound of h
    # (and fp16 holds those tail values ~1e-6 as subnormals, whose rounding step is absolute: 2^-24).
    flat = glu_forward(g.contiguous(), u.contiguous(), act)
    if HAS_CUDA:
        gu = (g.float() * u.float()).abs()
        step = torch.finfo(dtype).eps * flat.float().abs().clamp_min(torch.finfo(dtype).smallest_normal)
        bound = step + torch.finfo(torch.float32).eps * gu  # (one rounding: a subnormal's is absolute)
        excess = (h.float() - flat.float()).abs() - bound
        assert (excess <= 0).all(), (excess.max().item(), (excess > 0).sum().item())
    else:  # (one interpreter runs both)
        assert torch.equal(h, flat)
    ref = {"silu": naive_swiglu, "gelu": naive_geglu, "gelu_tanh": lambda a, b: naive_geglu(a, b, "tanh")}[act]
    assert rel_err(h, ref(g.double(), u.double())) < TOL[dtype]


def test_forward_of_mismatched_shapes_is_named():
    from fusedlora.ops.glu import glu_forward

    with pytest.raises(ValueError, match=r"gate \(4, 8\) and up \(4, 7\) differ in shape"):
        glu_forward(torch.randn(4, 8, device=DEVICE), torch.randn(4, 7, device=DEVICE), "silu")


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda g, u: swiglu(g, u[:, :-1]), "gate has shape"),
        (lambda g, u: swiglu(g, u.double()), "up has dtype float64"),
        (lambda g, u: swiglu(g.half(), u), "gate is torch.float16 but up is torch.float32"),
        (lambda g, u: geglu(g, u, "fast"), "approximate must be"),
        (lambda g, u: swiglu(g.int(), u.int()), "gate has dtype int32"),
    ],
)
def test_bad_input(bad, match):
    g = torch.randn(4, 8, device=DEVICE)
    u = torch.randn(4, 8, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(g, u)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_store_h_writes_the_forward_h_over_dout(act, dtype):
    """store_h: the backward also writes h over d(out), bit-identical to the forward's h (LoRA_MLP uses it
    instead of recomputing h); the gradients are unchanged."""
    from fusedlora.ops.glu import glu_backward, glu_forward

    g = (2 * torch.randn(7, 333, device=DEVICE)).to(dtype)
    u = torch.randn(7, 333, device=DEVICE).to(dtype)
    dy = torch.randn(7, 333, device=DEVICE).to(dtype)
    h = glu_forward(g, u, act)
    dg_ref, du_ref = glu_backward(dy, g, u, act, False)
    dout = dy.clone()
    dg, du, h2 = glu_backward(dout, g.clone(), u.clone(), act, True, store_h=True)
    assert h2.data_ptr() == dout.data_ptr()
    assert torch.equal(h2, h) and torch.equal(dg, dg_ref) and torch.equal(du, du_ref)


# -------------------------------------------------------------------------------- repeated backward


def _assert_same_grads(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= tol, (what, i, rel_err(g, w))


@pytest.mark.parametrize("op", [swiglu, geglu])
def test_second_backward_through_inplace_glu(op):
    """swiglu / geglu with inplace=True (what a patched Phi-3 MLP runs on its private gate/up copies)."""
    g0, u0 = torch.randn(5, 96, device=DEVICE), torch.randn(5, 96, device=DEVICE)
    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    w = torch.randn(5, 96, device=DEVICE)

    def loss():
        y = op(g * 1, u * 1, inplace=True)
        return (y * w).sum() + 0.05 * y.square().sum()

    want = torch.autograd.grad(loss(), (g, u))
    graph = loss()
    first = torch.autograd.grad(graph, (g, u), retain_graph=True)
    handed_out = [t.clone() for t in first]
    second = torch.autograd.grad(graph, (g, u))
    _assert_same_grads(first, want, 1e-6, "first")
    _assert_same_grads(second, want, 1e-6, "second")
    assert all(torch.equal(a, b) for a, b in zip(first, handed_out))


@pytest.mark.parametrize("compiling", [False, True])
def test_double_backward_through_glu_is_refused(compiling, monkeypatch):
    if compiling:  # the custom op (fusedlora.ops.glu's GLU_OP), as under torch.compile
        monkeypatch.setattr(importlib.import_module("fusedlora.ops._custom"), "compiling", lambda: True)
    g = torch.randn(5, 96, device=DEVICE, requires_grad=True)
    u = torch.randn(5, 96, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="swiglu / geglu: its gradients come from kernels"):
        torch.autograd.grad(swiglu(g, u).square().sum(), g, create_graph=True)


# ----------------------------------------------------------------------------------- property tests


FUZZ = fuzz_settings()


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
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
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
    tol = fuzz_tol(dtype)
    assert_close(h, h64, tol, "h")
    assert_close(ek.grad, e64.grad, 2 * tol, "de")
    assert_close(gk.grad, g64.grad, 2 * tol, "dg")


# ---------------------------------------------------------- faults the norm-wise checks let through


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


# ------------------------------------------------------------------------------------ torch.compile
fresh_dynamo = pytest.fixture(reset_dynamo)  # (the compile cases': Dynamo's caches empty around each)

COMPILE_CASES = {
    "swiglu": lambda: (lambda g, u: swiglu(g, u), (randn_leaf(3, 40), randn_leaf(3, 40))),
    "geglu_tanh": lambda: (lambda g, u: geglu(g, u, "tanh"), (randn_leaf(3, 40), randn_leaf(3, 40))),
}


test_public_op_compiles_whole_and_matches_eager, test_ops_compile_where_is_compiling_holds_only_in_dynamo = (
    op_compile_tests(COMPILE_CASES, "swiglu")
)
