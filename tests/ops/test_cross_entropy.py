"""Cross-entropy (fusedlora.ops.cross_entropy) vs fp64 references, all options, odd shapes: the kernel's
persistent grid and label preparation, per-class weights and the z-loss, repeated backward, -inf logits across
chunks, fp16 under a loss scale, property tests, faults the norm-wise checks let through, bad input,
torch.compile.

Losses and gradients are compared in relative norm: fp32 inputs ~1e-6; bf16/fp16 logits are read in
their dtype (exact) and gradients rounded once to it (2^-8 / 2^-11 relative)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import csrc_triton.cross_entropy as kernels  # the kernels and their grid constants
from csrc_triton.cross_entropy import CE_BLOCK
from fusedlora.ops import (
    cross_entropy,
    fused_linear_cross_entropy,
    naive_cross_entropy,
)
from fusedlora.testing import (
    COMPILE_BACKEND,
    DEVICE,
    FUZZ_DTYPES,
    HAS_CUDA,
    LOSS_GRAD_TOL,
    assert_close,
    assert_compiled_second_backward,
    assert_device_assert,
    draw_labels,
    fuzz_settings,
    fuzz_tol,
    labels_every_third_ignored,
    laid_out,
    op_compile_tests,
    randn_leaf,
    rel_err,
    reset_dynamo,
    seeded_labels,
    z_loss_reference,
)

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
    The recompute path itself: test_cross_entropy_recompute_path_runs_and_matches below."""
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


# ------------------------------------------------------------------------ per-class weights, z-loss


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (7, 333), (5, 4100)], ids=str)
def test_cross_entropy_class_weight(shape, dtype, reduction):
    """Each row's loss times weight[label]; "mean" divides by the non-ignored labels' weights (torch's rule)."""
    z = (3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    y = labels_every_third_ignored(shape[0], shape[1])
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
    assert_close(zk.grad, z64.grad, LOSS_GRAD_TOL[dtype], "d logits")


def test_cross_entropy_class_weight_items_and_empty_batches():
    """num_items_in_batch, when given, is the divisor (as without weights); a mean whose labels are all
    ignored, or all of weight 0, is 0 with zero gradients (torch: NaN), as the unweighted mean."""
    z = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    y = labels_every_third_ignored(6, 40)
    w = torch.rand(40, device=DEVICE)
    loss = cross_entropy(z, y, weight=w, num_items_in_batch=17)
    ref = F.cross_entropy(z.detach().double(), y, weight=w.double(), reduction="sum") / 17
    assert_close(loss, ref, 1e-6)
    for labels, weights in ((torch.full((6,), -100, device=DEVICE), w), (y, torch.zeros(40, device=DEVICE))):
        z.grad = None
        loss = cross_entropy(z, labels, weight=weights)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


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


Z_CASES = [{}, {"label_smoothing": 0.1}, {"weight": True}, {"num_items_in_batch": 11}]


@pytest.mark.parametrize("kw", Z_CASES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (7, 333), (5, 4100)], ids=str)
def test_cross_entropy_z_loss(shape, dtype, reduction, kw):
    """The loss holds the z-loss (its gradient 2 * scale * lse * softmax included); return_z_loss gives that
    part apart, without a gradient."""
    z = (3 * torch.randn(*shape, device=DEVICE)).to(dtype)
    y = labels_every_third_ignored(shape[0], shape[1])
    y[0] = 2
    kw = dict(kw)
    weight = torch.rand(shape[1], device=DEVICE) + 0.1 if kw.pop("weight", False) else None
    zk = z.clone().requires_grad_()
    loss, z_loss = cross_entropy(
        zk, y, reduction=reduction, weight=weight, lse_square_scale=0.02, return_z_loss=True, **kw
    )
    z64 = z.double().requires_grad_()
    ref, ref_z = z_loss_reference(
        z64, y, reduction, 0.02, kw.get("label_smoothing", 0.0), weight, kw.get("num_items_in_batch")
    )
    assert not z_loss.requires_grad and z_loss.dtype == torch.float32
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(z_loss, ref_z, 1e-5, "z_loss")
    seed = torch.rand_like(ref) + 0.5
    loss.backward(seed.float())
    ref.backward(seed)
    assert_close(zk.grad, z64.grad, LOSS_GRAD_TOL[dtype], "d logits")


def test_z_loss_off_returns_zero_and_bad_scale_refused():
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    loss, z_loss = cross_entropy(z, y, return_z_loss=True)
    assert z_loss.item() == 0.0 and torch.equal(loss, cross_entropy(z, y))
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cross_entropy: lse_square_scale must be a finite Python number >= 0"):
            cross_entropy(z, y, lse_square_scale=bad)


# --------------------------------- corners: repeated backward, -inf logits, fp16 under a loss scale


def _labels_second_ignored(rows, n_cols):
    y = torch.randint(0, n_cols, (rows,), device=DEVICE)
    y[1] = -100
    return y


@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_second_backward(dtype, reduction, inplace_grad):
    """Three backwards through one loss (retain_graph), each with its own d loss: every gradient is right,
    and the first one handed out is never written again (the forward's gradient is not rescaled in place).
    bf16/fp32 rescale the gradient the forward made; fp16 recomputes it (and inplace_grad must then keep
    the logits it still needs)."""
    z = (3 * torch.randn(5, 77, device=DEVICE)).to(dtype)
    y = _labels_second_ignored(5, 77)
    zk = z.clone().requires_grad_()
    loss = cross_entropy(zk * 1.0 if inplace_grad else zk, y, reduction=reduction, inplace_grad=inplace_grad)
    z64 = z.double().requires_grad_()
    ref = naive_cross_entropy(z64, y, reduction=reduction)
    grads = []
    for i, scale in enumerate((2.0, 3.0, 0.5)):
        (g,) = torch.autograd.grad(loss * scale, zk, retain_graph=i < 2)
        (g64,) = torch.autograd.grad(ref * scale, z64, retain_graph=True)
        assert_close(g, g64, LOSS_GRAD_TOL[dtype], f"backward {i}")
        grads.append((g, g.clone()))
    for i, (g, copy) in enumerate(grads):
        assert torch.equal(g, copy), f"the gradient of backward {i} was overwritten by a later backward"


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
    assert_close(zk.grad, z64.grad, LOSS_GRAD_TOL[dtype], "d logits")
    # the training path (loss and gradient in one kernel) and the mean
    zk.grad = None
    z64.grad = None
    cross_entropy(zk, y).backward()
    F.cross_entropy(z64, y).backward()
    assert_close(zk.grad, z64.grad, LOSS_GRAD_TOL[dtype], "d logits (mean)")


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


# ----------------------------------------------------------------------------------- property tests


FUZZ = fuzz_settings()


@FUZZ
@given(st.data())
def test_fuzz_cross_entropy(data):
    rows = data.draw(st.integers(1, 12))
    vocab = data.draw(st.sampled_from([1, 2, 7, 129, 1001, 4099]))
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
    ignore_index = data.draw(st.sampled_from([-100, 0]))
    kw = dict(
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
        softcap=data.draw(st.sampled_from([None, 3.0])),
        logit_scale=data.draw(st.sampled_from([None, 0.5])),
        ignore_index=ignore_index,
    )
    if kw["reduction"] == "mean":
        kw["num_items_in_batch"] = data.draw(st.sampled_from([None, 5]))
    if kw["label_smoothing"] == 0.0 and data.draw(st.booleans()):  # per-class weights (not with smoothing)
        kw["weight"] = torch.rand(vocab, device=DEVICE) + 0.05
    y, pattern = draw_labels(data, rows, vocab, ignore_index)
    z = laid_out(
        (4 * torch.randn(rows, vocab, device=DEVICE)).to(dtype), data.draw(st.sampled_from(["contiguous", "slice"]))
    )
    zk = z.detach().requires_grad_()
    loss = cross_entropy(zk, y, **kw)
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, **kw)
    if kw["reduction"] == "mean" and kw.get("num_items_in_batch") is None and pattern == "all":
        # documented: a mean over no labels is 0 with zero gradients (torch's is NaN)
        loss.backward()
        assert loss.item() == 0.0 and not zk.grad.any()
        return
    g = torch.rand(ref.shape, device=DEVICE, dtype=torch.float64) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    # a loss that cancels to ~0 (one class, label smoothing) keeps the rounding of its logit-sized terms
    assert_close(loss, ref, 1e-5, "loss", floor=z.abs().max().item())
    assert zk.grad.dtype == dtype
    assert_close(zk.grad, z64.grad, fuzz_tol(dtype), "dlogits")


# ---------------------------------------------------------- faults the norm-wise checks let through


ce_module = importlib.import_module("fusedlora.ops.cross_entropy")  # the package exports a function of that name


@pytest.mark.parametrize("vocab", [1001, 1003, 4099])
def test_cross_entropy_every_column_counts(vocab):
    """Per-row losses and every gradient element vs fp64: a kernel that drops one column of wide rows (the last
    logit, say) moves one element of the gradient by ~1/V, which a norm over the whole tensor hides."""
    z = (3 * torch.randn(6, vocab, device=DEVICE)).requires_grad_()
    y = torch.randint(0, vocab, (6,), device=DEVICE)
    y[2] = vocab - 1  # a label in the last column
    z.data[4, -1] = 12.0  # the last logit dominates one row
    loss = cross_entropy(z, y, reduction="none")
    loss.backward(torch.ones_like(loss))
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, reduction="none")
    ref.backward(torch.ones_like(ref))
    assert_close(loss, ref, 1e-6)
    assert_close(z.grad, z64.grad, 1e-5)


@pytest.mark.parametrize("reduction", ["none"])
def test_cross_entropy_recompute_path_runs_and_matches(monkeypatch, reduction):
    """reduction='none' keeps the logits and computes the gradient in the backward (the 'grad' launch)."""
    modes = []
    real = ce_module.ce_launch

    def spy(*args):
        modes.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ce_module, "ce_launch", spy)
    z = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 33, (5,), device=DEVICE)
    y[1] = -100
    w = torch.rand(5, device=DEVICE)
    (g,) = torch.autograd.grad((cross_entropy(z, y, reduction=reduction) * w).sum(), z)
    assert modes == ["loss", "grad"]
    z64 = z.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad((naive_cross_entropy(z64, y, reduction=reduction) * w.double()).sum(), z64)
    assert_close(g, g64, 1e-5)


def test_cross_entropy_fp16():
    z = (4 * torch.randn(5, 300, device=DEVICE)).to(torch.float16).requires_grad_()
    y = torch.randint(0, 300, (5,), device=DEVICE)
    cross_entropy(z, y).backward()
    z64 = z.detach().double().requires_grad_()
    naive_cross_entropy(z64, y).backward()
    assert z.grad.dtype == torch.float16
    assert_close(z.grad, z64.grad, 3e-3)


# ------------------------------------------------------------------------------------ torch.compile
fresh_dynamo = pytest.fixture(reset_dynamo)  # (the compile cases': Dynamo's caches empty around each)

COMPILE_CASES = {
    "cross_entropy": lambda: (
        lambda z, y: cross_entropy(z, y, label_smoothing=0.1),
        (randn_leaf(6, 50), seeded_labels(6, 50)),
    ),
    "cross_entropy_none": lambda: (
        lambda z, y: cross_entropy(z, y, reduction="none"),
        (randn_leaf(6, 50), seeded_labels(6, 50)),
    ),
    # fp16: the gradient recomputed in the backward with d loss applied before the fp16 store (issue 34)
    "cross_entropy_fp16": lambda: (
        lambda z, y: 8.0 * cross_entropy(z, y),
        (randn_leaf(6, 50, dtype=torch.float16), seeded_labels(6, 50)),
    ),
    "cross_entropy_weight": lambda: (
        lambda z, y, w: cross_entropy(z, y, weight=w),
        (randn_leaf(6, 50), seeded_labels(6, 50), torch.rand(50, device=DEVICE)),
    ),
    # loss + z_loss: the reported z-loss (no gradient of its own) compared too
    "cross_entropy_z_loss": lambda: (
        lambda z, y: sum(cross_entropy(z, y, lse_square_scale=0.01, return_z_loss=True)),
        (randn_leaf(6, 50), seeded_labels(6, 50)),
    ),
}


test_public_op_compiles_whole_and_matches_eager, test_ops_compile_where_is_compiling_holds_only_in_dynamo = (
    op_compile_tests(COMPILE_CASES, "cross_entropy")
)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("case", ["cross_entropy", "cross_entropy_fp16"])
def test_compiled_loss_second_backward(case):
    """retain_graph through a compiled loss: each backward right, none overwriting a gradient handed out."""
    assert_compiled_second_backward(*COMPILE_CASES[case]())


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_cross_entropy_fp16_loss_scale():
    """The compiled path's fp16 gradient under a loss scale: as close to fp64 as fp16 allows (no flushed entries)."""
    x = torch.randn(64, 4096, device=DEVICE).half().requires_grad_()
    y = torch.randint(0, 4096, (64,), device=DEVICE)
    fn = torch.compile(
        lambda z, t: cross_entropy(z, t, num_items_in_batch=65536) * 65536.0, backend=COMPILE_BACKEND, fullgraph=True
    )
    (g,) = torch.autograd.grad(fn(x, y), x)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, y, reduction="sum"), x64)
    assert rel_err(g, g64) <= 1.5 * rel_err(g64.half(), g64)
