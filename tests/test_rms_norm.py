"""RMSNorm forward and both gradients against plain-torch references (fp64 for gradients).

Tolerances: fp32 kernels agree with fp64 to ~1e-6 relative (sums of a few thousand fp32 terms);
fp16/bf16 outputs carry one rounding of 2^-11 / 2^-8 relative, so their forward is compared with the
reference computed in the same dtype (HF's exact op order) and their gradients with fp64 at 1e-2."""

import pytest
import torch

from fusedlora.ops import naive_rms_norm, rms_norm
from fusedlora.testing import DEVICE, HAS_CUDA, rel_err

SHAPES_CPU = [(1, 64), (7, 333), (3, 5, 96), (1, 5120), (2, 2048), (5, 1)]  # (5, 1): strides equal to 1
SHAPES_GPU = SHAPES_CPU + [(4096, 4096), (513, 16384), (9, 8192), (1, 65536)]
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
    # Same-dtype reference: at most one rounding step apart anywhere.
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
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
