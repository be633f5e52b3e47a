"""RMSNorm forward and backward.

Forward:  y = cast(x * rstd) * (w + offset)      (Llama: normalise in fp32, cast, multiply)
          y = cast(x * rstd * (w + offset))      (Gemma: multiply in fp32, then cast)
          y = x * rstd * (w + offset)            (None: each step in fp32 rounded once to its operands'
                                                  dtype, as torch's CUDA ops on x and w compute it)
          HAS_WEIGHT = 0: no weight (y = x * rstd, cast as above)
Backward: dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * (w + offset)  (g = dy without a weight)
          dw = sum_rows(dy * xhat)              (xhat cast to x's dtype first but in Gemma mode)
RSTD keeps the fp32 rstd in every mode: the None mode's backward is the Llama one (the gradient of the
unrounded function; its roundings move the forward by an ulp, and would move a near-cancelling dx by more).
"""

import triton
import triton.language as tl


@triton.jit
def _in_x_dtype(v, X):
    # one rounding to X's element type, as a torch op on that dtype gives (its arithmetic runs in fp32)
    return v.to(X.dtype.element_ty).to(tl.float32)


@triton.jit(do_not_specialize=["n_rows"])
def rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    x_row_stride,
    y_row_stride,
    n_rows,
    n_cols,
    eps,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GEMMA_CAST: tl.constexpr,
    NONE_CAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # saved for the backward in every mode
    if NONE_CAST:
        # x.pow(2).mean(-1) + eps, rsqrt, x * rstd: each a torch op on x's dtype (fp32 sum inside the mean)
        mean_sq = _in_x_dtype(tl.sum(_in_x_dtype(x * x, X), axis=1) / n_cols, X)
        xhat = x * _in_x_dtype(1.0 / tl.sqrt(_in_x_dtype(mean_sq + eps, X)), X)[:, None]
    else:
        xhat = x * rstd[:, None]
    if not GEMMA_CAST:
        # HF Llama rounds the normalised row to the input dtype before the weight multiply.
        xhat = _in_x_dtype(xhat, X)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        if NONE_CAST:
            w = _in_x_dtype(w, W)  # weight + offset, a torch op on the weight's dtype
        y = xhat * w[None, :]
    else:
        y = xhat
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
def rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GEMMA_CAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    # Persistent: program p handles row blocks p, p + P, ... (BLOCK_M rows each, so narrow rows such as a
    # head_dim q/k norm's still move a few KB a step) and keeps its share of dw in registers.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 strides: row * stride may pass 2**31 elements.
    x_stride = x_row_stride + tl.zeros([], tl.int64)  # a stride may arrive as a constexpr 1
    dy_stride = dy_row_stride + tl.zeros([], tl.int64)
    dx_stride = dx_row_stride + tl.zeros([], tl.int64)
    for row0 in range(pid * BLOCK_M, n_rows, n_progs * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * dx_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            if GEMMA_CAST:
                dw += tl.sum(dy * xhat, axis=0)
            else:
                dw += tl.sum(dy * _in_x_dtype(xhat, X), axis=0)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)
