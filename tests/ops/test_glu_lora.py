"""The GLU with the LoRA up-projections folded in (fusedlora.ops.glu_lora: glu_lora_forward / _backward /
glu_lora_dyb) against its plain-torch references, no tokens, bad input."""

import pytest
import torch

from fusedlora.testing import DEVICE, HAS_CUDA, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


LORA_DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]


LORA_CASES = [  # T, I, (r_g, r_u, r_d): one row, non-powers of two, mixed ranks (padded to R), r = 1 to 128
    (1, 64, (16, 16, 16)),
    (37, 200, (4, 8, 1)),
    (150, 130, (64, 64, 64)),
    (20, 96, (128, 100, 128)),
    (9, 64, (12, 5, 12)),
] + ([(4100, 8192, (16, 16, 16)), (3, 13824, (8, 8, 8))] if HAS_CUDA else [])


def _gate_up_inputs(T, I, dtype, layout):
    """dout, gate, up: separate contiguous tensors, or (one_buffer) gate and up as the halves of one
    [T, 2I + pad] buffer (the LoRA MLP's layout) and dout with a row stride of its own."""
    if layout == "separate":
        dout, gate, up = (torch.randn(T, I, device=DEVICE).to(dtype) for _ in range(3))
        return dout, 2 * gate, up
    buf = torch.randn(T, 2 * I + 40, device=DEVICE).to(dtype)
    buf[:, :I] *= 2
    return torch.randn(T, I + 8, device=DEVICE).to(dtype)[:, :I], buf[:, :I], buf[:, I : 2 * I]


def _lora_factors(T, I, ranks, dtype):
    """xa [T, r_g + r_u + 3] (a wider row stride than r_g + r_u), b_g, b_u [I, r], a_d [r_d, I], dyb [T, r_d]:
    scaled so each adapter term is of the order of the base values it is added to."""
    rg, ru, rd = ranks
    xa = torch.randn(T, rg + ru + 3, device=DEVICE).to(dtype)
    b_g, b_u = ((torch.randn(I, r, device=DEVICE) / r**0.5).to(dtype) for r in (rg, ru))
    a_d = (torch.randn(rd, I, device=DEVICE) / rd**0.5).to(dtype)
    dyb = torch.randn(T, rd, device=DEVICE).to(dtype)
    return xa, b_g, b_u, a_d, dyb


@pytest.mark.parametrize("layout", ["separate", "one_buffer"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", LORA_DTYPES)
@pytest.mark.parametrize("case", LORA_CASES)
def test_glu_lora_forward_matches_reference(case, dtype, act, layout):
    """h = act(e) * g with the gate / up adapter terms added to the base GEMM outputs, vs float64; gate and
    up untouched, h contiguous."""
    from fusedlora.ops.glu_lora import glu_lora_forward, naive_glu_lora_forward

    T, I, (rg, ru, rd) = case
    _, gate, up = _gate_up_inputs(T, I, dtype, layout)
    xa, b_g, b_u, _, _ = _lora_factors(T, I, (rg, ru, rd), dtype)
    gate0, up0 = gate.clone(), up.clone()
    h = glu_lora_forward(gate, up, xa, rg, b_g, b_u, (0.5, 2.0), act)
    assert h.shape == (T, I) and h.is_contiguous() and h.dtype == dtype
    assert torch.equal(gate, gate0) and torch.equal(up, up0)
    want = naive_glu_lora_forward(gate, up, xa[:, :rg], xa[:, rg : rg + ru], b_g, b_u, (0.5, 2.0), act)
    assert rel_err(h, want) < TOL[dtype]


@pytest.mark.parametrize(
    "layout,inplace",
    [("separate", True), ("separate", False), ("one_buffer", True), ("one_buffer", False), ("one_buffer", "out")],
)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", LORA_DTYPES)
@pytest.mark.parametrize("case", LORA_CASES)
def test_glu_lora_backward_matches_reference(case, dtype, act, layout, inplace):
    """de, dg and the three token-reduced adapter products vs float64 (e, g and dh with their adapter
    terms), with the padding columns exactly zero. The products are taken from the rounded de, dg, h (as a
    separate GEMM on them would be), so they carry the dtype's rounding like de and dg. Layouts: separate
    tensors, and gate | up as one buffer's halves with dout's own row stride; results over gate / up
    (inplace), to new tensors, or to `out`."""
    from fusedlora.ops.glu_lora import glu_lora_backward, glu_lora_rank_pad, naive_glu_lora_backward

    T, I, (rg, ru, rd) = case
    dout, gate, up = _gate_up_inputs(T, I, dtype, layout)
    xa, b_g, b_u, a_d, dyb = _lora_factors(T, I, (rg, ru, rd), dtype)
    scales = (0.5, 2.0)
    ref = naive_glu_lora_backward(dout, gate, up, xa[:, :rg], xa[:, rg : rg + ru], dyb, b_g, b_u, a_d, scales, act)
    gate0, up0 = gate.clone(), up.clone()
    out = None
    if inplace == "out":
        obuf = torch.full((T, gate.stride(0)), float("nan"), device=DEVICE).to(dtype)
        out = (obuf[:, :I], obuf[:, I : 2 * I])
    de, dg, Q = glu_lora_backward(dout, gate, up, xa, rg, dyb, b_g, b_u, a_d, scales, act, inplace is True, out=out)
    assert de.stride() == gate.stride() and dg.stride() == up.stride()
    assert (de.data_ptr() == gate.data_ptr()) == (inplace is True) and (dg.data_ptr() == up.data_ptr()) == (
        inplace is True
    )
    if out is not None:
        assert de.data_ptr() == out[0].data_ptr() and dg.data_ptr() == out[1].data_ptr()
    if inplace is not True:
        assert torch.equal(gate, gate0) and torch.equal(up, up0)
    R = glu_lora_rank_pad(max(rg, ru, rd))
    assert Q.shape == (I, 3 * R) and Q.dtype == torch.float32
    got = [de, dg, Q[:, :rg], Q[:, R : R + ru], Q[:, 2 * R : 2 * R + rd]]
    want = [ref[0], ref[1], *ref[2]]
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < tol, (i, rel_err(a, b))
    assert all(bool((p == 0).all()) for p in (Q[:, rg:R], Q[:, R + ru : 2 * R], Q[:, 2 * R + rd :]))


def test_glu_lora_of_no_tokens():
    from fusedlora.ops.glu_lora import glu_lora_backward, glu_lora_forward

    z = torch.empty(0, 64, device=DEVICE)
    xa, b, a = torch.empty(0, 32, device=DEVICE), torch.randn(64, 16, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    assert glu_lora_forward(z, z, xa, 16, b, b, (1.0, 1.0), "silu").shape == (0, 64)
    de, dg, Q = glu_lora_backward(
        z, z.clone(), z.clone(), xa, 16, torch.empty(0, 16, device=DEVICE), b, b, a, (1.0, 1.0), "silu"
    )
    assert de.shape == (0, 64) and Q.shape == (64, 48) and bool((Q == 0).all())


def test_glu_lora_bad_input():
    from fusedlora.ops.glu_lora import glu_lora_backward, glu_lora_forward

    t = torch.randn(8, 64, device=DEVICE)
    xa, dyb = torch.randn(8, 32, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    b, a = torch.randn(64, 16, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    bwd = (b, b, a, (1.0, 1.0), "silu")
    with pytest.raises(
        ValueError,
        match=r"dout must be torch.float32 \[8, 64\] with a unit last stride, got "
        r"torch.float32 \(8, 65\)",
    ):
        glu_lora_backward(torch.randn(8, 65, device=DEVICE), t.clone(), t.clone(), xa, 16, dyb, *bwd)
    with pytest.raises(ValueError, match="out tensors must match gate's shape and strides"):
        glu_lora_backward(
            t, t.clone(), t.clone(), xa, 16, dyb, *bwd, out=(t.clone(), torch.randn(8, 65, device=DEVICE)[:, :64])
        )
    with pytest.raises(ValueError, match="gate and up must be 2-D with one shape and strides"):
        glu_lora_backward(t, t.clone(), torch.randn(8, 32, device=DEVICE), xa, 16, dyb, *bwd)
    with pytest.raises(ValueError, match="gate, up and xa need a unit last stride"):
        glu_lora_backward(t, t.clone(), t.clone(), torch.randn(32, 8, device=DEVICE).t(), 16, dyb, *bwd)
    with pytest.raises(
        ValueError, match=r"xa \(8, 32\) must hold X A_g\^T in columns \[0, 16\) and X A_u\^T in \[20, 36\)"
    ):
        glu_lora_forward(t, t, xa, 20, b, b, (1.0, 1.0), "silu")
    with pytest.raises(ValueError, match=r"a_down must be a contiguous \[16, 64\], got \(16, 32\)"):
        glu_lora_backward(t, t.clone(), t.clone(), xa, 16, dyb, b, b, a[:, :32], (1.0, 1.0), "silu")
    with pytest.raises(ValueError, match=r"b_up must be a contiguous \[64, 16\]"):
        glu_lora_forward(t, t, xa, 16, b, a.t(), (1.0, 1.0), "silu")
    with pytest.raises(TypeError, match=r"b_gate is torch.float16 .* it must match gate \(torch.float32"):
        glu_lora_forward(t, t, xa, 16, b.half(), b, (1.0, 1.0), "silu")
    with pytest.raises(ValueError, match=r"dyb must be torch.float32 \[8, 16\]"):
        glu_lora_backward(t, t.clone(), t.clone(), xa, 16, dyb[:, :8], *bwd)


@pytest.mark.parametrize("dtype", LORA_DTYPES)
@pytest.mark.parametrize("case", LORA_CASES)
def test_glu_lora_dyb_matches_reference(case, dtype):
    """[s_g de B_g | s_u dg B_u] vs float64 (ranks below 16 and unequal ranks take the zero-padded B path;
    de, dg with a wider row stride than I)."""
    from fusedlora.ops.glu_lora import glu_lora_dyb, naive_glu_lora_dyb

    T, I, (rg, ru, _) = case
    wide = torch.randn(2, T, I + 8, device=DEVICE).to(dtype)
    de, dg = wide[0, :, :I], wide[1, :, :I]
    b_g, b_u = ((torch.randn(I, r, device=DEVICE) / I**0.5).to(dtype) for r in (rg, ru))
    got = glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0))
    assert got.shape == (T, rg + ru) and got.dtype == dtype
    want = naive_glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0))
    assert rel_err(got, want) < TOL[dtype]
    # into the columns after de | dg of one buffer (the LoRA MLP's dX GEMM input); the rest untouched
    buf = torch.zeros(T, 2 * I + rg + ru + 5, device=DEVICE, dtype=dtype)
    into = glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=buf[:, 2 * I : 2 * I + rg + ru])
    assert into.data_ptr() == buf[:, 2 * I :].data_ptr() and torch.equal(into, got)
    assert not buf[:, : 2 * I].any() and not buf[:, 2 * I + rg + ru :].any()


def test_glu_lora_dyb_of_no_tokens():
    from fusedlora.ops.glu_lora import glu_lora_dyb

    z = torch.empty(0, 64, device=DEVICE)
    assert glu_lora_dyb(
        z, z, torch.randn(64, 8, device=DEVICE), torch.randn(64, 8, device=DEVICE), (1.0, 1.0)
    ).shape == (0, 16)


def test_glu_lora_dyb_bad_input():
    from fusedlora.ops.glu_lora import glu_lora_dyb

    t, b = torch.randn(8, 64, device=DEVICE), torch.randn(64, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape and one row stride"):
        glu_lora_dyb(t, torch.randn(8, 65, device=DEVICE)[:, :64], b, b, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"b_up must be \[64, r\]"):
        glu_lora_dyb(t, t, b, torch.randn(32, 8, device=DEVICE), (1.0, 1.0))
    with pytest.raises(TypeError, match="b_gate is torch.float16"):
        glu_lora_dyb(t, t, b.half(), b, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"out must be \[8, 16\]"):
        glu_lora_dyb(t, t, b, b, (1.0, 1.0), out=torch.empty(8, 17, device=DEVICE))
