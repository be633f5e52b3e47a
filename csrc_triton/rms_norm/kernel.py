"""RMSNorm forward and backward.

Forward:  y = cast(x * rstd) * (w + offset)      (Llama: normalise in fp32, cast, multiply)
          y = cast(x * rstd * (w + offset))      (Gemma: multiply in fp32, then cast)
Backward: dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * (w + offset)
          dw = sum_rows(dy * xhat)              (xhat cast to x's dtype first in Llama mode)
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows"])
def rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    x_row_stride, y_row_stride, n_rows, n_cols,
    eps, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GEMMA_CAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = x * rstd[:, None]
    if GEMMA_CAST:
        y = xhat * w[None, :]
    else:
        # HF Llama rounds the normalised row to the input dtype before the weight multiply.
        y = xhat.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
def rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols,
    offset,
    BLOCK_N: tl.constexpr, GEMMA_CAST: tl.constexpr,
):
    # Persistent: program p handles rows p, p + P, ... and keeps its share of dw in registers.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 strides: row * stride may pass 2**31 elements.
    x_stride = x_row_stride + tl.zeros([], tl.int64)  # a stride may arrive as a constexpr 1
    dy_stride = dy_row_stride + tl.zeros([], tl.int64)
    dx_stride = dx_row_stride + tl.zeros([], tl.int64)
    for row in range(pid, n_rows, n_progs):
        x = tl.load(X + row * x_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dy_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
        if GEMMA_CAST:
            dw += dy * xhat
        else:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)
