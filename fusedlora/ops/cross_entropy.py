"""Cross-entropy and fused linear + cross-entropy (kernels: csrc_triton/cross_entropy/kernel.py).

- Never an fp32 copy of the logits: the kernel reads them in their dtype and writes the gradient in it.
- reduction "mean" divides by the number of non-ignored labels (or `num_items_in_batch`, as HF's
  gradient accumulation does) computed on the device: no host sync; all-ignored batches give 0, not NaN.
  One small kernel (ce_prepare) counts them and checks the labels' range before the main kernel, which
  stores each row's loss already divided, so the op is 3 launches forward (prepare, assert, kernel) plus a sum.
- For "mean"/"sum" the forward writes the gradient (assuming d loss = 1) and the backward rescales it
  by the incoming gradient with a kernel that does nothing when that is 1: in place when that backward
  is the saved gradient's last use, else into a new tensor (retain_graph: a second backward, or a
  gradient already handed out, must not see it rescaled again).
- fp16 logits keep their gradient for the backward instead: made for d loss = 1, its small entries
  (softmax / number of items) fall below fp16's range before a loss scale could lift them, so the
  backward kernel computes it with the incoming scale applied in fp32 (the same memory traffic).
- The loss is returned in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import csrc_triton.cross_entropy as ce_kernels  # its grid constants are read per call (tests vary them)
from csrc_triton.cross_entropy import CE_PREPARE, CROSS_ENTROPY, SCALE_BY_SCALAR

from ..loader import launch
from . import _custom
from ._common import FLOAT_DTYPES, cdiv, check_tensor, grads_of, persistent_programs, rel_err, saved_tensors_writable

REDUCTIONS = ("mean", "sum", "none")
LABEL_DTYPES = (torch.int64, torch.int32)


def naive_cross_entropy(
    logits,
    labels,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=None,
    logit_scale=None,
    num_items_in_batch=None,
    weight=None,
):
    """Plain-torch reference (fp32 math, fp64 if the logits are fp64)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if logit_scale is not None:
        x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x.reshape(-1, x.shape[-1])
    labels = labels.reshape(-1)
    weight = None if weight is None else weight.to(x.dtype)
    per_row = F.cross_entropy(
        x, labels, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if weight is not None and num_items_in_batch is None:  # torch's weighted mean: over the targets' weights
        used = labels != ignore_index
        return total / weight[labels[used]].sum()
    n = num_items_in_batch if num_items_in_batch is not None else (labels != ignore_index).sum()
    return total / torch.clamp(torch.as_tensor(n, device=total.device), min=1)


def scale_by_scalar_(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x *= s (a 1-element fp32 tensor) in place, free when s == 1; x must be contiguous."""
    n = x.numel()
    progs = persistent_programs(cdiv(n, ce_kernels.SCALE_BLOCK), ce_kernels.SCALE_PROGRAMS_PER_SM, x.get_device())
    launch(SCALE_BY_SCALAR, (progs, 1, 1), (x, s, n))
    return x


def prepare_labels(op, labels, n_cols, ignore_index, reduction, num_items_in_batch=None):
    """One small kernel before the cross-entropy: an asynchronous assert (no host sync) that every label
    is in [0, n_cols) or ignore_index, and the 1-element fp32 scale of each row's loss and gradient:
    1/denominator for "mean" (the non-ignored labels, or `num_items_in_batch` as HF's gradient
    accumulation passes it), 1 otherwise."""
    divisor, given = 1.0, None
    if reduction != "mean":
        mode = "divisor"
    elif num_items_in_batch is None:
        mode = "count"
    elif isinstance(num_items_in_batch, torch.Tensor):  # HF passes a device tensor: divide on the device
        mode = "given"
        n = num_items_in_batch.to(device=labels.device, dtype=torch.float32)
        given = (1.0 / n.clamp(min=1)).reshape(1)
    else:
        mode, divisor = "divisor", float(num_items_in_batch)
    inv, ok = PREPARE_OP(labels, n_cols, int(ignore_index), mode, divisor)
    torch._assert_async(ok, f"{op}: labels must be in [0, {n_cols}) or ignore_index={ignore_index}")
    return inv if given is None else given


def prepare_scale(op, labels, n_cols, ignore_index, reduction, num_items_in_batch, class_weight):
    """The scale of each row's loss and gradient: prepare_labels' 1-element scale, or with per-class weights
    (as torch's F.cross_entropy `weight`) one per row: weight[label] (0 for ignored rows), and for "mean"
    divided by their sum (torch's weighted mean; all ignored: 0, not NaN) unless num_items_in_batch is given."""
    weighted_mean = class_weight is not None and reduction == "mean" and num_items_in_batch is None
    inv = prepare_labels(op, labels, n_cols, ignore_index, "sum" if weighted_mean else reduction, num_items_in_batch)
    if class_weight is None:
        return inv
    # the labels' range is asserted above; clamped here so that no bad label indexes out of bounds first
    rows = torch.where(labels != ignore_index, class_weight[labels.clamp(0, n_cols - 1)], 0.0) * inv
    if weighted_mean:
        total = rows.sum()
        rows = rows / torch.where(total == 0, 1.0, total)
    return rows


def check_class_weight(op, name, class_weight, n_cols, like, like_name, label_smoothing):
    """The per-class weights as a contiguous fp32 [n_cols] tensor (None stays None), or a clear error."""
    if class_weight is None:
        return None
    check_tensor(op, name, class_weight, dtypes=FLOAT_DTYPES + (torch.float64,), like=like, like_name=like_name)
    if class_weight.shape != (n_cols,):
        raise ValueError(
            f"{op}: {name} has shape {tuple(class_weight.shape)}; expected one weight per class, ({n_cols},)"
        )
    if label_smoothing != 0.0:  # torch weights the smoothing term per class: not one scale per row
        raise ValueError(f"{op}: {name} together with label_smoothing is not supported")
    return class_weight.to(torch.float32).contiguous()


def row_scale(scale: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, int]:
    """(scale, stride) of rows [start, end): a 1-element scale serves every row, a per-row one is sliced."""
    return (scale[start:end], 1) if scale.numel() > 1 else (scale, 0)


def _prepare(
    labels: torch.Tensor, n_cols: int, ignore_index: int, mode: str, divisor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv, ok) of ce_prepare_kernel; inv is not written in mode "given"."""
    inv = torch.empty(1, dtype=torch.float32, device=labels.device)
    ok = torch.empty(1, dtype=torch.int32, device=labels.device)
    launch(CE_PREPARE, (1, 1, 1), (labels, inv, ok, labels.numel(), n_cols, ignore_index, divisor), inv=mode)
    return inv, ok


PREPARE_OP = _custom.Launcher("ce_prepare", _prepare)


def reduce_rows(loss_rows, reduction):
    """Per-row fp32 losses, already scaled by the kernel (see prepare_labels) -> the requested reduction."""
    return loss_rows if reduction == "none" else loss_rows.sum()


def backward_scale(dloss, inv):
    """(scale tensor, stride) that the gradient kernel multiplies each row's gradient by: d loss (per row for
    "none") times the forward's scale (1 element, or per row with class weights)."""
    scale = (dloss.to(torch.float32) * inv).reshape(-1)
    return row_scale(scale, 0, scale.numel())


def precompute_grads(dtype: torch.dtype) -> bool:
    """Whether the forward makes the gradients (for d loss = 1) for the backward to rescale: not for fp16,
    whose small gradient entries would underflow before the loss scale reaches them (see the module doc)."""
    return dtype != torch.float16


def _scale_launch(x: torch.Tensor, s: torch.Tensor) -> None:
    scale_by_scalar_(x, s)


SCALE_BY_SCALAR_OP = _custom.Launcher("scale_by_scalar", _scale_launch, mutates_args=("x",))


def _scaled_copy(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return scale_by_scalar_(x.clone(), s)


# Out of place as one op: a clone followed by the mutating op, traced by torch.compile, was re-inplaced by
# inductor onto the saved gradient itself (the first backward's result then changed with a second backward).
SCALED_COPY_OP = _custom.Launcher("scaled_copy", _scaled_copy)


def scale_saved_grad(grad: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    """A gradient the forward made for d loss = 1, times the incoming d loss (fp32 math, rounded once):
    in place where this backward is the saved gradient's last use (saved_tensors_writable), else in a copy."""
    s = dloss.to(torch.float32).reshape(1)
    if not saved_tensors_writable():
        return SCALED_COPY_OP(grad, s)
    SCALE_BY_SCALAR_OP(grad, s)
    return grad


def ce_launch(
    logits2d,
    labels,
    loss,
    lse,
    grad,
    scale,
    scale_stride,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    mode,
    lse_square_scale=0.0,
):
    n_rows, n_cols = logits2d.shape
    grad_t = grad if grad is not None else logits2d
    progs = persistent_programs(n_rows, ce_kernels.CE_PROGRAMS_PER_SM, logits2d.get_device())
    launch(
        CROSS_ENTROPY,
        (progs, 1, 1),
        (
            logits2d,
            labels,
            loss,
            lse,
            grad_t,
            scale,
            logits2d.stride(0),
            grad_t.stride(0),
            scale_stride,
            n_rows,
            n_cols,
            int(ignore_index),
            float(label_smoothing),
            float(softcap or 1.0),
            float(1.0 if logit_scale is None else logit_scale),
            float(lse_square_scale),
        ),
        n_cols=n_cols,
        softcap=softcap is not None,
        mode=mode,
        smoothing=label_smoothing != 0.0,
    )


def launch_rows(logits2d, labels, loss, lse, grad, scale, scale_stride, opts, mode):
    """ce_launch with the ops' options (ignore_index, label_smoothing, softcap, logit_scale, lse_square_scale);
    the z-loss scale goes by keyword only when set, so ce_launch is seen called in its 12-argument form
    (build_tools/tune.py's, and tests that watch its mode) otherwise."""
    *ce_opts, lse_square_scale = opts
    z_loss = {"lse_square_scale": lse_square_scale} if lse_square_scale else {}
    ce_launch(logits2d, labels, loss, lse, grad, scale, scale_stride, *ce_opts, mode, **z_loss)


def z_loss_of(lse, labels, inv, ignore_index, lse_square_scale, reduction):
    """The z-loss part of the loss (lse_square_scale * lse^2 per used row, scaled and reduced as the loss),
    reported apart from the loss it is already in: no gradient flows through it."""
    rows = lse_square_scale * lse.square() * torch.where(labels != ignore_index, inv, 0.0)
    return rows if reduction == "none" else rows.sum()


def _forward_rows(logits2d, labels, inv, reduction, opts, grad_out):
    """(loss, lse); for "mean"/"sum" with `grad_out` given, its gradient for d loss = 1 written there."""
    n_rows = logits2d.shape[0]
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    mode = "loss" if grad_out is None else "loss_and_grad"
    launch_rows(logits2d, labels, loss_rows, lse, grad_out, *row_scale(inv, 0, n_rows), opts, mode)
    return reduce_rows(loss_rows, reduction), lse


def _grad(dloss, logits2d, labels, lse, inv, reduction, opts, out):
    """d logits for the incoming d loss, computed from the saved logits and lse (scaled in fp32 before the
    store in the logits' dtype), written into `out`."""
    scale, stride = backward_scale(dloss, inv)
    launch_rows(logits2d, labels, lse, lse, out, scale, stride, opts, "grad")
    return out


# One op for eager and torch.compile (fusedlora.ops._custom). The gradient is made in the forward where
# _precomputes; inplace_grad (eager only: the public op passes False under torch.compile) writes it over the
# logits buffer, else it is an output (None when not made).
def _precomputes(reduction, dtype, need_grad) -> bool:
    return need_grad and reduction != "none" and precompute_grads(dtype)


def _forward(
    logits2d: torch.Tensor,
    labels: torch.Tensor,
    inv: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
    lse_square_scale: float,
    need_grad: bool,
    inplace_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, grad or None)."""
    opts = (ignore_index, label_smoothing, softcap, logit_scale, lse_square_scale)
    grad = None
    if _precomputes(reduction, logits2d.dtype, need_grad):
        grad = logits2d if inplace_grad else torch.empty_like(logits2d)
    loss, lse = _forward_rows(logits2d, labels, inv, reduction, opts, grad)
    return loss, lse, None if inplace_grad else grad


def _setup(ctx, inputs, output):
    logits2d, labels, inv, reduction, *opts, need_grad, inplace_grad = inputs
    ctx.opts = (reduction, tuple(opts))
    ctx.inplace_grad = inplace_grad
    ctx.precomputed = _precomputes(reduction, logits2d.dtype, need_grad)
    ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
    if ctx.precomputed:
        ctx.save_for_backward(logits2d if inplace_grad else output[2])
    else:  # reduction "none", fp16 logits, or a loss computed without grad tracking first and differentiated later
        ctx.save_for_backward(logits2d, labels, output[1], inv)


def _backward(ctx, dloss, _dlse, _dgrad):
    if ctx.precomputed:
        (grad,) = ctx.saved_tensors
        return (scale_saved_grad(grad, dloss),) + (None,) * 10
    reduction, opts = ctx.opts
    # inplace_grad: the gradient goes over the logits, unless a later backward needs them again
    overwrite = ctx.inplace_grad and saved_tensors_writable()
    return (CE_BACKWARD_OP(dloss, *ctx.saved_tensors, reduction, *opts, overwrite),) + (None,) * 10


def _backward_launch(
    dloss: torch.Tensor,
    logits2d: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    inv: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
    lse_square_scale: float,
    overwrite: bool,
) -> torch.Tensor:
    opts = (ignore_index, label_smoothing, softcap, logit_scale, lse_square_scale)
    return _grad(
        dloss, logits2d, labels, lse, inv, reduction, opts, logits2d if overwrite else torch.empty_like(logits2d)
    )


CE_OP = _custom.AutogradOp("cross_entropy", _forward, _setup, _backward)
CE_BACKWARD_OP = _custom.Launcher("cross_entropy_backward", _backward_launch)


def check_ce_args(op, reduction, label_smoothing, softcap, logit_scale, lse_square_scale=0.0):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be positive, got {softcap}")
    if logit_scale is not None and not isinstance(logit_scale, (int, float)):
        raise TypeError(f"{op}: logit_scale must be a Python number, got {type(logit_scale).__name__}")
    if not isinstance(lse_square_scale, (int, float)) or not 0.0 <= lse_square_scale < float("inf"):
        raise ValueError(f"{op}: lse_square_scale must be a finite Python number >= 0, got {lse_square_scale!r}")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch=None,
    inplace_grad: bool = False,
    weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
):
    """Cross-entropy of `logits` [..., V] against integer `labels` [...].

    lse_square_scale: adds the z-loss lse_square_scale * logsumexp(logits)^2 of each used row to its loss
    (weighted, averaged and reduced as the loss). return_z_loss=True returns (loss, z_loss): that part apart,
    for logging (no gradient flows through it; the loss already holds it).
    weight: per-class weights [V] as torch's F.cross_entropy `weight` (each row's loss times weight[label];
    "mean" divides by the sum of the non-ignored labels' weights, or by num_items_in_batch when given);
    not with label_smoothing.
    softcap: Gemma-2 style `softcap * tanh(logits / softcap)`; logit_scale multiplies the logits first.
    inplace_grad=True writes the gradient over the logits buffer (saves one [T, V] tensor; the logits
    are then gone). Returns an fp32 loss (a scalar, or per-row for reduction="none"). A "mean" over labels that
    are all ignore_index is 0 with zero gradients, deliberately (torch returns NaN): one empty micro-batch does
    not turn a training run's loss into NaN."""
    op = "cross_entropy"
    check_tensor(op, "logits", logits)
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES, like=logits, like_name="logits")
    check_ce_args(op, reduction, label_smoothing, softcap, logit_scale, lse_square_scale)
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: labels have shape {tuple(labels.shape)} but logits {tuple(logits.shape)}; "
            f"expected labels of shape {tuple(logits.shape[:-1])}"
        )
    n_cols = logits.shape[-1]
    weight = check_class_weight(op, "weight", weight, n_cols, logits, "logits", label_smoothing)
    logits2d = logits.reshape(-1, n_cols)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).contiguous()
    inv = prepare_scale(op, labels1d, n_cols, ignore_index, reduction, num_items_in_batch, weight)
    out, lse, _ = CE_OP(
        logits2d,
        labels1d,
        inv,
        reduction,
        int(ignore_index),
        float(label_smoothing),
        None if softcap is None else float(softcap),
        None if logit_scale is None else float(logit_scale),
        float(lse_square_scale),
        torch.is_grad_enabled() and logits2d.requires_grad,
        bool(inplace_grad) and not _custom.compiling(),
    )
    return with_z_loss(out, labels.shape, reduction, return_z_loss, lse, labels1d, inv, ignore_index, lse_square_scale)


def with_z_loss(out, labels_shape, reduction, return_z_loss, lse, labels1d, inv, ignore_index, lse_square_scale):
    """The public ops' result: the loss (per row in the labels' shape for "none"), and (loss, z_loss) when
    asked for the z-loss."""
    out = out.view(labels_shape) if reduction == "none" else out
    if not return_z_loss:
        return out
    z_loss = z_loss_of(lse, labels1d, inv, ignore_index, lse_square_scale, reduction)
    return out, z_loss.view(labels_shape) if reduction == "none" else z_loss


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    t, v = (512, 128256) if device == "cuda" else (8, 4096)
    z = (3 * torch.randn(t, v, device=device)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (t,), device=device)
    y[::7] = -100
    loss = cross_entropy(z, y, label_smoothing=0.05)
    (dz,) = grads_of(loss * 2.0, None, (z,))  # d loss = 2: exercises scale_by_scalar
    z64 = z.detach().double().requires_grad_()
    ref = naive_cross_entropy(z64, y, label_smoothing=0.05)
    (dz64,) = grads_of(ref * 2.0, None, (z64,))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    err_grad = rel_err(dz, dz64)
    # the set-up kernel: the mean's 1/count over 3 blocks of labels (exact up to fp32 division)
    y = torch.randint(-1, 50, (5003,), device=device)
    inv = prepare_labels("selfcheck", y, 50, -1, "mean")
    err_prep = abs(inv.item() * float((y != -1).sum()) - 1.0)
    return {
        "cross_entropy": (max(rel_err(loss, ref), err_grad), tol),
        "scale_by_scalar": (err_grad, tol),
        "ce_prepare": (err_prep, 1e-6),
    }
