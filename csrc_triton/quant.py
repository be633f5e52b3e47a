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
def _code_lookup(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """code[nib] for a 4-bit index, as a select tree over 16 registers (no memory gathers)."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    l0 = tl.where(b0, c1, c0)
    l1 = tl.where(b0, c3, c2)
    l2 = tl.where(b0, c5, c4)
    l3 = tl.where(b0, c7, c6)
    l4 = tl.where(b0, c9, c8)
    l5 = tl.where(b0, c11, c10)
    l6 = tl.where(b0, c13, c12)
    l7 = tl.where(b0, c15, c14)
    m0 = tl.where(b1, l1, l0)
    m1 = tl.where(b1, l3, l2)
    m2 = tl.where(b1, l5, l4)
    m3 = tl.where(b1, l7, l6)
    n0 = tl.where(b2, m1, m0)
    n1 = tl.where(b2, m3, m2)
    return tl.where((nib & 8) != 0, n1, n0)


@triton.jit
def _nf4_store_program(PACKED, OUT, am, pid, n_elements, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13,
                       c14, c15, NB: tl.constexpr, HB: tl.constexpr, MASKED: tl.constexpr):
    # Each byte is loaded once, its nibbles split and interleaved back (an output-order variant that
    # loads each byte from two lanes measured slower on the H100). Only the last program is MASKED: a
    # mask against a runtime length keeps Triton from vectorising, which made every store 2 bytes wide.
    PB: tl.constexpr = NB * HB * 2
    byte = pid * (PB // 2) + (tl.arange(0, NB) * HB)[:, None] + tl.arange(0, HB)[None, :]
    offs = pid * PB + tl.arange(0, PB)
    if MASKED:
        b = tl.load(PACKED + byte, mask=byte < (n_elements + 1) // 2, other=0).to(tl.int32)
    else:
        b = tl.load(PACKED + byte).to(tl.int32)
    hi = _code_lookup(b >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15) * am[:, None]
    lo = _code_lookup(b & 15, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15) * am[:, None]
    vals = tl.reshape(tl.interleave(hi, lo), [PB]).to(OUT.dtype.element_ty)
    if MASKED:
        tl.store(OUT + offs, vals, mask=offs < n_elements)
    else:
        tl.store(OUT + offs, vals)


@triton.jit(do_not_specialize=["n_elements"])
def nf4_dequant_kernel(PACKED, ABSMAX, ABSMAX2, CODE, CODE2, OFFSET, OUT, n_elements,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK: tl.constexpr):
    # A program covers BLOCK outputs = NB quantisation blocks of BLOCKSIZE: absmax is loaded once per
    # block and the 16 code values once per program, so the inner work has no gathers.
    HB: tl.constexpr = BLOCKSIZE // 2
    NB: tl.constexpr = BLOCK // BLOCKSIZE if BLOCK >= BLOCKSIZE else 1
    PB: tl.constexpr = NB * BLOCKSIZE  # outputs per program
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)
    n_blocks = (n_elements + BLOCKSIZE - 1) // BLOCKSIZE
    blk_ok = blk < n_blocks
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=blk_ok, other=0).to(tl.int32)
        am = tl.load(CODE2 + a8, mask=blk_ok, other=0.0) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
        am = am + tl.load(OFFSET)
    else:
        am = tl.load(ABSMAX + blk, mask=blk_ok, other=0.0)
    c0 = tl.load(CODE + 0)
    c1 = tl.load(CODE + 1)
    c2 = tl.load(CODE + 2)
    c3 = tl.load(CODE + 3)
    c4 = tl.load(CODE + 4)
    c5 = tl.load(CODE + 5)
    c6 = tl.load(CODE + 6)
    c7 = tl.load(CODE + 7)
    c8 = tl.load(CODE + 8)
    c9 = tl.load(CODE + 9)
    c10 = tl.load(CODE + 10)
    c11 = tl.load(CODE + 11)
    c12 = tl.load(CODE + 12)
    c13 = tl.load(CODE + 13)
    c14 = tl.load(CODE + 14)
    c15 = tl.load(CODE + 15)
    if (pid + 1) * PB <= n_elements:
        _nf4_store_program(PACKED, OUT, am, pid, n_elements, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11,
                           c12, c13, c14, c15, NB, HB, False)
    else:
        _nf4_store_program(PACKED, OUT, am, pid, n_elements, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11,
                           c12, c13, c14, c15, NB, HB, True)


@triton.jit(do_not_specialize=["zero_offset"])
def gptq_dequant_kernel(QW, QZ, SCALES, G_IDX, OUT,
                        in_features, out_features, group_size, qw_stride, qz_stride, s_stride,
                        out_stride_o, out_stride_i, zero_offset,
                        BITS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
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
