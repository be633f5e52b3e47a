"""Triton GEMMs weighed against cuBLAS (build_tools/tune.py triton_gemm, gemm_glu): the question behind them
is whether a Triton GEMM carrying the LoRA MLP's GLU work in its epilogue could cost less energy than cuBLAS
plus a separate GLU pass. Measurement tools, not library kernels: on an H100 (triton 3.6) the answer was no
(BENCHMARKS.md, "Where the NF4 MLP step goes").
- gemm_abt_ptr / gemm_abt_tma: plain C = A B^T (A [M, K], B [N, K], row-major);
- gemm_glu_lora_fwd_kernel: the LoRA MLP's gate/up GEMM with glu_lora_fwd_kernel's work as its epilogue."""

import torch
import triton
import triton.language as tl

from csrc_triton._math import _act_and_grad, mma
from csrc_triton.glu_lora.kernel import _rank_tile, _xa_rows


@triton.jit
def _grouped_tile(tile, npm, npn, GROUP_M: tl.constexpr):
    # (row tile, column tile) of output tile `tile` in grouped order: GROUP_M row tiles walk the column tiles
    # together, so their operands stay in L2
    width = GROUP_M * npn
    first = (tile // width) * GROUP_M
    rows = min(npm - first, GROUP_M)
    return first + (tile % width) % rows, (tile % width) // rows


@triton.jit
def gemm_abt_ptr(
    A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr
):
    """One program per output tile, pointer loads (cp.async); M, N, K multiples of the block sizes."""
    pm, pn = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = A + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = B + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros([BM, BN], tl.float32)
    for _ in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(tl.load(a), tl.load(b), acc)
        a += BK
        b += BK
    tl.store(C + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def gemm_abt_tma(
    a_desc,
    b_desc,
    c_desc,
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """Persistent (one program per SM walking tiles), host-side TMA descriptors."""
    npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), npm * npn, NUM_SMS):
        pm, pn = _grouped_tile(tile, npm, npn, GROUP_M)
        acc = tl.zeros([BM, BN], tl.float32)
        for k in tl.range(0, K, BK, num_stages=STAGES):
            acc = tl.dot(a_desc.load([pm * BM, k]), b_desc.load([pn * BN, k]).T, acc)
        c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


@triton.jit(do_not_specialize=["n_rows"])
def gemm_glu_lora_fwd_kernel(
    X,
    WG,
    WU,
    XA,
    BG,
    BU,
    E,
    G,
    OUT,
    n_rows,
    n_cols,
    n_in,
    stride_x,
    stride_w,
    stride_eg,
    stride_xa,
    xa_up_offset,
    rank_g,
    rank_u,
    scale_g,
    scale_u,
    ACT: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STAGES: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """e = X W_g^T + s_g XA_g B_g^T -> E, g = X W_u^T + s_u XA_u B_u^T -> G (rounded once from fp32; E and G
    share row stride stride_eg, e.g. the halves of one [T, 2I] buffer) and h = act(e) * g -> OUT ([T, I]
    contiguous, from the rounded e and g). X [T, H], WG and WU [I, H] (row stride stride_w), unit last
    strides, 16-byte aligned rows (TMA descriptors made on the device: Triton's global scratch, so the JIT
    needs triton.set_allocator); XA, BG, BU as in csrc_triton.glu_lora.kernel.glu_lora_fwd_kernel. Persistent: program p
    takes output tiles p, p + P, ... in grouped order; a tile holds BLOCK_N columns of both e and g (two
    accumulators), so its epilogue has what h needs. The adapter terms are one more K step of R:
    acc += XA (s B)^T (s B rounded to the operand type). FLATTEN pipelines across tiles (measured slower)."""
    io = E.dtype.element_ty
    x_desc = tl.make_tensor_descriptor(X, [n_rows, n_in], [stride_x, 1], [BLOCK_M, BLOCK_K])
    wg_desc = tl.make_tensor_descriptor(WG, [n_cols, n_in], [stride_w, 1], [BLOCK_N, BLOCK_K])
    wu_desc = tl.make_tensor_descriptor(WU, [n_cols, n_in], [stride_w, 1], [BLOCK_N, BLOCK_K])
    e_desc = tl.make_tensor_descriptor(E, [n_rows, n_cols], [stride_eg, 1], [BLOCK_M, BLOCK_N])
    g_desc = tl.make_tensor_descriptor(G, [n_rows, n_cols], [stride_eg, 1], [BLOCK_M, BLOCK_N])
    h_desc = tl.make_tensor_descriptor(OUT, [n_rows, n_cols], [n_cols, 1], [BLOCK_M, BLOCK_N])
    rk = tl.arange(0, R)
    tiles_m, tiles_n = tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=FLATTEN):
        pm, pn = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        row0, col0 = pm * BLOCK_M, pn * BLOCK_N
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in tl.range(0, n_in, BLOCK_K, num_stages=STAGES):
            x = x_desc.load([row0, k])
            acc_g = tl.dot(x, wg_desc.load([col0, k]).T, acc_g)
            acc_u = tl.dot(x, wu_desc.load([col0, k]).T, acc_u)
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        xg, xu = _xa_rows(XA, rows, rows < n_rows, rk, stride_xa, xa_up_offset, rank_g, rank_u)
        bg = _rank_tile(BG, cols, col_ok, rk, rank_g, rank_g, 1)
        bu = _rank_tile(BU, cols, col_ok, rk, rank_u, rank_u, 1)
        e = mma(xg, (bg * scale_g).to(xg.dtype), acc_g).to(io)
        g = mma(xu, (bu * scale_u).to(xu.dtype), acc_u).to(io)
        e_desc.store([row0, col0], e)
        g_desc.store([row0, col0], g)
        a, _ = _act_and_grad(e.to(tl.float32), ACT)
        h_desc.store([row0, col0], (a * g.to(tl.float32)).to(io))


def use_torch_scratch():
    """Give Triton torch's caching allocator for global scratch (gemm_glu_lora_fwd_kernel's device-side TMA
    descriptors live there; the JIT asks triton's allocator for it at launch)."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def gemm_glu_lora_fwd(
    x,
    w_gate,
    w_up,
    xa,
    rank,
    b_gate,
    b_up,
    scales,
    out,
    h,
    act=0,
    programs=4,
    warps=8,
    tile=(128, 128, 64, 8, 3),
    flatten=0,
):
    """Launch gemm_glu_lora_fwd_kernel (no checks: a measurement tool). xa = [X A_g^T | X A_u^T], both of
    `rank` (padded to R >= 16 for the dots); out = (E, G) views with one row stride; h [T, I] contiguous."""
    bm, bn, bk, group_m, stages = tile
    T, H = x.shape
    I = w_gate.shape[0]
    gemm_glu_lora_fwd_kernel[(programs,)](
        x,
        w_gate,
        w_up,
        xa,
        b_gate,
        b_up,
        out[0],
        out[1],
        h,
        T,
        I,
        H,
        x.stride(0),
        w_gate.stride(0),
        out[0].stride(0),
        xa.stride(0),
        rank,
        rank,
        rank,
        float(scales[0]),
        float(scales[1]),
        ACT=act,
        R=max(16, triton.next_power_of_2(rank)),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=group_m,
        STAGES=stages,
        FLATTEN=flatten,
        num_warps=warps,
        num_stages=1,
    )


def naive_gemm_glu_lora_fwd(x, w_gate, w_up, xa_g, xa_u, b_gate, b_up, scales):
    """float64 reference of gemm_glu_lora_fwd_kernel with ACT = SiLU: (e, g, h)."""
    d = torch.float64
    e = x.to(d) @ w_gate.to(d).t() + scales[0] * xa_g.to(d) @ b_gate.to(d).t()
    g = x.to(d) @ w_up.to(d).t() + scales[1] * xa_u.to(d) @ b_up.to(d).t()
    return e, g, torch.nn.functional.silu(e) * g
