"""Options of the cross-entropy losses that peers offer: per-class weights (torch's F.cross_entropy `weight`),
vs torch in fp64, forward and gradients, all dtypes, odd shapes, ignored rows."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, assert_close
from fusedlora.ops import cross_entropy, fused_linear_cross_entropy, naive_linear_cross_entropy

# losses in fp32 sums; gradients rounded once to the logits' dtype (bf16 2^-8, fp16 2^-11 relative)
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
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
    loss = fused_linear_cross_entropy(hk, wk, y, reduction=reduction, ce_weight=cw,
                                      max_chunk_bytes=6 * 70 * h.element_size())
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = naive_linear_cross_entropy(h64, w64, y, ce_weight=cw.double(), reduction=reduction)
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(loss, ref, 1e-5 if dtype == torch.float32 else 1e-2, "loss")
    assert_close(hk.grad, h64.grad, 3 * GRAD_TOL[dtype], "d hidden")
    assert_close(wk.grad, w64.grad, 3 * GRAD_TOL[dtype], "d weight")


@pytest.mark.parametrize("bad,match", [
    (lambda z, y: cross_entropy(z, y, weight=torch.rand(9, device=DEVICE)),
     r"cross_entropy: weight has shape \(9,\); expected one weight per class, \(10,\)"),
    (lambda z, y: cross_entropy(z, y, weight=torch.rand(10, device=DEVICE), label_smoothing=0.1),
     "cross_entropy: weight together with label_smoothing is not supported"),
    (lambda z, y: cross_entropy(z, y, weight=torch.ones(10, device=DEVICE, dtype=torch.long)),
     "cross_entropy: weight has dtype int64"),
    (lambda z, y: fused_linear_cross_entropy(z, torch.randn(12, 10, device=DEVICE), y, ce_weight=torch.rand(10)),
     r"fused_linear_cross_entropy: ce_weight has shape \(10,\); expected one weight per class, \(12,\)"),
])
def test_class_weight_bad_input(bad, match):
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(z, y)
