"""The LoRA MLP's GLU kernels: the forward from the base GEMM outputs with the gate/up adapter terms added per
tile, the backward with its token-reduced adapter products (h never stored), and the rank-r products that
reduce over the intermediate size (s_g de B_g | s_u dg B_u). Used by fusedlora.lora's fused MLP path.
"""

import triton
import triton.language as tl

from csrc_triton._math import _act_and_grad, mma


@triton.jit
def _rank_tile(M, cols, col_ok, rk, rank, col_stride, rank_stride):
    # [R, BLOCK_N]: this program's columns of a rank-r factor, zero past the rank; loaded once per program
    # and reused down its rows. B ([I, r] contiguous) is read transposed: col_stride r, rank_stride 1;
    # A ([r, I]): col_stride 1, rank_stride I.
    return tl.load(
        M + cols[None, :].to(tl.int64) * col_stride + rk[:, None].to(tl.int64) * rank_stride,
        mask=col_ok[None, :] & (rk < rank)[:, None],
        other=0.0,
    )


@triton.jit
def _xa_rows(XA, rows, row_ok, rk, stride_xa, xa_up_offset, rank_g, rank_u):
    # X A_g^T and X A_u^T on these rows, [BLOCK_M, R] each, zero past each rank
    xa_rows = XA + rows[:, None] * stride_xa
    xg = tl.load(xa_rows + rk[None, :], mask=row_ok[:, None] & (rk < rank_g)[None, :], other=0.0)
    xu = tl.load(xa_rows + xa_up_offset + rk[None, :], mask=row_ok[:, None] & (rk < rank_u)[None, :], other=0.0)
    return xg, xu


@triton.jit
def _gate_up_with_lora(GATE, UP, offs, mask, xg, xu, bg, bu, scale_g, scale_u):
    # e = X W_g^T + s_g (X A_g^T) B_g^T and g likewise, in fp32: the base GEMM's rounded output plus the
    # rank-r term taken here instead of by widening the GEMM's K (a K of H + 2r runs disproportionately slower
    # than H). The forward and backward kernels share this arithmetic.
    e = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32) + scale_g * mma(
        xg, bg, tl.zeros(mask.shape, tl.float32)
    )
    g = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32) + scale_u * mma(
        xu, bu, tl.zeros(mask.shape, tl.float32)
    )
    return e, g


# The LoRA GLU kernels' row loops name their pipeline depth (tl.range(num_stages=STAGES)) rather than rely on
# the launch's num_stages: left to itself the pipeliner skipped loads whose only consumers are elementwise
# (the forward's e and g: no load was pipelined) or a dot's accumulator (the backward's dh: loaded and waited
# for in every iteration), in triton 3.6 and 3.9 alike. Named, every [BLOCK_M, BLOCK_N] load is an async
# copy STAGES - 1 iterations ahead (timings: docs/perf-notes.md).
@triton.jit(do_not_specialize=["n_rows", "rows_per_group"])
def glu_lora_fwd_kernel(
    GATE,
    UP,
    XA,
    BG,
    BU,
    OUT,
    n_rows,
    n_cols,
    stride_eg,
    stride_xa,
    xa_up_offset,
    rank_g,
    rank_u,
    rows_per_group,
    scale_g,
    scale_u,
    ACT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The LoRA MLP's h = act(e) * g from the base GEMM outputs: GATE, UP = X W_g^T, X W_u^T (one row stride,
    e.g. the halves of one [T, 2I] buffer); e and g get their adapter terms s_g XA_g B_g^T, s_u XA_u B_u^T
    here (XA as in glu_lora_bwd_kernel). OUT [T, I] contiguous. Each program walks one column tile down
    a group of rows (its B tiles loaded once)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rk = tl.arange(0, R)
    bg = _rank_tile(BG, cols, col_ok, rk, rank_g, rank_g, 1)
    bu = _rank_tile(BU, cols, col_ok, rk, rank_u, rank_u, 1)
    row0 = pid_m.to(tl.int64) * rows_per_group
    for m in tl.range(0, rows_per_group, BLOCK_M, num_stages=STAGES):  # (see the note above)
        rows = row0 + m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        xg, xu = _xa_rows(XA, rows, row_ok, rk, stride_xa, xa_up_offset, rank_g, rank_u)
        e, g = _gate_up_with_lora(
            GATE, UP, rows[:, None] * stride_eg + cols[None, :], mask, xg, xu, bg, bu, scale_g, scale_u
        )
        a, _ = _act_and_grad(e, ACT)
        tl.store(OUT + rows[:, None] * n_cols + cols[None, :], (a * g).to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "rows_per_group"])
def glu_lora_bwd_kernel(
    DOUT,
    GATE,
    UP,
    DGATE,
    DUP,
    XA,
    DYB,
    BG,
    BU,
    AD,
    Q_PART,
    n_rows,
    n_cols,
    stride_dh,
    stride_eg,
    stride_xa,
    xa_up_offset,
    stride_dyb,
    rank_g,
    rank_u,
    rank_d,
    rows_per_group,
    scale_g,
    scale_u,
    ACT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The LoRA MLP's GLU backward with the adapter products that reduce over tokens, taken while de, dg
    and h are in registers (each would otherwise be a GEMM re-reading a [T, I] tensor):
        e, g = GATE, UP plus their adapter terms, as glu_lora_fwd_kernel computes them; dh = DOUT + DYB A_d
        (DOUT = dY W_d, DYB = s_d dY B_d: down_proj's rank-r term of dh taken here, not by widening K);
        de, dg -> DGATE, DUP (may alias GATE, UP; all four share row stride stride_eg, DOUT has its
        own); h = act(e) * g is never stored;
        s_g de^T XA_g, s_u dg^T XA_u, h^T DYB  [I, R] each -> Q_PART[row group] (summed by the caller).
    XA holds X A_g^T in columns [0, rank_g) and X A_u^T from column xa_up_offset. Ranks are padded to R
    with zeros. The products use the rounded de, dg, h, as a separate GEMM would.
    (The products that reduce over I, de B_g and dg B_u, are glu_lora_dyb's second pass: as dots here
    they would need a partial sum per column tile and spill registers: slower.)
    With its loads pipelined (the note above) the three adapter terms cost ~nothing over the plain GLU
    backward's traffic."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    io = DGATE.dtype.element_ty
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    rk = tl.arange(0, R)
    bg = _rank_tile(BG, cols, col_ok, rk, rank_g, rank_g, 1)
    bu = _rank_tile(BU, cols, col_ok, rk, rank_u, rank_u, 1)
    ad = _rank_tile(AD, cols, col_ok, rk, rank_d, 1, n_cols)
    qg = tl.zeros([BLOCK_N, R], tl.float32)
    qu = tl.zeros([BLOCK_N, R], tl.float32)
    qd = tl.zeros([BLOCK_N, R], tl.float32)
    row0 = pid_m.to(tl.int64) * rows_per_group
    # rows_per_group is a multiple of BLOCK_M, so the groups never overlap
    for m in tl.range(0, rows_per_group, BLOCK_M, num_stages=STAGES):  # (see the note above)
        rows = row0 + m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride_eg + cols[None, :]
        xg, xu = _xa_rows(XA, rows, row_ok, rk, stride_xa, xa_up_offset, rank_g, rank_u)
        dyb = tl.load(
            DYB + rows[:, None] * stride_dyb + rk[None, :], mask=row_ok[:, None] & (rk < rank_d)[None, :], other=0.0
        )
        dh = tl.load(DOUT + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = mma(dyb, ad, dh)
        e, g = _gate_up_with_lora(GATE, UP, offs, mask, xg, xu, bg, bu, scale_g, scale_u)
        a, da = _act_and_grad(e, ACT)
        de = (dh * g * da).to(io)
        dg = (dh * a).to(io)
        h = (a * g).to(io)
        tl.store(DGATE + offs, de, mask=mask)
        tl.store(DUP + offs, dg, mask=mask)
        qg = mma(tl.trans(de), xg, qg)
        qu = mma(tl.trans(dg), xu, qu)
        qd = mma(tl.trans(h), dyb, qd)
    q_offs = (pid_m.to(tl.int64) * n_cols + cols)[:, None] * (3 * R) + rk[None, :]
    tl.store(Q_PART + q_offs, qg * scale_g, mask=col_ok[:, None])
    tl.store(Q_PART + q_offs + R, qu * scale_u, mask=col_ok[:, None])
    tl.store(Q_PART + q_offs + 2 * R, qd, mask=col_ok[:, None])


@triton.jit(do_not_specialize=["n_rows", "rank_g", "rank_u", "stride_out"])
def glu_lora_dyb_kernel(
    DE,
    DG,
    BG,
    BU,
    OUT,
    n_rows,
    n_cols,
    stride_x,
    rank_g,
    rank_u,
    stride_out,
    scale_g,
    scale_u,
    R: tl.constexpr,
    RB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        acc_g = mma(de, tl.load(BG + b_offs, mask=b_mask, other=0.0), acc_g)
        acc_u = mma(dg, tl.load(BU + b_offs, mask=b_mask, other=0.0), acc_u)
    out = OUT + rows[:, None] * stride_out + rk[None, :]
    tl.store(out, (acc_g * scale_g).to(OUT.dtype.element_ty), mask=row_ok[:, None] & (rk < rank_g)[None, :])
    tl.store(out + rank_g, (acc_u * scale_u).to(OUT.dtype.element_ty), mask=row_ok[:, None] & (rk < rank_u)[None, :])
