"""quant: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, register

NF4_BLOCK = 8192  # outputs per program (tune.py nf4 on an H100: docs/perf-notes.md)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def nf4_meta(blocksize: int, nested: bool, blocksize2: int = 256, row_len: int = 0) -> dict:
    """row_len > 0: the row-strided output (rows of row_len into a wider buffer); programs then cover the
    largest power of two that divides the row (<= NF4_BLOCK), so none straddles a row or needs a mask."""
    block = NF4_BLOCK if row_len <= 0 else max(int(blocksize), min(NF4_BLOCK, row_len & -row_len))
    return {
        "BLOCKSIZE": int(blocksize),
        "BLOCKSIZE2": int(blocksize2),
        "NESTED": int(bool(nested)),
        "BLOCK": block,
        "STRIDED": int(row_len > 0),
    }


def _nf4_aot(family):
    for dt in list(family.get("dtypes", ("bf16", "fp16"))) + ["fp32"]:
        for blocksize in (64, 128, 256):
            for nested in (False, True):
                yield (
                    {"x": dt, "absmax": "u8" if nested else "fp32"},
                    {"blocksize": blocksize, "nested": nested},
                    {"row_len": 0, "out_row_stride": 0},
                )
    # row-strided: a gate/up weight [I, H] into the [W | s B] buffer of the LoRA MLP (bitsandbytes' default
    # blocksize 64, fp16/bf16)
    blocks = {}
    for h in family.get("hidden_sizes", ()):
        blocks.setdefault(nf4_meta(64, False, row_len=h)["BLOCK"], h)
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for h in blocks.values():
            for nested in (False, True):
                yield (
                    {"x": dt, "absmax": "u8" if nested else "fp32"},
                    {"blocksize": 64, "nested": nested, "row_len": h},
                )


NF4_DEQUANT = register(
    KernelSpec(
        name="nf4_dequant",
        module="csrc_triton.quant.kernel",
        function="nf4_dequant_kernel",
        pointer_types={
            "PACKED": "u8",
            "ABSMAX": "absmax",
            "ABSMAX2": "fp32",
            "CODE": "fp32",
            "CODE2": "fp32",
            "OFFSET": "fp32",
            "OUT": "x",
        },
        meta=nf4_meta,
        config=lambda arch, c: (2, 1),
        aot_variants=_nf4_aot,
        doc="bitsandbytes NF4/FP4 dequantisation incl. the nested absmax, one launch",
        check="fusedlora.quant:selfcheck",
    )
)

# tiles per output layout ([out, in], [in, out]), tuned on an H100 (docs/perf-notes.md)
GPTQ_TILES = {False: (64, 32, 2), True: (32, 128, 4)}


def gptq_meta(bits: int, has_g_idx: bool, transpose: bool = False) -> dict:
    bi, bo, _ = GPTQ_TILES[bool(transpose)]
    return {"BITS": int(bits), "HAS_GIDX": int(bool(has_g_idx)), "BLOCK_I": bi, "BLOCK_O": bo}


def _gptq_warps(c: dict) -> int:
    return 2 if (c["BLOCK_I"], c["BLOCK_O"]) == GPTQ_TILES[False][:2] else 4


def _gptq_aot(family):
    for dt in ("fp16", "bf16"):
        for bits in (4, 8, 2):
            for g in (False, True):
                yield ({"x": dt, "s": "fp16", "gidx": "i32"}, {"bits": bits, "has_g_idx": g}, {"out_stride_i": 1})


GPTQ_DEQUANT = register(
    KernelSpec(
        name="gptq_dequant",
        module="csrc_triton.quant.kernel",
        function="gptq_dequant_kernel",
        pointer_types={"QW": "i32", "QZ": "i32", "SCALES": "s", "G_IDX": "gidx", "OUT": "x"},
        meta=gptq_meta,
        config=lambda arch, c: (_gptq_warps(c), 1),
        aot_variants=_gptq_aot,
        doc="GPTQ (auto-gptq / gptqmodel) 2/4/8-bit dequantisation with act-order g_idx",
        check="fusedlora.quant:selfcheck",
    )
)
