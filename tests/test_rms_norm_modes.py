"""RMSNorm without a weight and with casting="none" (every step in x's dtype), and the repeated-backward /
loss-scale standard for every casting.

Forward: against the plain-torch reference in x's dtype (the same roundings: at most a few ulps apart where a
rounding of rstd flips, more under Triton's CPU interpreter, which truncates to bf16) and in fp64. Gradients:
against fp64 autograd of the reference ("none" included: its backward is the unrounded function's); bf16/fp16
carry the rounding of their output (2^-8 / 2^-11 relative), so 1e-2; fp32 sums of a few hundred terms agree
to 1e-5."""

import pytest
import torch

from fusedlora.ops import naive_rms_norm, rms_norm
from fusedlora.ops.rms_norm import norm_source
from fusedlora.testing import DEVICE, HAS_CUDA, rel_err

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
