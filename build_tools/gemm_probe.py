"""A plain Triton GEMM C = A B^T (A [M, K], B [N, K], row-major bf16) to weigh against cuBLAS: the question
behind it is whether a Triton GEMM carrying the LoRA MLP's GLU work in its epilogue could cost less energy
than cuBLAS plus a separate GLU pass (build_tools/tune.py triton_gemm). Measurement tool, not a library
kernel."""
import triton
import triton.language as tl

from csrc_triton._math import grouped_tile as _grouped_tile


@triton.jit
def gemm_abt_ptr(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, STAGES: tl.constexpr):
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
def gemm_abt_tma(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_SMS: tl.constexpr):
    """Persistent (one program per SM walking tiles), host-side TMA descriptors."""
    npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), npm * npn, NUM_SMS):
        pm, pn = _grouped_tile(tile, npm, npn, GROUP_M)
        acc = tl.zeros([BM, BN], tl.float32)
        for k in tl.range(0, K, BK, num_stages=STAGES):
            acc = tl.dot(a_desc.load([pm * BM, k]), b_desc.load([pn * BN, k]).T, acc)
        c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))
