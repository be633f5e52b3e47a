"""Routed experts with LoRA (issue 36): grouped GEMMs over the rows of a MoE layer sorted by expert, with each
expert's rank-r LoRA term taken inside the same tiles (docs/moe-design.md 5.2-5.3).

Rows are the T*k (token, slot) pairs sorted by expert ("sorted rows"); SLOT[row] = t * k + j names the pair, so
the token is SLOT[row] // k. The GEMM grid is (MAX_TILES, column tiles) with MAX_TILES a bound known from the
shapes alone; TILE_E[m] is the expert of M-tile m (n_experts for the tiles past the real count, which exit at
once) and TILE_ROW0[m] its first row; the tile's rows end at START[e + 1]. No count ever reaches the host.

PEFT's layouts are read in place: A [E*r, in] expert-major (A_e[j, c] = A[e*r + j, c]); B [out, r*E]
expert-minor (B_e[o, j] = B[o, j*E + e]). W is [E, out, in], or [E, in, out] when TRANS (gpt_oss).
The gate/up projection's output EG keeps W's output order: concatenated [gate | up] (silu) or interleaved
gate = even, up = odd columns (gptoss). Ranks are padded to RP (>= 16, a power of two) with masked loads.
A launch serves the experts [expert_lo, expert_hi) and W holds their weights alone (W_e at e - expert_lo): the
op dequantises NF4 stacks a chunk of experts at a time and launches once per chunk; bf16 stacks in one launch.
All offsets of rows, experts and weights are int64.
"""

import triton
import triton.language as tl

from csrc_triton._math import mma


@triton.jit
def _tile_expert(TILE_E):
    # this M-tile's expert (n_experts for the padding tiles, which no launch serves)
    return tl.load(TILE_E + tl.program_id(0))


@triton.jit
def _tile(e, TILE_ROW0, START, SLOT, top_k, BM: tl.constexpr):
    # The rows (sorted order) of this M-tile of a served expert e, which of them are real, their slots and tokens.
    row0 = tl.load(TILE_ROW0 + tl.program_id(0)).to(tl.int64)
    row_end = tl.load(START + e + 1)
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    slot = tl.load(SLOT + rows, mask=row_ok, other=0).to(tl.int64)
    return rows, row_ok, slot, slot // top_k


@triton.jit
def _out_cols(n_cols, BN: tl.constexpr, RP: tl.constexpr):
    # this program's output columns (axis 1 of the grid) and the padded rank index
    pid_n = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    return pid_n, n, n < n_cols, tl.arange(0, RP)


@triton.jit
def _lhs_tile(LHS, src, row_ok, k0, n_k, BK: tl.constexpr):
    # one K-step of a GEMM's left operand: rows `src` (gathered tokens or sorted rows) of a [*, n_k] tensor
    kk = k0 + tl.arange(0, BK)
    k_ok = kk < n_k
    return tl.load(LHS + src[:, None] * n_k + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0), kk, k_ok


@triton.jit
def _store_rank_rows(BUF, rows, row_ok, rk, vals, RP: tl.constexpr):
    # a [BM, RP] rank-r product of these sorted rows, kept for the backward / the LoRA gradients
    tl.store(BUF + rows[:, None] * RP + rk[None, :], vals.to(BUF.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _w_tile(W, w_e, out_idx, in_idx, mask, n_out, n_in, TRANS: tl.constexpr):
    # W_e[out_idx, in_idx] (broadcast shapes), expert w_e of the launch's stack, plain or transposed storage
    if TRANS:
        flat = w_e.to(tl.int64) * n_out * n_in + in_idx.to(tl.int64) * n_out + out_idx
    else:
        flat = w_e.to(tl.int64) * n_out * n_in + out_idx.to(tl.int64) * n_in + in_idx
    return tl.load(W + flat, mask=mask, other=0.0)


@triton.jit
def _a_tile(A, e, rk, rank, in_idx, in_ok, n_in):
    # A_e[j, c] = A[e*r + j, c] as a [len(c), RP] tile (rank padded with zeros)
    return tl.load(
        A + (e.to(tl.int64) * rank + rk[None, :]) * n_in + in_idx[:, None],
        mask=in_ok[:, None] & (rk < rank)[None, :],
        other=0.0,
    )


@triton.jit
def _b_tile(B, e, rk, rank, n_experts, out_idx, out_ok):
    # B_e[o, j] = B[o, j*E + e] as a [len(o), RP] tile (rank padded with zeros)
    return tl.load(
        B + out_idx[:, None].to(tl.int64) * rank * n_experts + rk[None, :] * n_experts + e,
        mask=out_ok[:, None] & (rk < rank)[None, :],
        other=0.0,
    )


@triton.jit
def _lora_term(small, factor, scale):
    # s * small factor^T: the rank-r term of an output tile, small [BM, RP], factor [BN, RP]
    return scale * mma(small, tl.trans(factor), tl.zeros([small.shape[0], factor.shape[0]], tl.float32))


@triton.jit
def _gate_up_cols(n, n_inter, ACT: tl.constexpr):
    # W's output rows (EG's columns) of gate and up for intermediate channels n
    if ACT == 1:
        return 2 * n, 2 * n + 1
    else:
        return n, n + n_inter


@triton.jit
def _glu(gate, up, alpha, limit, ACT: tl.constexpr):
    if ACT == 1:  # gpt_oss: (clamp(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        return (u + 1.0) * g * tl.sigmoid(alpha * g)
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def _glu_bwd(dh, gate, up, alpha, limit, ACT: tl.constexpr):
    # (d gate, d up, h); torch's clamp passes the gradient where min <= x <= max (inclusive)
    if ACT == 1:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        sg = tl.sigmoid(alpha * g)
        dgate = tl.where(gate <= limit, dh * (u + 1.0) * sg * (1.0 + alpha * g * (1.0 - sg)), 0.0)
        dup = tl.where((up >= -limit) & (up <= limit), dh * g * sg, 0.0)
        return dgate, dup, (u + 1.0) * g * sg
    else:
        sg = tl.sigmoid(gate)
        a = gate * sg
        return dh * up * sg * (1.0 + gate * (1.0 - sg)), dh * a, a * up


@triton.jit
def _grouped_gemm(
    LHS,
    src,
    row_ok,
    n_k,
    W,
    e,
    expert_lo,
    n,
    n_ok,
    n_w_out,
    n_w_in,
    F_K,
    F_N,
    rk,
    rank,
    n_experts,
    scale,
    dtype: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_LORA: tl.constexpr,
    TRANS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    RP: tl.constexpr,
):
    """One [BM, BN] tile of expert e's projection with its LoRA term, fp32: forward (BACKWARD=0) lhs W_e^T +
    s (lhs A_e^T) B_e^T, K over W's input dim; backward lhs W_e + s (lhs B_e) A_e, K over W's output dim.
    lhs = LHS[src] ([*, n_k] rows: gathered tokens or sorted rows). Also returns the rank-r product
    (lhs A_e^T or lhs B_e, [BM, RP], rounded to dtype as the epilogue used it)."""
    acc = tl.zeros([BM, BN], tl.float32)
    acc_r = tl.zeros([BM, RP], tl.float32)
    for k0 in range(0, n_k, BK):
        lhs, kk, k_ok = _lhs_tile(LHS, src, row_ok, k0, n_k, BK)
        w_ok = k_ok[:, None] & n_ok[None, :]
        if BACKWARD:
            wt = _w_tile(W, e - expert_lo, kk[:, None], n[None, :], w_ok, n_w_out, n_w_in, TRANS)
        else:
            wt = _w_tile(W, e - expert_lo, n[None, :], kk[:, None], w_ok, n_w_out, n_w_in, TRANS)
        acc = mma(lhs, wt, acc)
        if HAS_LORA:
            if BACKWARD:
                acc_r = mma(lhs, _b_tile(F_K, e, rk, rank, n_experts, kk, k_ok), acc_r)
            else:
                acc_r = mma(lhs, _a_tile(F_K, e, rk, rank, kk, k_ok, n_k), acc_r)
    small = acc_r.to(dtype)
    if HAS_LORA:
        if BACKWARD:
            acc += _lora_term(small, _a_tile(F_N, e, rk, rank, n, n_ok, n_w_in), scale)
        else:
            acc += _lora_term(small, _b_tile(F_N, e, rk, rank, n_experts, n, n_ok), scale)
    return acc, small


@triton.jit(do_not_specialize=["n_experts", "expert_lo", "expert_hi", "top_k", "rank"])
def moe_gate_up_fwd_kernel(
    X,
    W,
    A,
    B,
    BIAS,
    TILE_E,
    TILE_ROW0,
    START,
    SLOT,
    EG,
    HOUT,
    XA,
    n_experts,
    expert_lo,
    expert_hi,
    top_k,
    hidden,
    n_inter,
    rank,
    scale,
    alpha,
    limit,
    ACT: tl.constexpr,
    TRANS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Gate/up projection of the sorted rows with LoRA and the GLU: for this tile's expert e and the tokens x
    of its rows, EG = x W_e^T + s (x A_e^T) B_e^T (+ b_e) in W's output order, HOUT = GLU(gate, up) [TK, I],
    XA = x A_e^T [TK, RP] (stored by the first column tile). The rank-r product rides in the K-loop on
    the x tile already loaded."""
    e = _tile_expert(TILE_E)
    if (e < expert_lo) | (e >= expert_hi):
        return
    rows, row_ok, slot, tok = _tile(e, TILE_ROW0, START, SLOT, top_k, BM)
    dtype = EG.dtype.element_ty
    pid_n, n, n_ok, rk = _out_cols(n_inter, BN, RP)
    g_col, u_col = _gate_up_cols(n, n_inter, ACT)
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    acc_xa = tl.zeros([BM, RP], tl.float32)
    for k0 in range(0, hidden, BK):
        xt, kk, k_ok = _lhs_tile(X, tok, row_ok, k0, hidden, BK)
        w_ok = k_ok[:, None] & n_ok[None, :]
        wg = _w_tile(W, e - expert_lo, g_col[None, :], kk[:, None], w_ok, 2 * n_inter, hidden, TRANS)
        wu = _w_tile(W, e - expert_lo, u_col[None, :], kk[:, None], w_ok, 2 * n_inter, hidden, TRANS)
        acc_g = mma(xt, wg, acc_g)
        acc_u = mma(xt, wu, acc_u)
        if HAS_LORA:
            acc_xa = mma(xt, _a_tile(A, e, rk, rank, kk, k_ok, hidden), acc_xa)
    if HAS_LORA:
        xa = acc_xa.to(dtype)  # rounded as stored: the backward's dB uses the same values
        acc_g += _lora_term(xa, _b_tile(B, e, rk, rank, n_experts, g_col, n_ok), scale)
        acc_u += _lora_term(xa, _b_tile(B, e, rk, rank, n_experts, u_col, n_ok), scale)
        if pid_n == 0:
            _store_rank_rows(XA, rows, row_ok, rk, xa, RP)
    if HAS_BIAS:
        b_row = BIAS + e.to(tl.int64) * 2 * n_inter
        acc_g += tl.load(b_row + g_col, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_row + u_col, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    gate = acc_g.to(dtype)
    up = acc_u.to(dtype)
    mask = row_ok[:, None] & n_ok[None, :]
    eg_row = EG + rows[:, None] * 2 * n_inter
    tl.store(eg_row + g_col[None, :], gate, mask=mask)
    tl.store(eg_row + u_col[None, :], up, mask=mask)
    # the GLU of the rounded values: the backward recomputes it from EG and must see the same h
    h = _glu(gate.to(tl.float32), up.to(tl.float32), alpha, limit, ACT)
    tl.store(HOUT + rows[:, None] * n_inter + n[None, :], h.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["n_experts", "expert_lo", "expert_hi", "top_k", "rank"])
def moe_down_fwd_kernel(
    HIN,
    W,
    A,
    B,
    BIAS,
    RW,
    TILE_E,
    TILE_ROW0,
    START,
    SLOT,
    OUT_SLOTS,
    HA,
    n_experts,
    expert_lo,
    expert_hi,
    top_k,
    hidden,
    n_inter,
    rank,
    scale,
    TRANS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Down projection of the sorted rows h [TK, I] with LoRA: y = h W_e^T + s (h A_e^T) B_e^T (+ b_e), times
    the routing weight RW[slot] (fp32, slot order), stored to slot order OUT_SLOTS [TK, H]; HA = h A_e^T
    [TK, RP] (first column tile)."""
    e = _tile_expert(TILE_E)
    if (e < expert_lo) | (e >= expert_hi):
        return
    rows, row_ok, slot, tok = _tile(e, TILE_ROW0, START, SLOT, top_k, BM)
    dtype = OUT_SLOTS.dtype.element_ty
    pid_n, n, n_ok, rk = _out_cols(hidden, BN, RP)
    acc, ha = _grouped_gemm(
        HIN,
        rows,
        row_ok,
        n_inter,
        W,
        e,
        expert_lo,
        n,
        n_ok,
        hidden,
        n_inter,
        A,
        B,
        rk,
        rank,
        n_experts,
        scale,
        dtype,
        0,
        HAS_LORA,
        TRANS,
        BM,
        BN,
        BK,
        RP,
    )
    if HAS_LORA:
        if pid_n == 0:
            _store_rank_rows(HA, rows, row_ok, rk, ha, RP)
    if HAS_BIAS:
        acc += tl.load(BIAS + e.to(tl.int64) * hidden + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rw = tl.load(RW + slot, mask=row_ok, other=0.0)
    tl.store(
        OUT_SLOTS + slot[:, None] * hidden + n[None, :],
        (acc * rw[:, None]).to(dtype),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit(do_not_specialize=["n_experts", "expert_lo", "expert_hi", "top_k", "rank", "n_col_tiles"])
def moe_down_bwd_kernel(
    DO,
    W,
    A,
    B,
    BIAS,
    RW,
    EG,
    TILE_E,
    TILE_ROW0,
    START,
    SLOT,
    DEG,
    HBUF,
    DOB,
    DW_PART,
    n_experts,
    expert_lo,
    expert_hi,
    top_k,
    hidden,
    n_inter,
    rank,
    n_col_tiles,
    scale,
    alpha,
    limit,
    ACT: tl.constexpr,
    TRANS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Down projection's backward over intermediate channels n, the GLU's backward in the epilogue. With the
    token's output gradient g = DO[token]: dh_u = g W_e + s (g B_e) A_e (unweighted, [BM, BN]);
    h = GLU(EG) recomputed; DW_PART[slot, tile] = sum_n dh_u h (+ <g, b_e> from the first tile): the routing
    weight's gradient in partials; DEG = GLU'(RW[slot] dh_u) in EG's layout. With LoRA: HBUF = h [TK, I]
    and DOB = s RW[slot] g B_e [TK, RP] (first tile), for dA/dB of the down projection."""
    e = _tile_expert(TILE_E)
    if (e < expert_lo) | (e >= expert_hi):
        return
    rows, row_ok, slot, tok = _tile(e, TILE_ROW0, START, SLOT, top_k, BM)
    dtype = DEG.dtype.element_ty
    pid_n, n, n_ok, rk = _out_cols(n_inter, BN, RP)
    acc, ob = _grouped_gemm(
        DO,
        tok,
        row_ok,
        hidden,
        W,
        e,
        expert_lo,
        n,
        n_ok,
        hidden,
        n_inter,
        B,
        A,
        rk,
        rank,
        n_experts,
        scale,
        dtype,
        1,
        HAS_LORA,
        TRANS,
        BM,
        BN,
        BK,
        RP,
    )
    rw = tl.load(RW + slot, mask=row_ok, other=0.0)
    if HAS_LORA:
        if pid_n == 0:
            _store_rank_rows(DOB, rows, row_ok, rk, ob.to(tl.float32) * (rw * scale)[:, None], RP)
    dw = tl.zeros([BM], tl.float32)
    if HAS_BIAS:
        if pid_n == 0:  # the down bias's part of the routing weight's gradient: <g, b_e>
            for k0 in range(0, hidden, BK):
                dot, kk, k_ok = _lhs_tile(DO, tok, row_ok, k0, hidden, BK)
                bias = tl.load(BIAS + e.to(tl.int64) * hidden + kk, mask=k_ok, other=0.0).to(tl.float32)
                dw += tl.sum(dot.to(tl.float32) * bias[None, :], axis=1)
    mask = row_ok[:, None] & n_ok[None, :]
    g_col, u_col = _gate_up_cols(n, n_inter, ACT)
    eg_row = rows[:, None] * 2 * n_inter
    gate = tl.load(EG + eg_row + g_col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(EG + eg_row + u_col[None, :], mask=mask, other=0.0).to(tl.float32)
    dgate, dup, h = _glu_bwd(acc * rw[:, None], gate, up, alpha, limit, ACT)
    h = tl.where(mask, h.to(dtype).to(tl.float32), 0.0)  # h as the forward stored it
    dw += tl.sum(acc * h, axis=1)
    tl.store(DW_PART + slot * n_col_tiles + pid_n, dw, mask=row_ok)
    tl.store(DEG + eg_row + g_col[None, :], dgate.to(dtype), mask=mask)
    tl.store(DEG + eg_row + u_col[None, :], dup.to(dtype), mask=mask)
    if HAS_LORA:
        tl.store(HBUF + rows[:, None] * n_inter + n[None, :], h.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["n_experts", "expert_lo", "expert_hi", "top_k", "rank"])
def moe_gate_up_bwd_dx_kernel(
    DEG,
    W,
    A,
    B,
    TILE_E,
    TILE_ROW0,
    START,
    SLOT,
    DX_SLOTS,
    DHB,
    n_experts,
    expert_lo,
    expert_hi,
    top_k,
    hidden,
    n_inter,
    rank,
    scale,
    TRANS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Gate/up projection's input gradient: dx = dEG W_e + s (dEG B_e) A_e over hidden channels n, the K-loop
    over EG's 2I columns (W's output order), stored to slot order DX_SLOTS [TK, H]; DHB = s dEG B_e
    [TK, RP] (first column tile), for dA of the gate/up projection."""
    e = _tile_expert(TILE_E)
    if (e < expert_lo) | (e >= expert_hi):
        return
    rows, row_ok, slot, tok = _tile(e, TILE_ROW0, START, SLOT, top_k, BM)
    dtype = DX_SLOTS.dtype.element_ty
    pid_n, n, n_ok, rk = _out_cols(hidden, BN, RP)
    acc, hb = _grouped_gemm(
        DEG,
        rows,
        row_ok,
        2 * n_inter,
        W,
        e,
        expert_lo,
        n,
        n_ok,
        2 * n_inter,
        hidden,
        B,
        A,
        rk,
        rank,
        n_experts,
        scale,
        dtype,
        1,
        HAS_LORA,
        TRANS,
        BM,
        BN,
        BK,
        RP,
    )
    if HAS_LORA:
        if pid_n == 0:
            _store_rank_rows(DHB, rows, row_ok, rk, hb.to(tl.float32) * scale, RP)
    tl.store(DX_SLOTS + slot[:, None] * hidden + n[None, :], acc.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["top_k", "rank", "out_stride_e", "out_stride_j", "out_stride_c"])
def moe_lora_seg_grad_kernel(
    BIG,
    SMALL,
    SLOT,
    RW,
    START,
    OUT,
    n_cols,
    top_k,
    rank,
    out_stride_e,
    out_stride_j,
    out_stride_c,
    scale,
    GATHER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """A LoRA factor's gradient, per expert e: OUT[e, j, c] = scale * sum over e's sorted rows of
    BIG[src(row), c] (* RW[slot]) * SMALL[row, j], with src = SLOT[row] // k (GATHER: BIG is in token order,
    e.g. x or the output gradient) or row (BIG in sorted order). OUT is fp32, addressed through strides so
    that PEFT's A [E*r, in] and B [out, r*E] layouts are written directly. Each program loops over its
    expert's rows, with the bounds read from START on the device; an expert with no row writes zeros."""
    e = tl.program_id(0)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = c < n_cols
    rk = tl.arange(0, RP)
    row_lo = tl.load(START + e)
    row_hi = tl.load(START + e + 1)
    acc = tl.zeros([BN, RP], tl.float32)
    for r0 in range(row_lo, row_hi, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < row_hi
        rows = rows.to(tl.int64)
        if GATHER or ROW_SCALE:
            slot = tl.load(SLOT + rows, mask=row_ok, other=0).to(tl.int64)
        if GATHER:
            src = slot // top_k
        else:
            src = rows
        big = tl.load(BIG + src[:, None] * n_cols + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if ROW_SCALE:
            rw = tl.load(RW + slot, mask=row_ok, other=0.0)
            big = (big.to(tl.float32) * rw[:, None]).to(BIG.dtype.element_ty)
        small = tl.load(SMALL + rows[:, None] * RP + rk[None, :], mask=row_ok[:, None], other=0.0)
        acc = mma(tl.trans(big), small, acc)
    out = (
        OUT
        + e.to(tl.int64) * out_stride_e
        + rk[None, :].to(tl.int64) * out_stride_j
        + c[:, None].to(tl.int64) * out_stride_c
    )
    tl.store(out, acc * scale, mask=c_ok[:, None] & (rk < rank)[None, :])


# ---------------------------------------------------------------- the hybrid path's GLU (docs/moe-design.md 5.7)
# With the frozen base GEMMs in torch._grouped_mm (cuBLAS/CUTLASS), the GLU and its backward run over the sorted
# rows on their own; they share _glu / _glu_bwd with the GEMM epilogues above and, as those, add a LoRA term in
# fp32 and take the GLU of the rounded sum (one rank-r dot per expert a tile spans, the frozen output read once),
# so the forward's h is bit for bit the h the backward recomputes from EG.


@triton.jit
def _rows_lora_term(ROW_E, SMALL, F, rows, row_ok, cols, col_ok, f_stride_e, f_stride_j, f_stride_c, RP: tl.constexpr):
    """[BM, BN] fp32: each row's SMALL [RP] times its expert's factor F_e [RP, cols] (F addressed by strides
    (e, j, c)). The rows are sorted by expert (ROW_E), so a tile spans one expert or a few: one rank-RP dot
    per expert present, the other rows masked out."""
    row_e = tl.load(ROW_E + rows, mask=row_ok, other=0)
    e_lo = tl.min(tl.where(row_ok, row_e, 2147483647), axis=0)
    e_hi = tl.max(tl.where(row_ok, row_e, -1), axis=0)
    rk = tl.arange(0, RP)
    small = tl.load(SMALL + rows[:, None] * RP + rk[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    stride_e = f_stride_e + tl.zeros([], tl.int64)  # (an expert's offset may pass 2**31 elements)
    for e in range(e_lo, e_hi + 1):
        mine = row_e == e
        if tl.max(mine.to(tl.int32), axis=0) > 0:  # (experts without a row between two that have some: skipped)
            f_ptr = F + e * stride_e + rk[:, None] * f_stride_j + cols[None, :] * f_stride_c
            f = tl.load(f_ptr, mask=col_ok[None, :], other=0.0)
            acc = mma(tl.where(mine[:, None], small, tl.zeros_like(small)), f, acc)
    return acc


# (the factor's strides are not specialised: 1 in one layout, 16-divisible in the other, 0 without an adapter)
@triton.jit(do_not_specialize=["n_rows", "f_stride_e", "f_stride_j", "f_stride_c"])
def moe_glu_rows_fwd_kernel(
    EG,
    HOUT,
    ROW_E,
    XA,
    FB,
    n_rows,
    n_inter,
    f_stride_e,
    f_stride_j,
    f_stride_c,
    scale,
    alpha,
    limit,
    ACT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """HOUT [TK, I] = GLU of the gate/up pre-activations EG [TK, 2I] (W's output order), rounded once. HAS_LORA:
    EG holds the frozen GEMM's output; the LoRA term scale XA[row] B_e (FB: B's stack) is added here and the
    full pre-activations written back to EG (one pass, no [TK, 2I] LoRA product or sum in memory)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    n_ok = n < n_inter
    mask = row_ok[:, None] & n_ok[None, :]
    g_col, u_col = _gate_up_cols(n, n_inter, ACT)
    eg_row = EG + rows[:, None] * 2 * n_inter
    gate = tl.load(eg_row + g_col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(eg_row + u_col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        lora = (ROW_E, XA, FB, rows, row_ok)
        gate = (gate + scale * _rows_lora_term(*lora, g_col, n_ok, f_stride_e, f_stride_j, f_stride_c, RP)).to(
            EG.dtype.element_ty
        )
        up = (up + scale * _rows_lora_term(*lora, u_col, n_ok, f_stride_e, f_stride_j, f_stride_c, RP)).to(
            EG.dtype.element_ty
        )
        tl.store(eg_row + g_col[None, :], gate, mask=mask)
        tl.store(eg_row + u_col[None, :], up, mask=mask)
        # the GLU of the rounded values, as the fused epilogue: the backward recomputes h from EG
        gate, up = gate.to(tl.float32), up.to(tl.float32)
    h = _glu(gate, up, alpha, limit, ACT)
    tl.store(HOUT + rows[:, None] * n_inter + n[None, :], h.to(HOUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "n_col_tiles", "f_stride_e", "f_stride_j", "f_stride_c"])
def moe_glu_rows_bwd_kernel(
    G,
    EG,
    RW,
    SLOT,
    ROW_E,
    OB,
    FA,
    DEG,
    HBUF,
    DW_PART,
    n_rows,
    n_inter,
    n_col_tiles,
    f_stride_e,
    f_stride_j,
    f_stride_c,
    scale,
    alpha,
    limit,
    ACT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """The GLU's backward over the sorted rows, as moe_down_bwd's epilogue: G [TK, I] is the unweighted
    gradient of h through the frozen down projection; HAS_LORA adds its LoRA term scale OB[row] A_e (FA: A's
    stack) and stores h in HBUF (for A's gradient). DEG = GLU'(RW[slot] g) in EG's layout, DW_PART[slot, tile]
    = sum_n g h (the routing weight's gradient in partials)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    pid_n = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    n_ok = n < n_inter
    mask = row_ok[:, None] & n_ok[None, :]
    slot = tl.load(SLOT + rows, mask=row_ok, other=0).to(tl.int64)
    rw = tl.load(RW + slot, mask=row_ok, other=0.0)
    g = tl.load(G + rows[:, None] * n_inter + n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        g += scale * _rows_lora_term(ROW_E, OB, FA, rows, row_ok, n, n_ok, f_stride_e, f_stride_j, f_stride_c, RP)
    g_col, u_col = _gate_up_cols(n, n_inter, ACT)
    eg_row = rows[:, None] * 2 * n_inter
    gate = tl.load(EG + eg_row + g_col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(EG + eg_row + u_col[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = DEG.dtype.element_ty
    dgate, dup, h = _glu_bwd(g * rw[:, None], gate, up, alpha, limit, ACT)
    h = tl.where(mask, h.to(dtype).to(tl.float32), 0.0)  # h as the forward stored it
    tl.store(DW_PART + slot * n_col_tiles + pid_n, tl.sum(g * h, axis=1), mask=row_ok)
    tl.store(DEG + eg_row + g_col[None, :], dgate.to(dtype), mask=mask)
    tl.store(DEG + eg_row + u_col[None, :], dup.to(dtype), mask=mask)
    if HAS_LORA:
        tl.store(HBUF + rows[:, None] * n_inter + n[None, :], h.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["n_tokens", "k"])  # (top-k: 1, 2, 4, 8...: one variant for all)
def moe_combine_rows_kernel(
    ROWS,
    EXTRA,
    POS,
    RW,
    OUT,
    n_tokens,
    n_cols,
    k,
    extra_scale,
    WEIGHTED: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
):
    """OUT [T, N] = sum over j < k of (RW[t k + j] if WEIGHTED) (ROWS + extra_scale EXTRA if HAS_EXTRA)[POS[t k + j]]:
    each token's k expert rows gathered from expert order (POS: a slot's sorted row), with a LoRA term's rows
    (EXTRA, unscaled) added, summed in fp32 and rounded once; one pass in place of an add, a weighting, an unsort
    and a sum over [TK, N]."""
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    t_ok = t < n_tokens
    mask = t_ok[:, None] & (n < n_cols)[None, :]
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for j in range(k):
        slot = t * k + j
        row = tl.load(POS + slot, mask=t_ok, other=0).to(tl.int64)
        offs = row[:, None] * n_cols + n[None, :]
        y = tl.load(ROWS + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_EXTRA:
            y += extra_scale * tl.load(EXTRA + offs, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(RW + slot, mask=t_ok, other=0.0)[:, None]
        acc += y
    tl.store(OUT + t[:, None] * n_cols + n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
