"""Gated linear units: h = act(gate) * up with act = SiLU (SwiGLU) or GELU (GeGLU, erf or tanh).

Elementwise over flattened contiguous tensors. n_elements is specialised on 16-divisibility only (so
masked loads stay 16-byte vectors; every LLM MLP size qualifies) and is otherwise a runtime length.
Backward recomputes the activation from gate instead of storing it.
"""
import triton
import triton.language as tl

from csrc_triton._math import gelu_and_grad

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        return gelu_and_grad(g, ACT == 2)


@triton.jit
def glu_fwd_kernel(GATE, UP, OUT, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, H, n_elements, ACT: tl.constexpr, STORE_H: tl.constexpr,
                   BLOCK: tl.constexpr):
    # DGATE / DUP may alias GATE / UP and H may alias DOUT (in-place backward): each element is read
    # before it is written. STORE_H also writes h = act(gate) * up, bit-identical to the forward's, for a
    # caller that needs h again (LoRA down_proj's dA) without a separate recompute pass.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dh = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DGATE + offs, (dh * u * da).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * a).to(DUP.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, acc):
    # fp32 operands: exact products (tl.dot would use TF32 on the GPU); fp16/bf16: tensor cores
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _rank_tile_t(P, cols, n_cols, rank, R: tl.constexpr):
    """[R, len(cols)] tile of a row-major [n_cols, rank] matrix, transposed (zeros past rank / n_cols)."""
    rk = tl.arange(0, R)
    return tl.load(P + cols[None, :].to(tl.int64) * rank + rk[:, None],
                   mask=(rk < rank)[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _rank_rows(P, cols, n_cols, rank, R: tl.constexpr):
    """[R, len(cols)] tile of a row-major [rank, n_cols] matrix (zeros past rank / n_cols)."""
    rk = tl.arange(0, R)
    return tl.load(P + rk[:, None].to(tl.int64) * n_cols + cols[None, :],
                   mask=(rk < rank)[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _lora_gate_up(GATE, UP, XA, offs, mask, rows, row_ok, stride_xa, xa_up_offset, rank_g, rank_u, bg_t, bu_t,
                  scale_g, scale_u, R: tl.constexpr):
    """e = E + s_g XA_g B_g^T and g = G + s_u XA_u B_u^T for one tile (fp32), with the XA tiles."""
    rk = tl.arange(0, R)
    xa_rows = XA + rows[:, None] * stride_xa
    xg = tl.load(xa_rows + rk[None, :], mask=row_ok[:, None] & (rk < rank_g)[None, :], other=0.0)
    xu = tl.load(xa_rows + xa_up_offset + rk[None, :], mask=row_ok[:, None] & (rk < rank_u)[None, :], other=0.0)
    e = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    e += scale_g * _mma(xg, bg_t, tl.zeros(e.shape, tl.float32))
    g += scale_u * _mma(xu, bu_t, tl.zeros(g.shape, tl.float32))
    return e, g, xg, xu


@triton.jit(do_not_specialize=["n_rows", "rows_per_group"])
def glu_lora_fwd_kernel(
    GATE, UP, OUT, XA, BG, BU, AD, XAD_PART,
    n_rows, n_cols, stride_eg, stride_xa, xa_up_offset, rank_g, rank_u, rank_d, rows_per_group,
    scale_g, scale_u,
    ACT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The LoRA MLP's GLU forward with the adapters of gate and up added on the fly, so that the base GEMMs
    write E = X W_g^T and G = X W_u^T alone (no [X, XA] copy, K = hidden):
        h = act(E + s_g XA_g B_g^T) * (G + s_u XA_u B_u^T)  -> OUT [T, I] (row stride n_cols)
        this column tile's share of h A_d^T                -> XAD_PART[pid_n] [T, R] fp32
    (the caller sums the column tiles' shares: down_proj's adapter input without a GEMM re-reading h).
    GATE, UP: row stride stride_eg; XA as in glu_lora_bwd; BG, BU: [I, rank] row-major; AD: [rank_d, I]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rk = tl.arange(0, R)
    bg_t = _rank_tile_t(BG, cols, n_cols, rank_g, R)  # this program's adapter columns, read once
    bu_t = _rank_tile_t(BU, cols, n_cols, rank_u, R)
    ad_t = tl.trans(_rank_rows(AD, cols, n_cols, rank_d, R))
    row0 = pid_m.to(tl.int64) * rows_per_group
    part = XAD_PART + pid_n.to(tl.int64) * n_rows * R
    for m in range(0, rows_per_group, BLOCK_M):
        rows = row0 + m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        e, g, _, _ = _lora_gate_up(GATE, UP, XA, rows[:, None] * stride_eg + cols[None, :], mask, rows, row_ok,
                                   stride_xa, xa_up_offset, rank_g, rank_u, bg_t, bu_t, scale_g, scale_u, R)
        a, _ = _act_and_grad(e, ACT)
        h = (a * g).to(OUT.dtype.element_ty)
        tl.store(OUT + rows[:, None] * n_cols + cols[None, :], h, mask=mask)
        xad = _mma(h, ad_t, tl.zeros([BLOCK_M, R], tl.float32))
        tl.store(part + rows[:, None] * R + rk[None, :], xad, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_rows", "rows_per_group"])
def glu_lora_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP, XA, DYB, BG, BU, AD, Q_PART,
    n_rows, n_cols, stride_dout, stride_eg, stride_d, stride_xa, xa_up_offset, stride_dyb, rank_g, rank_u, rank_d,
    rows_per_group, scale_g, scale_u,
    ACT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The LoRA MLP's GLU backward, the three adapters' low-rank terms added on the fly (as in
    glu_lora_fwd: E, G are the base GEMMs' outputs and DOUT = dY W_d is down_proj's base dX), with the
    adapter products that reduce over tokens, taken while de, dg and h are in registers (each would
    otherwise be a GEMM re-reading a [T, I] tensor):
        e = E + s_g XA_g B_g^T, g = G + s_u XA_u B_u^T, dh = DOUT + DYB A_d   (DYB = s_d dY B_d)
        de, dg -> DGATE, DUP (row stride stride_d; may alias GATE, UP); h = act(e) * g is never stored;
        s_g de^T XA_g, s_u dg^T XA_u, h^T DYB  [I, R] each -> Q_PART[row group] (summed by the caller).
    XA holds X A_g^T in columns [0, rank_g) and X A_u^T from column xa_up_offset. Ranks are padded to R
    with zeros. The products use the rounded de, dg, h, as a separate GEMM would.
    (The products that reduce over I, de B_g and dg B_u, are glu_lora_dyb's second pass: as dots here
    they would need a partial sum per column tile and spill registers - measured 2x slower on an H100.)"""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    io = DGATE.dtype.element_ty
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rk = tl.arange(0, R)
    bg_t = _rank_tile_t(BG, cols, n_cols, rank_g, R)  # this program's adapter columns, read once
    bu_t = _rank_tile_t(BU, cols, n_cols, rank_u, R)
    ad = _rank_rows(AD, cols, n_cols, rank_d, R)
    qg = tl.zeros([BLOCK_N, R], tl.float32)
    qu = tl.zeros([BLOCK_N, R], tl.float32)
    qd = tl.zeros([BLOCK_N, R], tl.float32)
    row0 = pid_m.to(tl.int64) * rows_per_group
    # rows_per_group is a multiple of BLOCK_M, so the groups never overlap
    for m in range(0, rows_per_group, BLOCK_M):
        rows = row0 + m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride_eg + cols[None, :]
        e, g, xg, xu = _lora_gate_up(GATE, UP, XA, offs, mask, rows, row_ok, stride_xa, xa_up_offset, rank_g,
                                     rank_u, bg_t, bu_t, scale_g, scale_u, R)
        dyb = tl.load(DYB + rows[:, None] * stride_dyb + rk[None, :], mask=row_ok[:, None] & (rk < rank_d)[None, :],
                      other=0.0)
        dh = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = _mma(dyb, ad, dh)
        a, da = _act_and_grad(e, ACT)
        de = (dh * g * da).to(io)
        dg = (dh * a).to(io)
        h = (a * g).to(io)
        d_offs = rows[:, None] * stride_d + cols[None, :]
        tl.store(DGATE + d_offs, de, mask=mask)
        tl.store(DUP + d_offs, dg, mask=mask)
        qg = _mma(tl.trans(de), xg, qg)
        qu = _mma(tl.trans(dg), xu, qu)
        qd = _mma(tl.trans(h), dyb, qd)
    q_offs = (pid_m.to(tl.int64) * n_cols + cols)[:, None] * (3 * R) + rk[None, :]
    tl.store(Q_PART + q_offs, qg * scale_g, mask=col_ok[:, None])
    tl.store(Q_PART + q_offs + R, qu * scale_u, mask=col_ok[:, None])
    tl.store(Q_PART + q_offs + 2 * R, qd, mask=col_ok[:, None])


@triton.jit(do_not_specialize=["n_rows", "rank_g", "rank_u", "stride_out"])
def glu_lora_dyb_kernel(
    DE, DG, BG, BU, OUT, n_rows, n_cols, stride_x, rank_g, rank_u, stride_out, scale_g, scale_u,
    R: tl.constexpr, RB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The LoRA MLP backward's rank-r products that reduce over I: OUT[:, :rank_g] = scale_g DE BG and
    OUT[:, rank_g:rank_g + rank_u] = scale_u DG BU (s_g de B_g and s_u dg B_u), one pass over de and dg.
    Each program owns BLOCK_M whole rows and walks I, so the sums finish in registers (no partials).
    BG, BU: contiguous [I, RB] (RB <= R; columns past RB read as zeros). RB is a constexpr, not the
    runtime rank: a runtime mask along the contiguous dimension would make every B load 2 bytes wide."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rk = tl.arange(0, R)
    acc_g = tl.zeros([BLOCK_M, R], tl.float32)
    acc_u = tl.zeros([BLOCK_M, R], tl.float32)
    for k in range(0, n_cols, BLOCK_N):
        cols = k + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        offs = rows[:, None] * stride_x + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        de = tl.load(DE + offs, mask=mask, other=0.0)
        dg = tl.load(DG + offs, mask=mask, other=0.0)
        b_offs = cols[:, None].to(tl.int64) * RB + rk[None, :]
        b_mask = col_ok[:, None] & (rk < RB)[None, :]
        acc_g = _mma(de, tl.load(BG + b_offs, mask=b_mask, other=0.0), acc_g)
        acc_u = _mma(dg, tl.load(BU + b_offs, mask=b_mask, other=0.0), acc_u)
    out = OUT + rows[:, None] * stride_out + rk[None, :]
    tl.store(out, (acc_g * scale_g).to(OUT.dtype.element_ty), mask=row_ok[:, None] & (rk < rank_g)[None, :])
    tl.store(out + rank_g, (acc_u * scale_u).to(OUT.dtype.element_ty), mask=row_ok[:, None] & (rk < rank_u)[None, :])
