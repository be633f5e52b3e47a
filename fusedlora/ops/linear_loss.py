"""Losses of a linear head without materialising the [T, V] logits.

- `fused_linear_cross_entropy`: chunks of rows; each chunk's logits come from one matmul, the
  cross-entropy kernel turns them into their gradient in place, and two more matmuls give d hidden
  (and d weight / d bias when they need gradients). The gradients are made in the forward (for
  "mean"/"sum"); the backward only rescales them (free when d loss = 1; into new tensors under
  retain_graph). fp16 instead recomputes each chunk's logits in the backward, where the kernel applies the
  incoming scale before the fp16 store (made for d loss = 1 the small entries underflow: see
  cross_entropy.py): one more matmul per chunk. Exact: no gradient filtering.
- `chunked_linear_loss`: the same chunking for ANY loss written in torch: each chunk's gradient is left
  to autograd; the total is reduced over all items (not per chunk).

Memory above the inputs: one logits chunk (<= `max_chunk_bytes`, 128 MiB by default) plus the
gradients themselves. d weight accumulates in the weight's dtype, rounded once per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _custom
from ._common import autocast_dtype, check_tensor
from .cross_entropy import (
    LABEL_DTYPES,
    backward_scale,
    check_ce_args,
    check_class_weight,
    launch_rows,
    naive_cross_entropy,
    precompute_grads,
    prepare_scale,
    reduce_rows,
    row_scale,
    scale_saved_grad,
    with_z_loss,
)

DEFAULT_CHUNK_BYTES = 128 * 2**20


def rows_per_chunk(n_rows: int | None, n_cols: int, elem_bytes: int, max_chunk_bytes: int) -> int:
    """Rows of one logits chunk (at most n_rows; n_rows None: not clamped)."""
    rows = max(1, max_chunk_bytes // max(1, n_cols * elem_bytes))
    if rows >= 64:
        rows -= rows % 64  # matmul-friendly
    if n_rows is None:
        return rows
    return min(n_rows, rows) if n_rows else 1


def naive_linear_cross_entropy(hidden, weight, labels, bias=None, ce_weight=None, **ce_kwargs):
    return naive_cross_entropy(F.linear(hidden, weight, bias), labels, weight=ce_weight, **ce_kwargs)


def _accumulate_chunk_grads(grad_logits, h, weight, dh_rows, dw, db):
    """Given one chunk's d logits: write its d hidden rows and add its share of d weight / d bias."""
    if dh_rows is not None:
        torch.mm(grad_logits, weight, out=dh_rows)
    if dw is not None:
        dw.addmm_(grad_logits.t(), h)
    if db is not None:
        db += grad_logits.sum(0, dtype=torch.float32)


def _precomputes(reduction, dtype, need_dh, need_dw, need_db) -> bool:
    """Whether the forward makes the gradients (for d loss = 1) and the backward only rescales them."""
    return (need_dh or need_dw or need_db) and reduction != "none" and precompute_grads(dtype)


def _flce_forward(hidden, weight, bias, labels, inv, reduction, opts, chunk_rows, need_dh, need_dw, need_db):
    """(loss, dh, dw, db, lse): the loss, and where _precomputes the gradients for d loss = 1 (else None),
    one logits chunk at a time."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=dev)
    lse = torch.empty(n_rows, dtype=torch.float32, device=dev)
    precompute = _precomputes(reduction, hidden.dtype, need_dh, need_dw, need_db)
    dh = torch.empty_like(hidden) if precompute and need_dh else None
    dw = torch.zeros_like(weight) if precompute and need_dw else None
    db = torch.zeros(n_cols, dtype=torch.float32, device=dev) if precompute and need_db else None
    for s in range(0, n_rows, chunk_rows):
        e = min(n_rows, s + chunk_rows)
        h = hidden[s:e]
        logits = F.linear(h, weight, bias)
        if precompute:  # the chunk's logits become their gradient in place
            launch_rows(
                logits, labels[s:e], loss_rows[s:e], lse[s:e], logits, *row_scale(inv, s, e), opts, "loss_and_grad"
            )
            _accumulate_chunk_grads(logits, h, weight, None if dh is None else dh[s:e], dw, db)
        else:
            launch_rows(logits, labels[s:e], loss_rows[s:e], lse[s:e], None, *row_scale(inv, s, e), opts, "loss")
        del logits  # free this chunk before the next one is allocated: one chunk alive at a time
    return reduce_rows(loss_rows, reduction), dh, dw, db, lse


def _flce_recompute(
    dloss, hidden, weight, bias, labels, lse, inv, reduction, opts, chunk_rows, need_dh, need_dw, need_db
):
    """(dh, dw, db) recomputing each chunk's logits (reduction "none", or a forward run without gradients)."""
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_db else None
    scale, _ = backward_scale(dloss, inv)
    for s in range(0, hidden.shape[0], chunk_rows):
        e = min(hidden.shape[0], s + chunk_rows)
        h = hidden[s:e]
        logits = F.linear(h, weight, bias)
        launch_rows(logits, labels[s:e], lse[s:e], lse[s:e], logits, *row_scale(scale, s, e), opts, "grad")
        _accumulate_chunk_grads(logits, h, weight, None if dh is None else dh[s:e], dw, db)
        del logits
    return dh, dw, None if db is None else db.to(bias.dtype)


# One op for eager and torch.compile (fusedlora.ops._custom): the chunk loops run inside it; its fake only
# allocates (a symbolic row count cannot drive the loop).
def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
    lse_square_scale: float,
    chunk_rows: int,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw, db, lse), absent gradients None."""
    opts = (ignore_index, label_smoothing, softcap, logit_scale, lse_square_scale)
    return _flce_forward(hidden, weight, bias, labels, inv, reduction, opts, chunk_rows, need_dh, need_dw, need_db)


def _forward_fake(
    hidden,
    weight,
    bias,
    labels,
    inv,
    reduction,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    lse_square_scale,
    chunk_rows,
    need_dh,
    need_dw,
    need_db,
):
    precompute = _precomputes(reduction, hidden.dtype, need_dh, need_dw, need_db)
    n_rows = hidden.shape[0]
    loss = hidden.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    grads = (
        torch.empty_like(hidden) if precompute and need_dh else None,
        torch.empty_like(weight) if precompute and need_dw else None,
        hidden.new_empty(weight.shape[0], dtype=torch.float32) if precompute and need_db else None,
    )
    return loss, *grads, hidden.new_empty(n_rows, dtype=torch.float32)


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv, reduction, *opts, chunk_rows, need_dh, need_dw, need_db = inputs
    ctx.args = (reduction, tuple(opts), chunk_rows, need_dh, need_dw, need_db)
    ctx.precompute = _precomputes(reduction, hidden.dtype, need_dh, need_dw, need_db)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
    if ctx.precompute:
        ctx.save_for_backward(*output[1:4])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[4], inv)


def _backward(ctx, dloss, *_):
    if ctx.precompute:
        dh, dw, db = ctx.saved_tensors
        dh, dw = (None if g is None else scale_saved_grad(g, dloss) for g in (dh, dw))
        db = None if db is None else (db * dloss.to(torch.float32)).to(ctx.bias_dtype)
        return (dh, dw, db) + (None,) * 12
    reduction, opts, *chunking = ctx.args
    return FLCE_BACKWARD_OP(dloss, *ctx.saved_tensors, reduction, *opts, *chunking) + (None,) * 12


def _backward_launch(
    dloss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    inv: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
    lse_square_scale: float,
    chunk_rows: int,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = (ignore_index, label_smoothing, softcap, logit_scale, lse_square_scale)
    return _flce_recompute(
        dloss, hidden, weight, bias, labels, lse, inv, reduction, opts, chunk_rows, need_dh, need_dw, need_db
    )


def _backward_fake(
    dloss,
    hidden,
    weight,
    bias,
    labels,
    lse,
    inv,
    reduction,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    lse_square_scale,
    chunk_rows,
    need_dh,
    need_dw,
    need_db,
):
    return (
        torch.empty_like(hidden) if need_dh else None,
        torch.empty_like(weight) if need_dw else None,
        torch.empty_like(bias) if need_db else None,
    )


FLCE_OP = _custom.AutogradOp("fused_linear_cross_entropy", _forward, _setup, _backward, fake=_forward_fake)
FLCE_BACKWARD_OP = _custom.Launcher("fused_linear_cross_entropy_backward", _backward_launch, fake=_backward_fake)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch=None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ce_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
):
    """cross_entropy(hidden @ weight.T + bias, labels) without the [T, V] logits; fp32 loss.
    ce_weight: per-class weights [V], cross_entropy's `weight` (the name `weight` is the head's here);
    lse_square_scale / return_z_loss: the z-loss, as cross_entropy's."""
    op = "fused_linear_cross_entropy"
    check_tensor(op, "hidden", hidden)
    check_tensor(op, "weight", weight, like=hidden, like_name="hidden")
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES, like=hidden, like_name="hidden")
    if bias is not None:
        check_tensor(op, "bias", bias, like=hidden, like_name="hidden")
    check_ce_args(op, reduction, label_smoothing, softcap, logit_scale, lse_square_scale)
    cast = autocast_dtype(hidden)
    if cast is not None:  # compute in autocast's dtype, as F.linear would; the casts pass gradients back
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} but hidden's last dimension is "
            f"{hidden.shape[-1]}; expected weight [V, {hidden.shape[-1]}]"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight is {weight.dtype} but hidden is {hidden.dtype}; they must match")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)}; "
            f"expected labels of shape {tuple(hidden.shape[:-1])}"
        )
    h2d = hidden.reshape(-1, hidden.shape[-1])
    if not h2d.is_contiguous():
        h2d = h2d.contiguous()
    labels1d = labels.reshape(-1).contiguous()
    n_cols = weight.shape[0]
    ce_weight = check_class_weight(op, "ce_weight", ce_weight, n_cols, hidden, "hidden", label_smoothing)
    inv = prepare_scale(op, labels1d, n_cols, ignore_index, reduction, num_items_in_batch, ce_weight)
    # under torch.compile the chunk size is not clamped to the rows: no guard on a dynamic row count
    chunk = rows_per_chunk(
        None if _custom.compiling() else h2d.shape[0], n_cols, hidden.element_size(), max_chunk_bytes
    )
    grad = torch.is_grad_enabled()
    needs = (
        grad and h2d.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    outs = FLCE_OP(
        h2d,
        weight,
        bias,
        labels1d,
        inv,
        reduction,
        int(ignore_index),
        float(label_smoothing),
        None if softcap is None else float(softcap),
        None if logit_scale is None else float(logit_scale),
        float(lse_square_scale),
        chunk,
        *needs,
    )
    out, lse = outs[0], outs[4]
    return with_z_loss(out, labels.shape, reduction, return_z_loss, lse, labels1d, inv, ignore_index, lse_square_scale)


def _per_item(loss_fn, logits, targets, rows):
    per_item = loss_fn(logits, targets)
    if not isinstance(per_item, torch.Tensor) or per_item.dim() == 0 or per_item.shape[0] != rows:
        got = tuple(per_item.shape) if isinstance(per_item, torch.Tensor) else type(per_item).__name__
        raise ValueError(
            f"chunked_linear_loss: loss_fn must return per-item losses (reduction='none'), a tensor whose first "
            f"dimension is the chunk's {rows} rows; it returned {got}. A loss that reduces itself (e.g. F.mse_loss "
            "with its default reduction='mean') would weight the chunks wrongly"
        )
    return per_item


def _counted_items(per_item, targets, ignore_index):
    """The items a chunk's losses count for "mean": targets != ignore_index for integer targets, else the
    number of loss elements."""
    if targets.dtype in (torch.int64, torch.int32):
        return (targets != ignore_index).sum()
    return per_item.numel()


def _loss_scale(reduction, count, num_items_in_batch, device):
    """The fp32 scalar the loss sum is multiplied by: 1 / items for "mean" (num_items_in_batch when given,
    else `count`; at least 1), 1 for "sum"."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    n = torch.as_tensor(count if num_items_in_batch is None else num_items_in_batch, device=device)
    return 1.0 / n.clamp(min=1).to(torch.float32)


def _unchunked_linear_loss(hidden, weight, bias, targets, loss_fn, reduction, ignore_index, num_items_in_batch):
    """chunked_linear_loss in one piece, autograd's own (under torch.compile, which cannot trace the chunk
    loop's inner autograd.grad): the same value, the logits' memory at once."""
    per_item = _per_item(loss_fn, F.linear(hidden, weight, bias), targets, hidden.shape[0])
    count = _counted_items(per_item, targets, ignore_index) if reduction == "mean" else 0
    return per_item.float().sum() * _loss_scale(reduction, count, num_items_in_batch, hidden.device)


class ChunkedLinearLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, loss_fn, num_chunks, reduction, ignore_index, num_items_in_batch):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        # fp32 sums of the chunks' gradients of their loss sums, scaled once in the backward
        dh = torch.zeros_like(hidden, dtype=torch.float32) if need_dh else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        db = torch.zeros_like(bias, dtype=torch.float32) if need_db else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        count = torch.zeros((), dtype=torch.int64, device=hidden.device)
        rows = hidden.shape[0]
        step = max(1, -(-rows // num_chunks))
        for s in range(0, rows, step):
            e = min(rows, s + step)
            with torch.enable_grad():
                h = hidden[s:e].detach().requires_grad_(need_dh)
                w = weight.detach().requires_grad_(need_dw)
                b = bias.detach().requires_grad_(need_db) if bias is not None else None
                t = targets[s:e]
                per_item = _per_item(loss_fn, F.linear(h, w, b), t, e - s)
                chunk_sum = per_item.float().sum()
                wrt = [x for x, need in ((h, need_dh), (w, need_dw), (b, need_db)) if need]
                grads = list(torch.autograd.grad(chunk_sum, wrt)) if wrt else []
            if need_dh:
                dh[s:e] = grads.pop(0)
            if need_dw:
                dw += grads.pop(0)
            if need_db:
                db += grads.pop(0)
            total += chunk_sum.detach()
            if reduction == "mean" and num_items_in_batch is None:
                count += _counted_items(per_item, t, ignore_index)
        inv = _loss_scale(reduction, count, num_items_in_batch, hidden.device)
        ctx.save_for_backward(dh, dw, db, inv)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * inv

    @staticmethod
    def backward(ctx, dloss):
        # new tensors, the saved sums left as they are: a second backward (retain_graph) scales them again
        s = dloss.to(torch.float32) * ctx.saved_tensors[3]
        grads = tuple(None if g is None else (g * s).to(dt) for g, dt in zip(ctx.saved_tensors[:3], ctx.dtypes))
        return grads + (None,) * 6


def _auto_chunks(rows: int, n_cols: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(rows, 8) or 1
    free, _ = torch.cuda.mem_get_info(device)
    per_row = n_cols * 4 * 3  # fp32 logits, their gradient and the loss's own temporaries
    rows_fit = max(1, (free // 8) // per_row)
    return max(1, -(-rows // rows_fit))


def _targets_per_row(op, targets, hidden_shape: torch.Size, rows: int) -> torch.Tensor:
    """targets as [rows, ...]: given either with hidden's leading dimensions ([B, S, ...] for hidden
    [B, S, H]) or already one row per hidden row ([B*S, ...]); the trailing dimensions are kept."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    lead = hidden_shape[:-1]
    if targets.shape[: len(lead)] == lead:
        return targets.reshape(rows, *targets.shape[len(lead) :])
    if targets.dim() >= 1 and targets.shape[0] == rows:
        return targets
    raise ValueError(
        f"{op}: targets have shape {tuple(targets.shape)}, hidden {tuple(hidden_shape)}: expected "
        f"targets of shape [{', '.join(map(str, lead))}, ...] (hidden's leading dimensions) or "
        f"[{rows}, ...] (one row per hidden row)"
    )


def chunked_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn,
    num_chunks: int | None = None,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    num_items_in_batch=None,
) -> torch.Tensor:
    """loss of `F.linear(hidden, weight, bias)` against `targets`, chunk by chunk over rows.

    `loss_fn(logits_chunk, targets_chunk)` returns per-item losses (reduction "none", ignored items 0).
    reduction "mean" divides the total by the number of items over ALL chunks: targets != ignore_index
    for integer targets, else the number of loss elements; `num_items_in_batch` overrides it.
    num_chunks None: chosen from free GPU memory (8 on CPU). Returns an fp32 scalar. Under torch.compile it
    runs in one piece (same value, the whole logits at once)."""
    op = "chunked_linear_loss"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} but hidden's last dimension is {hidden.shape[-1]}"
        )
    h2d = hidden.reshape(-1, hidden.shape[-1])
    t2d = _targets_per_row(op, targets, hidden.shape, h2d.shape[0])
    if _custom.compiling():
        return _unchunked_linear_loss(h2d, weight, bias, t2d, loss_fn, reduction, int(ignore_index), num_items_in_batch)
    if num_chunks is None:
        num_chunks = _auto_chunks(h2d.shape[0], weight.shape[0], hidden.device)
    if num_chunks < 1:
        raise ValueError(f"{op}: num_chunks must be >= 1, got {num_chunks}")
    return ChunkedLinearLossFunction.apply(
        h2d, weight, bias, t2d, loss_fn, int(num_chunks), reduction, int(ignore_index), num_items_in_batch
    )
