"""moe_lora: the registry entries of the routed-experts kernels in kernel.py (pointer dtype roles, constexprs
per shape, launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin
path never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use.

Tiles are fixed per kernel (build_tools/tune.py moe sweeps them); the rows of an M-tile belong to one expert,
BM (block_m) is chosen by the op and shared by every kernel of a call. The GEMM kernels read bf16/fp16 expert
stacks only: the op dequantises NF4 stacks a chunk of experts at a time (csrc_triton/quant's kernel)."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, next_pow2, register

MOE_ACTS = {"silu": 0, "gptoss": 1}
MOE_BLOCK_M = 64  # rows per M-tile on a GPU
# (BN, BK, warps, stages) per GEMM kernel; BN runs over the kernel's output columns
MOE_TILES = {
    "moe_gate_up_fwd": (64, 64, 4, 3),  # two [BM, BN] accumulators (gate, up)
    "moe_down_fwd": (128, 64, 8, 3),
    "moe_down_bwd": (64, 64, 4, 3),
    "moe_gate_up_bwd_dx": (128, 64, 8, 3),
}
MOE_SEG_TILE = (64, 128, 4, 2)  # BM, BN, warps, stages of the LoRA-gradient kernel
MOE_GLU_ROWS_TILE = (32, 128, 4, 1)  # BM, BN, warps, stages of the hybrid path's GLU kernels (elementwise)
MOE_COMBINE_TILE = (16, 256, 4, 1)  # BT (tokens), BN, warps, stages of the hybrid path's gather-and-sum


def moe_rank_pad(rank: int) -> int:
    return max(16, next_pow2(rank))  # tl.dot needs every dimension >= 16


def moe_gemm_meta(
    kernel: str,
    act: str = "silu",
    transposed: bool = False,
    has_bias: bool = False,
    rank: int = 0,
    block_m: int = MOE_BLOCK_M,
) -> dict:
    """The constexprs of one of the four GEMM kernels (each takes those of its arguments it has)."""
    bn, bk, _, _ = MOE_TILES[kernel]
    meta = {
        "TRANS": int(bool(transposed)),
        "HAS_LORA": int(rank > 0),
        "RP": moe_rank_pad(rank),
        "BM": int(block_m),
        "BN": bn,
        "BK": bk,
    }
    if kernel in ("moe_gate_up_fwd", "moe_down_bwd"):
        meta["ACT"] = MOE_ACTS[act]
    if kernel != "moe_gate_up_bwd_dx":
        meta["HAS_BIAS"] = int(bool(has_bias))
    return meta


def moe_seg_meta(rank: int, gather: bool, row_scale: bool) -> dict:
    bm, bn, _, _ = MOE_SEG_TILE
    return {
        "GATHER": int(bool(gather)),
        "ROW_SCALE": int(bool(row_scale)),
        "RP": moe_rank_pad(rank),
        "BM": bm,
        "BN": bn,
    }


def moe_glu_rows_meta(act: str = "silu", rank: int = 0) -> dict:
    """The constexprs of the hybrid path's GLU forward or backward; rank > 0: the LoRA term of the projection
    whose output the kernel reads (gate/up forward, down backward) is folded in."""
    bm, bn, _, _ = MOE_GLU_ROWS_TILE
    return {"ACT": MOE_ACTS[act], "HAS_LORA": int(rank > 0), "RP": moe_rank_pad(rank), "BM": bm, "BN": bn}


def moe_combine_meta(weighted: bool, has_extra: bool = False) -> dict:
    bt, bn, _, _ = MOE_COMBINE_TILE
    return {"WEIGHTED": int(bool(weighted)), "HAS_EXTRA": int(bool(has_extra)), "BT": bt, "BN": bn}


def _layer_kinds(family):
    """(act, transposed, has_bias) of the family's MoE layers: silu-concatenated, or gpt_oss's layout."""
    kinds = []
    for layer in family.get("moe_layers", ()):
        kind = ("gptoss", True, True) if layer.get("act") == "gptoss" else ("silu", False, False)
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _moe_gemm_aot(kernel: str):
    def variants(family):
        kinds = _layer_kinds(family)
        for dt in family.get("dtypes", ("bf16", "fp16")) if kinds else ():
            for act, transposed, has_bias in kinds:
                for rank in family.get("moe_ranks", (16,)):  # (NF4 stacks reach the kernels dequantised)
                    yield {"x": dt}, {"act": act, "transposed": transposed, "has_bias": has_bias, "rank": rank}

    return variants


def _moe_seg_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")) if _layer_kinds(family) else ():
        for rank in [r for r in family.get("moe_ranks", (16,)) if r]:  # (no adapter, no gradient)
            for gather, row_scale in ((False, False), (True, False), (True, True)):  # its three uses
                yield {"x": dt}, {"rank": rank, "gather": gather, "row_scale": row_scale}


_ROUTE_POINTERS = {"TILE_E": "i32", "TILE_ROW0": "i32", "START": "i32", "SLOT": "i32"}
_LORA_POINTERS = {"A": "x", "B": "x"}


def _gemm_spec(kernel: str, pointers: dict, floats: tuple, doc: str) -> KernelSpec:
    tile = MOE_TILES[kernel]
    return register(
        KernelSpec(
            name=kernel,
            module="csrc_triton.moe_lora.kernel",
            function=f"{kernel}_kernel",
            pointer_types={"W": "x", **_ROUTE_POINTERS, **_LORA_POINTERS, **pointers},
            float_args=floats,
            meta=lambda **shape: moe_gemm_meta(**{"kernel": kernel, **shape}),
            config=lambda arch, c: tile[2:],
            aot_variants=_moe_gemm_aot(kernel),
            doc=doc,
            check="fusedlora.ops.moe_lora:selfcheck",
        )
    )


MOE_GATE_UP_FWD = _gemm_spec(
    "moe_gate_up_fwd",
    {"X": "x", "BIAS": "x", "EG": "x", "HOUT": "x", "XA": "x"},
    ("scale", "alpha", "limit"),
    "MoE experts forward: gate/up grouped GEMM of the sorted rows with the rank-r LoRA term in the K-loop, the "
    "bias, and the GLU in the epilogue",
)
MOE_DOWN_FWD = _gemm_spec(
    "moe_down_fwd",
    {"HIN": "x", "BIAS": "x", "RW": "fp32", "OUT_SLOTS": "x", "HA": "x"},
    ("scale",),
    "MoE experts forward: down grouped GEMM with LoRA, bias and routing weight, scattered to slot order",
)
MOE_DOWN_BWD = _gemm_spec(
    "moe_down_bwd",
    {"DO": "x", "BIAS": "x", "RW": "fp32", "EG": "x", "DEG": "x", "HBUF": "x", "DOB": "x", "DW_PART": "fp32"},
    ("scale", "alpha", "limit"),
    "MoE experts backward: down projection's input gradient with LoRA, the GLU backward, the routing-weight "
    "gradient partials",
)
MOE_GATE_UP_BWD_DX = _gemm_spec(
    "moe_gate_up_bwd_dx",
    {"DEG": "x", "DX_SLOTS": "x", "DHB": "x"},
    ("scale",),
    "MoE experts backward: gate/up projection's input gradient with LoRA, scattered to slot order",
)

MOE_LORA_SEG_GRAD = register(
    KernelSpec(
        name="moe_lora_seg_grad",
        module="csrc_triton.moe_lora.kernel",
        function="moe_lora_seg_grad_kernel",
        pointer_types={"BIG": "x", "SMALL": "x", "SLOT": "i32", "RW": "fp32", "START": "i32", "OUT": "fp32"},
        float_args=("scale",),
        meta=moe_seg_meta,
        config=lambda arch, c: MOE_SEG_TILE[2:],
        aot_variants=_moe_seg_aot,
        doc="MoE experts backward: a LoRA factor's gradient per expert (sum over its rows), in PEFT's layouts",
        check="fusedlora.ops.moe_lora:selfcheck",
    )
)


def _hybrid_serves(family) -> bool:
    # the hybrid path (torch._grouped_mm for the frozen GEMMs) serves bf16 silu experts without biases only
    return ("silu", False, False) in _layer_kinds(family) and "bf16" in family.get("dtypes", ("bf16",))


def _moe_glu_rows_aot(family):
    if _hybrid_serves(family):
        for rank in family.get("moe_ranks", (16,)):
            yield {"x": "bf16"}, {"act": "silu", "rank": rank}


def _glu_rows_spec(kernel: str, pointers: dict, doc: str) -> KernelSpec:
    return register(
        KernelSpec(
            name=kernel,
            module="csrc_triton.moe_lora.kernel",
            function=f"{kernel}_kernel",
            pointer_types=pointers,
            float_args=("scale", "alpha", "limit"),
            meta=moe_glu_rows_meta,
            config=lambda arch, c: MOE_GLU_ROWS_TILE[2:],
            aot_variants=_moe_glu_rows_aot,
            doc=doc,
            check="fusedlora.ops.moe_lora:selfcheck",
        )
    )


MOE_GLU_ROWS_FWD = _glu_rows_spec(
    "moe_glu_rows_fwd",
    {"EG": "x", "HOUT": "x", "ROW_E": "i32", "XA": "x", "FB": "x"},
    "MoE experts, hybrid path: the GLU of the sorted rows' gate/up pre-activations (torch._grouped_mm beside it)",
)
MOE_GLU_ROWS_BWD = _glu_rows_spec(
    "moe_glu_rows_bwd",
    {
        "G": "x",
        "EG": "x",
        "RW": "fp32",
        "SLOT": "i32",
        "ROW_E": "i32",
        "OB": "x",
        "FA": "x",
        "DEG": "x",
        "HBUF": "x",
        "DW_PART": "fp32",
    },
    "MoE experts, hybrid path: the GLU's backward with the routing weight, its gradient partials and h",
)


def _moe_combine_aot(family):
    if _hybrid_serves(family):
        for weighted in (True, False):  # the forward's weighted sum, the backward's input gradient
            for has_extra in sorted({bool(r) for r in family.get("moe_ranks", (16,))}):  # (a LoRA term's rows)
                yield {"x": "bf16"}, {"weighted": weighted, "has_extra": has_extra}


MOE_COMBINE_ROWS = register(
    KernelSpec(
        name="moe_combine_rows",
        module="csrc_triton.moe_lora.kernel",
        function="moe_combine_rows_kernel",
        pointer_types={"ROWS": "x", "EXTRA": "x", "POS": "i32", "RW": "fp32", "OUT": "x"},
        float_args=("extra_scale",),
        meta=moe_combine_meta,
        config=lambda arch, c: MOE_COMBINE_TILE[2:],
        aot_variants=_moe_combine_aot,
        doc="MoE experts, hybrid path: each token's k expert rows (+ a LoRA term's) gathered from expert order, "
        "weighted, summed",
        check="fusedlora.ops.moe_lora:selfcheck",
    )
)
