"""Dequantisation of 4-bit base weights in one kernel each.

NF4 / FP4 (bitsandbytes): two codes per byte (high nibble first), absmax per `BLOCKSIZE` elements; with
double quantisation (NESTED) absmax itself is 8-bit: absmax = code2[a8] * absmax2[blk // 256] + offset,
computed here in the same kernel (bitsandbytes needs three launches and an fp32 buffer for it). The
fp32 products and sums are rounded exactly as bitsandbytes does (no FMA contraction: see
COMPILE_OPTIONS), so the output is bit-identical.

GPTQ (auto-gptq / gptqmodel QuantLinear): qweight int32 [in / (32 / BITS), out] packs input channels;
qzeros int32 [groups, out / (32 / BITS)] packs output channels; w = (q - (z + zero_offset)) * scale
with the group g_idx[i] (act-order) or i // group_size. The output layout is given by strides.
"""

import triton
import triton.language as tl

# Per-kernel compile options, applied by both the JIT path and the AOT build.
COMPILE_OPTIONS = {"nf4_dequant_kernel": {"enable_fp_fusion": False}}


@triton.jit
def _nf4_program(PACKED, OUT_AT, code, am, first, limit, NB: tl.constexpr, HB: tl.constexpr, MASKED: tl.constexpr):
    # Outputs first .. first + PB - 1 (flat weight order) go to OUT_AT[0 .. PB - 1]. Each byte is loaded
    # once; both nibbles index the 16-entry code table with tl.gather (a shared memory read per element: a
    # register select tree cost ~20 instructions per element and left the kernel ALU-bound), and are
    # interleaved back in output order. Only the last program is MASKED: a mask against a runtime length
    # keeps Triton from vectorising (2-byte stores everywhere).
    PB: tl.constexpr = NB * HB * 2
    byte = first // 2 + tl.arange(0, PB // 2)
    k = tl.arange(0, PB)
    if MASKED:
        b = tl.load(PACKED + byte, mask=byte < (limit + 1) // 2, other=0).to(tl.int32)
    else:
        b = tl.load(PACKED + byte).to(tl.int32)
    hi = tl.reshape(tl.gather(code, b >> 4, 0), [NB, HB]) * am[:, None]
    lo = tl.reshape(tl.gather(code, b & 15, 0), [NB, HB]) * am[:, None]
    vals = tl.reshape(tl.interleave(hi, lo), [PB]).to(OUT_AT.dtype.element_ty)
    if MASKED:
        tl.store(OUT_AT + k, vals, mask=first + k < limit)
    else:
        tl.store(OUT_AT + k, vals)


@triton.jit(do_not_specialize=["n_elements"])
def nf4_dequant_kernel(
    PACKED,
    ABSMAX,
    ABSMAX2,
    CODE,
    CODE2,
    OFFSET,
    OUT,
    n_elements,
    row_len,
    out_row_stride,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
    STRIDED: tl.constexpr,
):
    # A program covers BLOCK outputs = NB quantisation blocks of BLOCKSIZE: absmax is loaded once per
    # block and the code table once per program. STRIDED: OUT is the [rows, row_len] left block of a wider
    # buffer (row stride out_row_stride, e.g. [W | s B] for a LoRA GEMM); program (c, row) covers outputs
    # c * BLOCK .. of one row, and BLOCK divides row_len, so no program is masked.
    HB: tl.constexpr = BLOCKSIZE // 2
    NB: tl.constexpr = BLOCK // BLOCKSIZE if BLOCK >= BLOCKSIZE else 1
    PB: tl.constexpr = NB * BLOCKSIZE  # outputs per program
    if STRIDED:
        c = tl.program_id(0).to(tl.int64) * PB
        row = tl.program_id(1).to(tl.int64)
        first = row * row_len + c
        out_at = OUT + (row * out_row_stride + c)
    else:
        first = tl.program_id(0).to(tl.int64) * PB
        out_at = OUT + first
    blk = first // BLOCKSIZE + tl.arange(0, NB)
    n_blocks = (n_elements + BLOCKSIZE - 1) // BLOCKSIZE
    blk_ok = blk < n_blocks
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=blk_ok, other=0).to(tl.int32)
        am = tl.load(CODE2 + a8, mask=blk_ok, other=0.0) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
        am = am + tl.load(OFFSET)
    else:
        am = tl.load(ABSMAX + blk, mask=blk_ok, other=0.0)
    code = tl.load(CODE + tl.arange(0, 16))
    if STRIDED or first + PB <= n_elements:
        _nf4_program(PACKED, out_at, code, am, first, n_elements, NB, HB, False)
    else:
        _nf4_program(PACKED, out_at, code, am, first, n_elements, NB, HB, True)


@triton.jit(do_not_specialize=["zero_offset"])
def gptq_dequant_kernel(
    QW,
    QZ,
    SCALES,
    G_IDX,
    OUT,
    in_features,
    out_features,
    group_size,
    qw_stride,
    qz_stride,
    s_stride,
    out_stride_o,
    out_stride_i,
    zero_offset,
    BITS: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    im = i < in_features
    om = o < out_features
    m = im[:, None] & om[None, :]
    q = tl.load(QW + (i // PER)[:, None].to(tl.int64) * qw_stride + o[None, :], mask=m, other=0)
    q = (q >> ((i % PER) * BITS)[:, None]) & MASK
    if HAS_GIDX:
        g = tl.load(G_IDX + i, mask=im, other=0)
    else:
        g = i // group_size
    z = tl.load(QZ + g[:, None].to(tl.int64) * qz_stride + (o // PER)[None, :], mask=m, other=0)
    z = ((z >> ((o % PER) * BITS)[None, :]) & MASK) + zero_offset
    s = tl.load(SCALES + g[:, None].to(tl.int64) * s_stride + o[None, :], mask=m, other=0.0).to(tl.float32)
    w = (q - z).to(tl.float32) * s
    dst = OUT + o[None, :].to(tl.int64) * out_stride_o + i[:, None].to(tl.int64) * out_stride_i
    tl.store(dst, w.to(OUT.dtype.element_ty), mask=m)
