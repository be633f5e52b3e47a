"""The bitsandbytes NF4 / FP4 dequantisation launch (csrc_triton/quant's kernel), shared by the base-weight
path (`fusedlora.quant.dequantize_nf4`, which checks and plans a quant state) and the MoE experts, which
dequantise a stack a chunk of experts at a time: flat element ranges of one packed tensor."""

from __future__ import annotations

from csrc_triton.quant import NF4_DEQUANT

from ..loader import launch


def nf4_launch(data, absmax, absmax2, code, code2, offset, out, n, blocksize, nested, blocksize2=256):
    """Dequantise the first n elements of `data` (uint8 bytes, two codes each, high nibble first) into `out`:
    contiguous (n elements), or a 2-D block of rows of a wider buffer (unit column stride, rows a whole
    number of quantisation blocks long). absmax per `blocksize` elements; nested: absmax is uint8 and
    absmax2 / code2 / offset its second level (per `blocksize2` blocks); else those three are never read."""
    strided = not out.is_contiguous()
    row_len = out.shape[1] if strided else 0
    shape = dict(blocksize=blocksize, nested=bool(nested), blocksize2=blocksize2, row_len=row_len)
    meta = NF4_DEQUANT.constexprs(**shape)
    if strided:
        grid = (row_len // meta["BLOCK"], out.shape[0], 1)
    else:
        grid = (-(-n // max(meta["BLOCK"], blocksize)), 1, 1)  # a program covers whole quantisation blocks
    launch(
        NF4_DEQUANT,
        grid,
        (data, absmax, absmax2, code, code2, offset, out, n, row_len, out.stride(0) if strided else 0),
        **shape,
    )
    return out


def nf4_range_alignment(blocksize: int, nested: bool, blocksize2: int = 256) -> int:
    """The element offsets where nf4_range may start: whole (second-level, when nested) quantisation blocks."""
    return blocksize * blocksize2 if nested else blocksize


def nf4_range(data, absmax, absmax2, code, code2, offset, first, count, out, blocksize, nested, blocksize2=256):
    """Elements [first, first + count) of a packed tensor into the contiguous `out` (count elements, or more:
    the rest is left as it was); `first` a multiple of nf4_range_alignment. The kernel starts at its
    arguments' first element, so the packed bytes and the absmax levels are handed over as views that
    start at `first`'s blocks."""
    align = nf4_range_alignment(blocksize, nested, blocksize2)
    if first % align:
        raise ValueError(f"nf4_range: first {first} is not a multiple of {align} (whole quantisation blocks)")
    if out.dim() != 1 or not out.is_contiguous() or out.numel() < count:
        raise ValueError(f"nf4_range: out must be a contiguous 1-D buffer of at least {count} elements")
    blk = first // blocksize
    data = data[first // 2 :]
    absmax = absmax[blk:]
    if nested:
        absmax2 = absmax2[blk // blocksize2 :]
    return nf4_launch(data, absmax, absmax2, code, code2, offset, out[:count], count, blocksize, nested, blocksize2)
