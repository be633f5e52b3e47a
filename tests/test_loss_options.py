"""Options of the cross-entropy losses that peers offer: per-class weights (torch's F.cross_entropy `weight`)
and the z-loss (lse_square_scale, return_z_loss as Liger-Kernel's), vs torch / by hand in fp64, forward and
gradients, all dtypes, odd shapes, ignored rows."""

import pytest
import torch
import torch.nn.functional as F

from fusedlora.ops import cross_entropy, fused_linear_cross_entropy, naive_linear_cross_entropy
from fusedlora.testing import DEVICE, assert_close

# fp32 within fp32 sums. bf16 gradients are made in the forward and rounded again by the backward's d loss
# scale: two roundings of 2^-8 (a full ulp each where the interpreter truncates); fp16's once, to 2^-11
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-3}
# the fused head: its logits are rounded to the dtype first (as test_faults' bf16 case), then two matmuls
FLCE_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
REDUCTIONS = ["mean", "sum", "none"]


def _labels(rows, n_cols, ignore_index=-100):
    y = torch.randint(0, n_cols, (rows,), device=DEVICE)
    y[1::3] = ignore_index
    return y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (7, 333), (5, 4100)], ids=str)
def test_cross_entropy_class_weight(shape, dtype, reduction):
    """Each row's loss times weight[label]; "mean" divides by the non-ignored labels' weights (torch's rule)."""
    z = (3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    y = _labels(shape[0], shape[1])
    y[0] = 3  # at least one label used
    w = torch.rand(shape[1], device=DEVICE) + 0.1
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk, y, reduction=reduction, weight=w)
    z64 = z.double().requires_grad_()
    ref = F.cross_entropy(z64, y, weight=w.double(), reduction=reduction)
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(zk.grad, z64.grad, GRAD_TOL[dtype], "d logits")


def test_cross_entropy_class_weight_items_and_empty_batches():
    """num_items_in_batch, when given, is the divisor (as without weights); a mean whose labels are all
    ignored, or all of weight 0, is 0 with zero gradients (torch: NaN), as the unweighted mean."""
    z = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    y = _labels(6, 40)
    w = torch.rand(40, device=DEVICE)
    loss = cross_entropy(z, y, weight=w, num_items_in_batch=17)
    ref = F.cross_entropy(z.detach().double(), y, weight=w.double(), reduction="sum") / 17
    assert_close(loss, ref, 1e-6)
    for labels, weights in ((torch.full((6,), -100, device=DEVICE), w), (y, torch.zeros(40, device=DEVICE))):
        z.grad = None
        loss = cross_entropy(z, labels, weight=weights)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_cross_entropy_class_weight(dtype, reduction):
    """ce_weight through the fused head over several chunks (the per-row scale sliced with each chunk)."""
    h = torch.randn(23, 16, device=DEVICE).to(dtype)
    w = (0.3 * torch.randn(70, 16, device=DEVICE)).to(dtype)
    cw = torch.rand(70, device=DEVICE) + 0.1
    y = _labels(23, 70)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(
        hk, wk, y, reduction=reduction, ce_weight=cw, max_chunk_bytes=6 * 70 * h.element_size()
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = naive_linear_cross_entropy(h64, w64, y, ce_weight=cw.double(), reduction=reduction)
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(loss, ref, 1e-5 if dtype == torch.float32 else 1e-2, "loss")
    assert_close(hk.grad, h64.grad, FLCE_GRAD_TOL[dtype], "d hidden")
    assert_close(wk.grad, w64.grad, FLCE_GRAD_TOL[dtype], "d weight")


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            lambda z, y: cross_entropy(z, y, weight=torch.rand(9, device=DEVICE)),
            r"cross_entropy: weight has shape \(9,\); expected one weight per class, \(10,\)",
        ),
        (
            lambda z, y: cross_entropy(z, y, weight=torch.rand(10, device=DEVICE), label_smoothing=0.1),
            "cross_entropy: weight together with label_smoothing is not supported",
        ),
        (
            lambda z, y: cross_entropy(z, y, weight=torch.ones(10, device=DEVICE, dtype=torch.long)),
            "cross_entropy: weight has dtype int64",
        ),
        (
            lambda z, y: fused_linear_cross_entropy(
                z, torch.randn(12, 10, device=DEVICE), y, ce_weight=torch.rand(10, device=DEVICE)
            ),
            r"fused_linear_cross_entropy: ce_weight has shape \(10,\); expected one weight per class, \(12,\)",
        ),
    ],
)
def test_class_weight_bad_input(bad, match):
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(z, y)


# ------------------------------------------------------------------------------------------ z-loss
def _z_loss_reference(x64, y, reduction, lse_square_scale, label_smoothing=0.0, weight=None, items=None):
    """(loss, z_loss) by hand in fp64: cross-entropy + lse_square_scale * logsumexp^2 per used row, both
    weighted by weight[label] and reduced as torch's (weighted) mean / sum / none."""
    used = y != -100
    w_rows = used.double() if weight is None else torch.where(used, weight.double()[y.clamp(min=0)], 0.0)
    ce = F.cross_entropy(x64, y, reduction="none", label_smoothing=label_smoothing)  # 0 for ignored rows
    z_rows = lse_square_scale * torch.logsumexp(x64, -1) ** 2
    loss_rows, z_rows = w_rows * (ce + z_rows), w_rows * z_rows
    if reduction == "none":
        return loss_rows, z_rows
    divisor = 1.0 if reduction == "sum" else items if items is not None else w_rows.sum()
    return loss_rows.sum() / divisor, z_rows.sum() / divisor


Z_CASES = [{}, {"label_smoothing": 0.1}, {"weight": True}, {"num_items_in_batch": 11}]


@pytest.mark.parametrize("kw", Z_CASES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (7, 333), (5, 4100)], ids=str)
def test_cross_entropy_z_loss(shape, dtype, reduction, kw):
    """The loss holds the z-loss (its gradient 2 * scale * lse * softmax included); return_z_loss gives that
    part apart, without a gradient."""
    z = (3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    y = _labels(shape[0], shape[1])
    y[0] = 2
    kw = dict(kw)
    weight = torch.rand(shape[1], device=DEVICE) + 0.1 if kw.pop("weight", False) else None
    zk = z.clone().requires_grad_()
    loss, z_loss = cross_entropy(
        zk, y, reduction=reduction, weight=weight, lse_square_scale=0.02, return_z_loss=True, **kw
    )
    z64 = z.double().requires_grad_()
    ref, ref_z = _z_loss_reference(
        z64, y, reduction, 0.02, kw.get("label_smoothing", 0.0), weight, kw.get("num_items_in_batch")
    )
    assert not z_loss.requires_grad and z_loss.dtype == torch.float32
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(z_loss, ref_z, 1e-5, "z_loss")
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(zk.grad, z64.grad, GRAD_TOL[dtype], "d logits")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_cross_entropy_z_loss(dtype, reduction):
    h = torch.randn(23, 16, device=DEVICE).to(dtype)
    w = (0.5 * torch.randn(70, 16, device=DEVICE)).to(dtype)
    y = _labels(23, 70)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, z_loss = fused_linear_cross_entropy(
        hk,
        wk,
        y,
        reduction=reduction,
        lse_square_scale=0.02,
        return_z_loss=True,
        max_chunk_bytes=6 * 70 * h.element_size(),
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref, ref_z = _z_loss_reference(F.linear(h64, w64), y, reduction, 0.02)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(loss, ref, tol, "loss")
    assert_close(z_loss, ref_z, tol, "z_loss")
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(hk.grad, h64.grad, FLCE_GRAD_TOL[dtype], "d hidden")
    assert_close(wk.grad, w64.grad, FLCE_GRAD_TOL[dtype], "d weight")


def test_z_loss_off_returns_zero_and_bad_scale_refused():
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    loss, z_loss = cross_entropy(z, y, return_z_loss=True)
    assert z_loss.item() == 0.0 and torch.equal(loss, cross_entropy(z, y))
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cross_entropy: lse_square_scale must be a finite Python number >= 0"):
            cross_entropy(z, y, lse_square_scale=bad)
