"""The losses' answers in the corners of issue 34 ("no silent wrong answers"), each vs an fp64 reference:
repeated backward (retain_graph), -inf logits across the kernel's chunk boundary, chunked_linear_loss's
target shapes, fp16 gradients under a loss scale, and fused_linear_cross_entropy under torch.autocast."""

import pytest
import torch
import torch.nn.functional as F

from csrc_triton.cross_entropy import CE_BLOCK
from fusedlora.ops import (
    chunked_linear_loss,
    cross_entropy,
    fused_linear_cross_entropy,
    naive_cross_entropy,
    naive_linear_cross_entropy,
)
from fusedlora.testing import DEVICE, assert_close, rel_err

# fp32 within fp32 sums. bf16 gradients are made in the forward and rounded again by the backward's d loss
# scale: two roundings of 2^-8 (a full ulp each where the interpreter truncates); fp16's once, to 2^-11
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-3}
# the fused head: its logits are rounded to the dtype first (as test_faults' bf16 case), then two matmuls
FLCE_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _labels(rows, n_cols):
    y = torch.randint(0, n_cols, (rows,), device=DEVICE)
    y[1] = -100
    return y


# ---------------------------------------------------------------------------- repeated backward
@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_second_backward(dtype, reduction, inplace_grad):
    """Three backwards through one loss (retain_graph), each with its own d loss: every gradient is right,
    and the first one handed out is never written again (the forward's gradient is not rescaled in place).
    bf16/fp32 rescale the gradient the forward made; fp16 recomputes it (and inplace_grad must then keep
    the logits it still needs)."""
    z = (3 * torch.randn(5, 77, device=DEVICE)).to(dtype)
    y = _labels(5, 77)
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk * 1.0 if inplace_grad else zk, y, reduction=reduction, inplace_grad=inplace_grad)
    z64 = z.double().requires_grad_()
    ref = naive_cross_entropy(z64, y, reduction=reduction)
    grads = []
    for i, scale in enumerate((2.0, 3.0, 0.5)):
        (g,) = torch.autograd.grad(loss * scale, zk, retain_graph=i < 2)
        (g64,) = torch.autograd.grad(ref * scale, z64, retain_graph=True)
        assert_close(g, g64, GRAD_TOL[dtype], f"backward {i}")
        grads.append((g, g.clone()))
    for i, (g, copy) in enumerate(grads):
        assert torch.equal(g, copy), f"the gradient of backward {i} was overwritten by a later backward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_cross_entropy_second_backward(reduction, dtype):
    """The same for d hidden, d weight and d bias (made in the forward except for fp16), over 3 chunks."""
    h = torch.randn(13, 16, device=DEVICE).to(dtype)
    w = (0.3 * torch.randn(40, 16, device=DEVICE)).to(dtype)
    b = torch.randn(40, device=DEVICE).to(dtype)
    y = _labels(13, 40)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = fused_linear_cross_entropy(
        leaves[0], leaves[1], y, leaves[2], reduction=reduction, max_chunk_bytes=5 * 40 * h.element_size()
    )
    leaves64 = [t.double().requires_grad_() for t in (h, w, b)]
    ref = naive_linear_cross_entropy(leaves64[0], leaves64[1], y, leaves64[2], reduction=reduction)
    handed = []
    for i, scale in enumerate((2.0, 3.0, 0.5)):
        grads = torch.autograd.grad(loss * scale, leaves, retain_graph=i < 2)
        grads64 = torch.autograd.grad(ref * scale, leaves64, retain_graph=True)
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            assert_close(g, g64, FLCE_GRAD_TOL[dtype], f"d {name}, backward {i}")
            handed.append((g, g.clone()))
    for g, copy in handed:
        assert torch.equal(g, copy), "a gradient handed out was overwritten by a later backward"


def test_chunked_linear_loss_second_backward():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(11, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 11, (2, 5), device=DEVICE)
    loss = chunked_linear_loss(h, w, y, lambda z, t: F.cross_entropy(z, t, reduction="none"), num_chunks=3, bias=b)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(F.linear(h64, w64, b64).reshape(10, 11), y.reshape(10))
    handed = []
    for i, scale in enumerate((2.0, 3.0)):
        grads = torch.autograd.grad(loss * scale, (h, w, b), retain_graph=i < 1)
        grads64 = torch.autograd.grad(ref * scale, (h64, w64, b64), retain_graph=True)
        for g, g64 in zip(grads, grads64):
            assert_close(g, g64, 1e-5)
            handed.append((g, g.clone()))
    for g, copy in handed:
        assert torch.equal(g, copy)


# ------------------------------------------------------------------ -inf logits and the chunk boundary
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_minus_inf_chunks(dtype):
    """Rows wider than one kernel chunk (CE_BLOCK columns) whose running max is still -inf after a chunk:
    the online logsumexp must not turn -inf - -inf into NaN. Per-row losses and every gradient element
    vs torch in fp64."""
    n_cols = CE_BLOCK + 64
    inf = float("-inf")
    z = torch.randn(5, n_cols, device=DEVICE)
    y = torch.tensor([CE_BLOCK + 16, CE_BLOCK + 3, 7, 5, CE_BLOCK + 60], device=DEVICE)
    z[0, :CE_BLOCK] = inf  # the whole first chunk -inf (issue 34's example row)
    z[1, :] = inf  # -inf everywhere but the target, which is in the second chunk: loss 0, gradient 0
    z[1, CE_BLOCK + 3] = 0.5
    z[2, :] = inf  # the target in the first chunk, the second chunk all -inf
    z[2, :40] = torch.randn(40)
    z[3, CE_BLOCK:] = inf  # a normal first chunk, an all -inf second one
    z[4, 100 : CE_BLOCK + 50] = inf  # -inf across the boundary
    z = z.to(dtype)
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk, y, reduction="none")
    loss.backward(torch.ones_like(loss))
    z64 = z.double().requires_grad_()
    ref = F.cross_entropy(z64, y, reduction="none")
    ref.backward(torch.ones_like(ref))
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(zk.grad, z64.grad, GRAD_TOL[dtype], "d logits")
    # the training path (loss and gradient in one kernel) and the mean
    zk.grad = None
    z64.grad = None
    cross_entropy(zk, y).backward()
    F.cross_entropy(z64, y).backward()
    assert_close(zk.grad, z64.grad, GRAD_TOL[dtype], "d logits (mean)")


# ------------------------------------------------------------------ chunked_linear_loss target shapes
def _mse(z, t):
    return (z - t) ** 2


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("targets_shape", [(2, 5, 1), (10, 1), (2, 5, 11), (10, 11)], ids=str)
def test_chunked_linear_loss_targets_as_rows_or_leading_dims(targets_shape, num_chunks):
    """hidden [2, 5, H]: targets given with hidden's leading dimensions or flat per row mean the same thing
    and keep their trailing dimension (a [10, 1] target broadcasts over the logits' columns, as it would
    against F.linear(hidden.reshape(10, H), ...))."""
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 16, device=DEVICE, requires_grad=True)
    t = torch.randn(*targets_shape, device=DEVICE)
    loss = chunked_linear_loss(h, w, t, _mse, num_chunks=num_chunks)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _mse(F.linear(h64.reshape(10, 16), w64), t.double().reshape(10, -1)).mean()
    ref.backward()
    assert rel_err(loss, ref) < 1e-6
    assert_close(h.grad, h64.grad, 1e-5)
    assert_close(w.grad, w64.grad, 1e-5)


def test_chunked_linear_loss_flat_class_labels_for_3d_hidden():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 16, device=DEVICE)
    y = torch.randint(0, 11, (10,), device=DEVICE)
    y[3] = -100
    loss = chunked_linear_loss(h, w, y, lambda z, t: F.cross_entropy(z, t, reduction="none"), num_chunks=3)
    ref = F.cross_entropy(F.linear(h.detach().double().reshape(10, 16), w.double()), y)
    assert rel_err(loss, ref) < 1e-6


@pytest.mark.parametrize("targets_shape", [(9, 1), (2, 4, 1), (5, 2), (3,), ()], ids=str)
def test_chunked_linear_loss_refuses_other_target_shapes(targets_shape):
    h = torch.randn(2, 5, 16, device=DEVICE)
    w = torch.randn(11, 16, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=r"chunked_linear_loss: targets have shape .* expected targets of shape "
        r"\[2, 5, \.\.\.\] \(hidden's leading dimensions\) or \[10, \.\.\.\]",
    ):
        chunked_linear_loss(h, w, torch.randn(targets_shape, device=DEVICE), _mse, num_chunks=2)


# ------------------------------------------------------------------ fp16 gradients under a loss scale
def _best_fp16_err(g64):
    """The relative error of the exact gradient rounded once to fp16: the best an fp16 gradient can do."""
    return rel_err(g64.half(), g64)


@pytest.mark.parametrize("loss_scale,items", [(65536.0, 65536), (1024.0, 65536), (1024.0, None)])
def test_cross_entropy_fp16_loss_scale(loss_scale, items):
    """fp16 logits, a mean over many items (num_items_in_batch, as HF's gradient accumulation passes it) and a
    GradScaler-style loss scale: the gradient's small entries must not flush to zero before the scale
    reaches them (issue 34: 260,751 of 262,144 entries were 0, relative error 0.0228)."""
    x = torch.randn(64, 4096, device=DEVICE).half()
    y = torch.randint(0, 4096, (64,), device=DEVICE)
    xk = x.clone().requires_grad_()
    (cross_entropy(xk, y, num_items_in_batch=items) * loss_scale).backward()
    x64 = x.double().requires_grad_()
    (naive_cross_entropy(x64, y, num_items_in_batch=items) * loss_scale).backward()
    ideal = x64.grad.half()
    assert xk.grad.dtype == torch.float16
    assert int((xk.grad == 0).sum()) <= int((ideal == 0).sum()) + 1, "gradient entries flushed to zero"
    assert rel_err(xk.grad, x64.grad) <= 1.5 * _best_fp16_err(x64.grad) + 1e-6


@pytest.mark.parametrize("max_chunk_bytes", [None, 20 * 4096 * 2])
def test_fused_linear_cross_entropy_fp16_loss_scale(max_chunk_bytes):
    """The same through the fused head (fp16 recomputes each chunk's logits in the backward, where the scale
    is applied before the fp16 store); issue 34: d hidden 0.0562 and d weight 0.0183 off (torch 0.00027)."""
    h = torch.randn(64, 64, device=DEVICE).half()
    w = (0.1 * torch.randn(4096, 64, device=DEVICE)).half()
    y = torch.randint(0, 4096, (64,), device=DEVICE)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    kw = {} if max_chunk_bytes is None else {"max_chunk_bytes": max_chunk_bytes}
    (fused_linear_cross_entropy(hk, wk, y, num_items_in_batch=65536, **kw) * 65536.0).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    (naive_linear_cross_entropy(h64, w64, y, num_items_in_batch=65536) * 65536.0).backward()
    # one fp16 rounding of the logits' gradient, then fp16 matmuls (fp32 sums); d weight adds its chunks in fp16
    assert rel_err(hk.grad, h64.grad) < 1e-3
    assert rel_err(wk.grad, w64.grad) < 1e-3


# ------------------------------------------------------------------ torch.autocast
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_under_autocast(reduction):
    """fp32 hidden, head weight and bias that need gradients, called under torch.autocast: computed in
    autocast's dtype (as F.linear would be), gradients back in fp32 (issue 34: it crashed)."""
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    h = torch.randn(9, 32, device=DEVICE, requires_grad=True)
    w = (0.2 * torch.randn(70, 32, device=DEVICE)).requires_grad_()
    b = torch.randn(70, device=DEVICE, requires_grad=True)
    y = _labels(9, 70)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, b, reduction=reduction)
    loss.sum().backward()
    leaves = [t.detach().bfloat16().double().requires_grad_() for t in (h, w, b)]  # the values autocast computes with
    ref = naive_linear_cross_entropy(*leaves[:2], y, leaves[2], reduction=reduction)
    ref.sum().backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-2)
    for t, r in zip((h, w, b), leaves):
        assert t.grad.dtype == torch.float32
        assert_close(t.grad, r.grad, 3e-2)
