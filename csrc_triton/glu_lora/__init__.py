"""glu_lora: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from csrc_triton.glu import GLU_ACTS
from fusedlora.kernel_spec import KernelSpec, next_pow2, register

# The LoRA MLP's GLU backward with its token-reduced adapter products: tiles of BLOCK_M rows x BLOCK_N
# columns; each program walks one column tile down a group of rows, its loads pipelined STAGES deep.
# Tuned on an H100 (build_tools/tune.py glu_lora; docs/perf-notes.md).
GLU_LORA_TILE = (16, 128, 4, 3)  # BLOCK_M, BLOCK_N, warps, stages
GLU_LORA_PROGRAMS_PER_SM = 2  # both LoRA GLU kernels' grids (ops.glu.row_groups); best for each on an H100
GLU_LORA_RANKS = (8, 16, 32, 64)


def glu_lora_rank_pad(rank: int) -> int:
    return max(16, next_pow2(rank))  # tl.dot needs every dimension >= 16


def _glu_lora_tile_meta(tile, act: str, rank: int) -> dict:
    bm, bn, _, stages = tile
    r = glu_lora_rank_pad(rank)
    # [BLOCK_N, R] tiles held per program (the backward's three fp32 accumulators, both kernels' B / A
    # tiles): narrower column tiles past r = 64 keep them in registers (sm_90 build of the backward: 200
    # registers at r 64 / 64 columns, 240 at r 128 / 32 columns, no spills)
    return {"ACT": GLU_ACTS[act], "R": r, "BLOCK_M": bm, "BLOCK_N": max(16, min(bn, 4096 // r)), "STAGES": stages}


def glu_lora_bwd_meta(act: str, rank: int) -> dict:
    return _glu_lora_tile_meta(GLU_LORA_TILE, act, rank)


def _glu_lora_variants(family, backward: bool):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for act in GLU_ACTS:
            for r in GLU_LORA_RANKS:  # one rank for gate, up and down, XA = [X A_g^T, X A_u^T]
                down = {"rank_d": r} if backward else {}  # (stride_dh, stride_eg: 16-divisible, the default)
                ints = {"rank_g": r, "rank_u": r, **down, "stride_xa": 2 * r, "xa_up_offset": r}
                yield {"x": dt}, {"act": act, "rank": r}, {**ints, "stride_dyb": r} if backward else ints


def _glu_lora_aot(family):
    return _glu_lora_variants(family, backward=True)


GLU_LORA_BWD = register(
    KernelSpec(
        name="glu_lora_bwd",
        module="csrc_triton.glu_lora.kernel",
        function="glu_lora_bwd_kernel",
        pointer_types={
            "DOUT": "x",
            "GATE": "x",
            "UP": "x",
            "DGATE": "x",
            "DUP": "x",
            "XA": "x",
            "DYB": "x",
            "BG": "x",
            "BU": "x",
            "AD": "x",
            "Q_PART": "fp32",
        },
        float_args=("scale_g", "scale_u"),
        meta=glu_lora_bwd_meta,
        config=lambda arch, c: GLU_LORA_TILE[2:],
        aot_variants=_glu_lora_aot,
        doc="LoRA MLP backward: GLU gradients (adapter terms of e, g, dh added) plus the s de^T XA and h^T dY B "
        "partial sums, h never stored",
        check="fusedlora.ops.glu_lora:selfcheck",
    )
)


# The LoRA MLP's GLU forward from the base GEMM outputs, the gate/up adapter terms added per tile.
# Tuned on an H100 (build_tools/tune.py glu_lora_fwd; docs/perf-notes.md).
GLU_LORA_FWD_TILE = (32, 64, 4, 4)  # BLOCK_M, BLOCK_N, warps, stages


def glu_lora_fwd_meta(act: str, rank: int) -> dict:
    return _glu_lora_tile_meta(GLU_LORA_FWD_TILE, act, rank)


def _glu_lora_fwd_aot(family):
    return _glu_lora_variants(family, backward=False)


GLU_LORA_FWD = register(
    KernelSpec(
        name="glu_lora_fwd",
        module="csrc_triton.glu_lora.kernel",
        function="glu_lora_fwd_kernel",
        pointer_types={"GATE": "x", "UP": "x", "XA": "x", "BG": "x", "BU": "x", "OUT": "x"},
        float_args=("scale_g", "scale_u"),
        meta=glu_lora_fwd_meta,
        config=lambda arch, c: GLU_LORA_FWD_TILE[2:],
        aot_variants=_glu_lora_fwd_aot,
        doc="LoRA MLP forward: act(e) * g with the gate/up adapter terms added to the base GEMM outputs",
        check="fusedlora.ops.glu_lora:selfcheck",
    )
)


# The LoRA MLP backward's rank-r products that reduce over I (s_g de B_g | s_u dg B_u): one program per
# BLOCK_M whole rows walking I in BLOCK_N columns. Tuned on an H100 (build_tools/tune.py glu_lora_dyb).
GLU_LORA_DYB_TILE = (32, 128, 4, 3)  # BLOCK_M, BLOCK_N, warps, stages


def glu_lora_dyb_meta(rank: int) -> dict:
    """rank: the widest of B_g, B_u. RB, the B width the kernel reads, is the rank itself when it is a power
    of two (r = 8, PEFT's default, needs no padded copy of B) and R otherwise (the caller pads)."""
    bm, bn, _, _ = GLU_LORA_DYB_TILE
    r = glu_lora_rank_pad(rank)
    rb = rank if rank & (rank - 1) == 0 else r
    # two [BLOCK_N, R] B tiles per step: narrower column steps for wide ranks
    return {"R": r, "RB": rb, "BLOCK_M": bm, "BLOCK_N": max(16, min(bn, 4096 // r))}


def _glu_lora_dyb_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for r in GLU_LORA_RANKS:
            yield {"x": dt}, {"rank": r}


GLU_LORA_DYB = register(
    KernelSpec(
        name="glu_lora_dyb",
        module="csrc_triton.glu_lora.kernel",
        function="glu_lora_dyb_kernel",
        pointer_types={"DE": "x", "DG": "x", "BG": "x", "BU": "x", "OUT": "x"},
        float_args=("scale_g", "scale_u"),
        meta=glu_lora_dyb_meta,
        config=lambda arch, c: GLU_LORA_DYB_TILE[2:],
        aot_variants=_glu_lora_dyb_aot,
        doc="LoRA MLP backward: [s_g de B_g | s_u dg B_u], the rank-r products reducing over I",
        check="fusedlora.ops.glu_lora:selfcheck",
    )
)
