"""Cross-entropy over rows of logits, one program per row, never materialising fp32 logits.

Per row: x = softcap * tanh(logit_scale * z / softcap) (softcap optional), lse = logsumexp(x),
loss = lse - (1 - eps) * x[label] - eps * mean(x) + zs * lse^2   (eps = label smoothing, its mean(x) only
taken when SMOOTH; zs = lse_square_scale, the z-loss, whose gradient 2 zs lse softmax(x) costs one
multiply per row; 0 for ignored rows).
MODE 0: loss and lse only. MODE 1: also the gradient, scaled by SCALE[0] (1/divisor for mean), written
in the logits' dtype (possibly in place over the logits: each chunk is read before it is written).
MODES 0 and 1 store each row's loss times SCALE[0] too, so that a plain sum gives the reduction.
MODE 2: gradient only, from the saved lse, scaled by SCALE[row] (reduction="none" backward).
MODE 1's second pass walks the row backwards: the chunks read last by the first pass are the likeliest
to still be in L2 (first-pass loads are marked evict_last, second-pass loads evict_first and the
gradient stores streaming, so the gradient does not push the row out; docs/perf-notes.md has the timing).
"""

import triton
import triton.language as tl

from csrc_triton._math import tanh


@triton.jit
def _transform(z, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    x = z * logit_scale
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x


@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def cross_entropy_kernel(
    LOGITS,
    LABELS,
    LOSS,
    LSE,
    GRAD,
    SCALE,
    logits_row_stride,
    grad_row_stride,
    scale_stride,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    lse_square_scale,
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    # Program p takes rows p, p + P, ... (the launcher may pick a persistent grid). Eviction hints only
    # where a row is read twice (MODE 1).
    FIRST_READ: tl.constexpr = "evict_last" if MODE == 1 else ""
    SECOND_READ: tl.constexpr = "evict_first" if MODE == 1 else ""
    GRAD_STORE: tl.constexpr = ".cs" if MODE == 1 else ""
    cols = tl.arange(0, BLOCK_V)
    l_stride = logits_row_stride + tl.zeros([], tl.int64)  # int64 offsets (a stride may be a constexpr 1)
    g_stride = grad_row_stride + tl.zeros([], tl.int64)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        label = tl.load(LABELS + row).to(tl.int64)
        ignored = label == ignore_index
        base = LOGITS + row * l_stride
        scale = tl.where(ignored, 0.0, tl.load(SCALE + row * scale_stride).to(tl.float32))
        if MODE == 2:
            lse = tl.load(LSE + row)
        else:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([], tl.float32)
            sum_x = tl.zeros([], tl.float32)
            # each chunk's load is issued one step ahead (z_next), so its latency overlaps the reductions;
            # the chunk offset is a scalar (a carried column tensor costs a register per element)
            z_next = tl.load(base + cols, mask=cols < n_cols, other=0.0, eviction_policy=FIRST_READ)
            for start in range(0, n_cols, BLOCK_V):
                z = z_next
                nxt = start + BLOCK_V + cols
                z_next = tl.load(base + nxt, mask=nxt < n_cols, other=0.0, eviction_policy=FIRST_READ)
                ok = start + cols < n_cols
                x = tl.where(ok, _transform(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP), float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # while every logit so far is -inf the running max is -inf too: shift by 0 then (s is still 0),
                # since -inf - -inf is NaN
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
                if SMOOTH:  # the row's mean logit, for label smoothing: one more reduction per chunk
                    sum_x += tl.sum(tl.where(ok, x, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(s)
            safe_label = tl.where(ignored, 0, label)
            x_label = _transform(tl.load(base + safe_label).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
            loss = lse - (1.0 - label_smoothing) * x_label - label_smoothing * (sum_x / n_cols)
            loss += lse_square_scale * lse * lse
            tl.store(LOSS + row, tl.where(ignored, 0.0, loss * scale))
            tl.store(LSE + row, lse)
        if MODE != 0:
            smooth = label_smoothing / n_cols
            softmax_coef = 1.0 + 2.0 * lse_square_scale * lse  # the z-loss's share of d loss / d x
            gbase = GRAD + row * g_stride
            # MODE 1 walks backwards: the chunks the first pass read last come first (L2 hits)
            n_chunks = tl.cdiv(n_cols, BLOCK_V)
            step = -BLOCK_V if MODE == 1 else BLOCK_V
            first = (n_chunks - 1) * BLOCK_V if MODE == 1 else 0
            label_col = tl.where(ignored, 0, label).to(tl.int32)  # ignored rows have scale 0
            z_next = tl.load(base + first + cols, mask=first + cols < n_cols, other=0.0, eviction_policy=SECOND_READ)
            for i in range(0, n_chunks):
                start = first + i * step
                z = z_next.to(tl.float32)
                nxt = start + step + cols
                z_next = tl.load(base + nxt, mask=(nxt >= 0) & (nxt < n_cols), other=0.0, eviction_policy=SECOND_READ)
                x = _transform(z, softcap, logit_scale, HAS_SOFTCAP)
                g = (
                    tl.exp(x - lse) * softmax_coef
                    - smooth
                    - tl.where(cols == label_col - start, 1.0 - label_smoothing, 0.0)
                )
                if HAS_SOFTCAP:
                    t = x / softcap
                    g = g * (1.0 - t * t)
                g = g * (logit_scale * scale)
                tl.store(
                    gbase + start + cols,
                    g.to(GRAD.dtype.element_ty),
                    mask=start + cols < n_cols,
                    cache_modifier=GRAD_STORE,
                )


@triton.jit(do_not_specialize=["n_elements"])
def scale_by_scalar_kernel(X, S, n_elements, BLOCK: tl.constexpr):
    """X *= S[0] in place, skipped (no memory traffic) when S[0] == 1: the usual loss.backward() seed.
    Persistent (program p takes blocks p, p + P, ...): a skipped call launches few programs, not one per
    block (which costs real time at vocabulary sizes even with nothing to do)."""
    s = tl.load(S).to(tl.float32)
    if s != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n_elements, step):
            offs = start + tl.arange(0, BLOCK)
            if start + BLOCK <= n_elements:  # unmasked, so the accesses vectorise
                x = tl.load(X + offs).to(tl.float32)
                tl.store(X + offs, (x * s).to(X.dtype.element_ty))
            else:
                ok = offs < n_elements
                x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
                tl.store(X + offs, (x * s).to(X.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_labels", "n_cols", "ignore_index"])
def ce_prepare_kernel(
    LABELS, INV, OK, n_labels, n_cols, ignore_index, divisor, BLOCK: tl.constexpr, INV_MODE: tl.constexpr
):
    """One program, before the cross-entropy kernel: OK[0] = 1 if every label is in [0, n_cols) or
    ignore_index, else 0 (the op turns it into an asynchronous assert), and the loss scale INV[0]:
    INV_MODE 0: 1 / max(#labels != ignore_index, 1) ("mean"); 1: 1 / max(divisor, 1) (a given
    num_items_in_batch, or 1 for "sum"/"none"); 2: INV not written. Replaces ~12 small torch kernels."""
    count = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_labels, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        lab = tl.load(LABELS + offs, mask=offs < n_labels, other=ignore_index)
        used = lab != ignore_index
        count += used.to(tl.int32)
        bad += (used & ((lab < 0) | (lab >= n_cols))).to(tl.int32)
    tl.store(OK, (tl.sum(bad, axis=0) == 0).to(tl.int32))
    if INV_MODE == 0:
        tl.store(INV, 1.0 / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32))
    elif INV_MODE == 1:
        tl.store(INV, 1.0 / tl.maximum(divisor, 1.0))
