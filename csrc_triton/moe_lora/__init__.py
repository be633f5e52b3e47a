"""moe_lora: the registry entries of the routed-experts kernels in kernel.py (pointer dtype roles, constexprs
per shape, launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin
path never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use.

Tiles are fixed per kernel (not yet tuned: docs/moe-design.md 5.4); the rows of an M-tile belong to one
expert, BM (block_m) is chosen by the op and shared by every kernel of a call."""

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
NF4_NONE = {"NF4": 0, "NESTED": 0, "BLOCKSIZE": 64, "BLOCKSIZE2": 256}


def moe_rank_pad(rank: int) -> int:
    return max(16, next_pow2(rank))  # tl.dot needs every dimension >= 16


def _nf4_meta(nf4_blocksize: int, nested: bool) -> dict:
    if not nf4_blocksize:
        return dict(NF4_NONE)
    return {"NF4": 1, "NESTED": int(bool(nested)), "BLOCKSIZE": int(nf4_blocksize), "BLOCKSIZE2": 256}


def moe_gemm_meta(
    kernel: str,
    act: str = "silu",
    transposed: bool = False,
    has_bias: bool = False,
    rank: int = 0,
    nf4_blocksize: int = 0,
    nested: bool = False,
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
        **_nf4_meta(nf4_blocksize, nested),
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
                for rank in family.get("moe_ranks", (16,)):
                    for nf4, nested in ((0, False), (64, True)):  # bf16 experts; NF4 with bitsandbytes' defaults
                        yield (
                            {"x": dt, "w": "u8" if nf4 else dt, "absmax": "u8" if nested else "fp32"},
                            {
                                "act": act,
                                "transposed": transposed,
                                "has_bias": has_bias,
                                "rank": rank,
                                "nf4_blocksize": nf4,
                                "nested": nested,
                            },
                        )

    return variants


def _moe_seg_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")) if _layer_kinds(family) else ():
        for rank in family.get("moe_ranks", (16,)):
            for gather, row_scale in ((False, False), (True, False), (True, True)):  # its three uses
                yield {"x": dt}, {"rank": rank, "gather": gather, "row_scale": row_scale}


_W_POINTERS = {"W": "w", "ABSMAX": "absmax", "ABSMAX2": "fp32", "CODE": "fp32", "CODE2": "fp32", "OFFSET": "fp32"}
_ROUTE_POINTERS = {"TILE_E": "i32", "TILE_ROW0": "i32", "START": "i32", "SLOT": "i32"}
_LORA_POINTERS = {"A": "x", "B": "x"}


def _gemm_config(tile):
    # NF4: the decode's gathers (bytes, code table, absmax: [BK, BN] each) are not worth staging in shared
    # memory, and pipelined 3 deep they need 230-240 KB of it, past sm_80's and sm_90's limits
    return lambda arch, c: (tile[2], 1 if c["NF4"] else tile[3])


def _gemm_spec(kernel: str, pointers: dict, floats: tuple, doc: str) -> KernelSpec:
    tile = MOE_TILES[kernel]
    return register(
        KernelSpec(
            name=kernel,
            module="csrc_triton.moe_lora.kernel",
            function=f"{kernel}_kernel",
            pointer_types={**_W_POINTERS, **_ROUTE_POINTERS, **_LORA_POINTERS, **pointers},
            float_args=floats,
            meta=lambda **shape: moe_gemm_meta(**{"kernel": kernel, **shape}),
            config=_gemm_config(tile),
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
