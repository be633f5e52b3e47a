"""Cross-entropy and fused linear cross-entropy vs fp64 references, all options, odd shapes.

Losses and gradients are compared in relative norm: fp32 inputs ~1e-6; bf16/fp16 logits are read in
their dtype (exact) and gradients rounded once to it (2^-8 / 2^-11 relative)."""

import pytest
import torch
import torch.nn.functional as F

import csrc_triton.cross_entropy as kernels  # the kernels and their grid constants
from fusedlora.ops import (
    chunked_linear_loss,
    cross_entropy,
    fused_linear_cross_entropy,
    naive_cross_entropy,
    naive_linear_cross_entropy,
)
from fusedlora.testing import DEVICE, HAS_CUDA, assert_device_assert, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
# (37, 16461): several chunks of the row, walked forwards by the first pass and backwards by the second
SHAPES = [(1, 7), (7, 333), (5, 1), (37, 16461)] + (
    [(64, 32003), (8, 131072), (3, 262144)] if HAS_CUDA else [(3, 4100)]
)
OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"softcap": 30.0},
    {"logit_scale": 0.25, "softcap": 5.0},
    {"num_items_in_batch": 13},
    {"ignore_index": 0},
]


def _labels(n_rows, n_cols, ignore_index=-100):
    y = torch.randint(0, n_cols, (n_rows,), device=DEVICE)
    if n_rows > 2:
        y[1] = ignore_index
    return y


@pytest.mark.parametrize("kw", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(shape, dtype, kw):
    z = (4 * torch.randn(*shape, device=DEVICE)).to(dtype)
    y = _labels(shape[0], shape[1], kw.get("ignore_index", -100))
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk, y, **kw)
    z64 = z.double().requires_grad_()
    ref = naive_cross_entropy(z64, y, **kw)
    g = torch.rand_like(ref) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref) < 2e-5  # fp32 sums over up to 262144 terms
    assert zk.grad.dtype == dtype
    assert rel_err(zk.grad, z64.grad) < TOL[dtype]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_persistent_grid_walks_several_rows_per_program(monkeypatch, label_smoothing):
    """kernels.CE_PROGRAMS_PER_SM > 0: each program takes rows p, p + P, ... (the tune sweep's option)."""
    monkeypatch.setattr(kernels, "CE_PROGRAMS_PER_SM", 1)
    z = torch.randn(37, 16461, device=DEVICE)
    y = _labels(37, 16461)
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk, y, label_smoothing=label_smoothing)
    loss.backward()
    z64 = z.double().requires_grad_()
    ref = naive_cross_entropy(z64, y, label_smoothing=label_smoothing)
    ref.backward()
    assert rel_err(loss, ref) < 2e-5 and rel_err(zk.grad, z64.grad) < 2e-5


@pytest.mark.parametrize("s", [1.0, 0.37])
def test_scale_by_scalar_persistent_blocks(s):
    """The backward's in-place rescale: each program walks several blocks (and a ragged last one);
    s == 1 leaves the tensor bit-identical."""
    from fusedlora.ops._common import sm_count
    from fusedlora.ops.cross_entropy import scale_by_scalar_

    progs = kernels.SCALE_PROGRAMS_PER_SM * sm_count(torch.cuda.current_device() if HAS_CUDA else -1)
    n = (2 * progs + 3) * kernels.SCALE_BLOCK + 123
    x = torch.randn(n, device=DEVICE)
    out = scale_by_scalar_(x.clone(), torch.tensor([s], device=DEVICE))
    assert torch.equal(out, x * s)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n", [1, 2048, 5003])
def test_prepare_labels_scale(n, label_dtype):
    """The set-up kernel's loss scale for every reduction / num_items_in_batch form, over several blocks
    of labels (5003 = 2 full blocks + a ragged one), with ignored labels and a non-default ignore_index."""
    from fusedlora.ops.cross_entropy import prepare_labels

    y = torch.randint(0, 7, (n,), device=DEVICE, dtype=label_dtype)
    y[::3] = -1
    used = int((y != -1).sum())
    cases = [
        ("mean", None, 1.0 / max(used, 1)),
        ("sum", None, 1.0),
        ("none", None, 1.0),
        ("mean", 40, 1.0 / 40),
        ("mean", 0, 1.0),
        ("mean", torch.tensor(25, device=DEVICE), 1.0 / 25),
        ("sum", 40, 1.0),
    ]
    for reduction, items, want in cases:
        inv = prepare_labels("op", y, 7, -1, reduction, items)
        assert inv.shape == (1,) and inv.dtype == torch.float32
        assert inv.item() == pytest.approx(want, rel=1e-6), (reduction, items)
    y[:] = -1  # all ignored: the mean divides by 1, not 0
    assert prepare_labels("op", y, 7, -1, "mean").item() == 1.0


PREPARE_BAD = """
import torch
from fusedlora.ops.cross_entropy import prepare_labels
y = torch.randint(0, 7, (5003,), device="cuda")
y[4999] = {bad}
prepare_labels("op", y, 7, -100, "sum")
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("bad", [7, -2])
def test_prepare_labels_range_check_reaches_every_block(bad):
    """A bad label in the ragged last block of labels still fails (and naming the op and the range)."""
    from fusedlora.ops.cross_entropy import prepare_labels

    if HAS_CUDA:  # a device-side assert ends the CUDA context: check it in its own process
        assert_device_assert(PREPARE_BAD.format(bad=bad), "op: labels must be in [0, 7)")
        return
    y = torch.randint(0, 7, (5003,), device=DEVICE)
    y[4999] = bad
    with pytest.raises(RuntimeError, match="op: labels must be in \\[0, 7\\) or ignore_index=-100"):
        prepare_labels("op", y, 7, -100, "sum")
    y[4999] = -100
    prepare_labels("op", y, 7, -100, "sum")


def test_all_ignored_gives_zero_not_nan():
    z = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    y = torch.full((4,), -100, device=DEVICE)
    loss = cross_entropy(z, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_leading_dims_and_int32_labels():
    z = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 40, (2, 3), device=DEVICE, dtype=torch.int32)
    loss = cross_entropy(z, y, reduction="none")
    assert loss.shape == (2, 3)
    ref = naive_cross_entropy(z.detach().double(), y.long(), reduction="none").view(2, 3)
    assert rel_err(loss, ref) < 1e-5


def test_inplace_grad_reuses_the_logits_buffer():
    z = torch.randn(6, 77, device=DEVICE)
    y = _labels(6, 77)
    zk = z.clone().requires_grad_()
    leaf = zk * 1.0  # a non-leaf whose buffer may be overwritten
    cross_entropy(leaf, y, inplace_grad=True).backward()
    z64 = z.double().requires_grad_()
    naive_cross_entropy(z64, y).backward()
    assert rel_err(zk.grad, z64.grad) < 1e-5


def test_scaled_mean_loss_gradient():
    """The gradient of a mean loss scaled before backward (d loss != 1: the precomputed gradient is rescaled).
    The recompute path itself: tests/test_faults.py::test_cross_entropy_recompute_path_runs_and_matches."""
    z = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    y = _labels(5, 33)
    loss = cross_entropy(z, y, reduction="mean")
    (g,) = torch.autograd.grad(loss * 3.0, z)
    z64 = z.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(naive_cross_entropy(z64, y) * 3.0, z64)
    assert rel_err(g, g64) < 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_many_rows_loss_and_gradient():
    """The training path (loss and gradient in one kernel) on many long rows, vs the fp32 reference."""
    for rows, vocab in ((12000, 40000), (2048, 128256)):
        z = torch.randn(rows, vocab, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, vocab, (rows,), device=DEVICE)
        loss = cross_entropy(z, y, reduction="sum")
        loss.backward()
        zr = z.detach().float().requires_grad_()
        ref = F.cross_entropy(zr, y, reduction="sum")
        ref.backward()
        assert rel_err(loss, ref) < 1e-5
        assert rel_err(z.grad, zr.grad) < 1e-2  # bf16 gradient, rounded once
        del z, zr


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda z, y: cross_entropy(z, y[:-1]), "labels have shape"),
        (lambda z, y: cross_entropy(z, y.float()), "labels has dtype float32"),
        (lambda z, y: cross_entropy(z, y, reduction="avg"), "reduction must be one of"),
        (lambda z, y: cross_entropy(z, y, label_smoothing=1.5), "label_smoothing must be in"),
        (lambda z, y: cross_entropy(z, y, softcap=0.0), "softcap must be positive"),
        (lambda z, y: cross_entropy(z.long(), y), "logits has dtype int64"),
    ],
)
def test_bad_input(bad, match):
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(z, y)


OOR_LABEL = """
import torch
from fusedlora.ops import cross_entropy
z = torch.randn(3, 10, device="cuda")
cross_entropy(z, torch.tensor([1, 10, 2], device="cuda"))
torch.cuda.synchronize()
"""


def test_out_of_range_label_raises():
    if HAS_CUDA:  # a device-side assert ends the CUDA context: check it in its own process
        assert_device_assert(OOR_LABEL, "labels must be in [0, 10)")
        return
    with pytest.raises(RuntimeError, match="labels must be in \\[0, 10\\)"):
        cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 2]))


# ------------------------------------------------------------------ fused linear + cross-entropy
FLCE_CASES = [(1, 8, 11), (37, 16, 101), (70, 24, 257)] + ([(4096, 512, 32003), (1000, 1024, 8192)] if HAS_CUDA else [])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reduction": "sum", "label_smoothing": 0.2},
        {"reduction": "none"},
        {"softcap": 4.0, "num_items_in_batch": 9},
    ],
    ids=str,
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_weight", [False, True])
@pytest.mark.parametrize("dims", FLCE_CASES)
def test_fused_linear_cross_entropy(dims, frozen_weight, bias, kw):
    t, h, v = dims
    dtype = torch.float32
    hid = torch.randn(t, h, device=DEVICE, dtype=dtype)
    w = 0.3 * torch.randn(v, h, device=DEVICE, dtype=dtype)
    b = torch.randn(v, device=DEVICE, dtype=dtype) if bias else None
    y = _labels(t, v)
    hk = hid.clone().requires_grad_()
    wk = w.clone().requires_grad_(not frozen_weight)
    bk = b.clone().requires_grad_() if bias else None
    # a small chunk size forces several chunks even on tiny problems
    loss = fused_linear_cross_entropy(hk, wk, y, bk, max_chunk_bytes=16 * v * 4, **kw)
    h64 = hid.double().requires_grad_()
    w64 = w.double().requires_grad_(not frozen_weight)
    b64 = b.double().requires_grad_() if bias else None
    ref = naive_linear_cross_entropy(h64, w64, y, b64, **kw)
    g = torch.rand_like(ref) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(hk.grad, h64.grad) < 1e-4
    if not frozen_weight:
        assert rel_err(wk.grad, w64.grad) < 1e-4
    else:
        assert wk.grad is None
    if bias:
        assert rel_err(bk.grad, b64.grad) < 1e-4


@pytest.mark.gpu
def test_fused_linear_cross_entropy_bf16_large_vocab():
    t, h, v = 2048, 1024, 128256
    hid = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.05 * torch.randn(v, h, device="cuda")).to(torch.bfloat16)
    y = _labels(t, v)
    loss = fused_linear_cross_entropy(hid, w, y)
    loss.backward()
    h32 = hid.detach().float().requires_grad_()
    ref = naive_linear_cross_entropy(h32, w.float(), y)
    ref.backward()
    assert rel_err(loss, ref) < 2e-3
    assert rel_err(hid.grad, h32.grad) < 2e-2


def test_fused_linear_cross_entropy_bad_input():
    hid = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 9, device=DEVICE)
    with pytest.raises(ValueError, match="weight has shape"):
        fused_linear_cross_entropy(hid, w, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="labels have shape"):
        fused_linear_cross_entropy(hid, w[:, :8], torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but hidden is torch.float32"):
        fused_linear_cross_entropy(hid, w[:, :8].bfloat16(), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="weight has dtype float64"):
        fused_linear_cross_entropy(hid, w[:, :8].double(), torch.zeros(4, dtype=torch.long, device=DEVICE))


# ------------------------------------------------------------------ chunked linear loss (any torch loss)
@pytest.mark.parametrize("num_chunks", [1, 3, 8, None])
def test_chunked_linear_loss_cross_entropy(num_chunks):
    hid = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(101, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(101, device=DEVICE, requires_grad=True)
    y = _labels(37, 101)
    y[:10] = -100  # uneven ignored counts per chunk: the mean must be over all chunks together
    loss = chunked_linear_loss(
        hid, w, y, lambda z, t: F.cross_entropy(z.float(), t, reduction="none"), num_chunks=num_chunks, bias=b
    )
    loss.backward()
    h2, w2, b2 = (x.detach().double().requires_grad_() for x in (hid, w, b))
    ref = F.cross_entropy(F.linear(h2, w2, b2), y)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    for a, r in ((hid, h2), (w, w2), (b, b2)):
        assert rel_err(a.grad, r.grad) < 1e-5


def test_chunked_linear_loss_mse_and_sum():
    hid = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    tgt = torch.randn(3, 5, 7, device=DEVICE)
    for reduction in ("mean", "sum"):
        hid.grad = w.grad = None
        loss = chunked_linear_loss(hid, w, tgt, lambda z, t: (z - t) ** 2, num_chunks=4, reduction=reduction)
        (loss * 2).backward()
        h2, w2 = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = F.mse_loss(h2 @ w2.T, tgt.double(), reduction=reduction)
        (ref * 2).backward()
        assert rel_err(loss, ref) < 1e-5
        assert rel_err(hid.grad, h2.grad) < 1e-5 and rel_err(w.grad, w2.grad) < 1e-5


def test_chunked_linear_loss_bad_input():
    hid = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="reduction must be"):
        chunked_linear_loss(
            hid, torch.randn(3, 8, device=DEVICE), torch.zeros(4, device=DEVICE), F.mse_loss, reduction="none"
        )
    with pytest.raises(ValueError, match="weight has shape"):
        chunked_linear_loss(hid, torch.randn(3, 9, device=DEVICE), torch.zeros(4, device=DEVICE), F.mse_loss)
