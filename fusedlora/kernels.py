"""Declarations of every kernel (see `fusedlora.registry`). Torch-free: the AOT build imports it.

Shape families (`family` below) are dicts with lists: hidden_sizes, head_dims, intermediate_sizes,
vocab_sizes, dtypes. `build_tools/shapes.py` holds the common models' family; `fusedlora.build` derives
one from a HF config.
"""
from __future__ import annotations

from .registry import KernelSpec, register

MAX_NORM_COLS = 65536


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _norm_widths(family):
    return sorted(set(family.get("hidden_sizes", ())) | set(family.get("head_dims", ())))


# ---------------------------------------------------------------- RMSNorm
def rms_norm_meta(n_cols: int, gemma_cast: bool) -> dict:
    block_n = next_pow2(n_cols)
    if block_n > MAX_NORM_COLS:
        raise ValueError(f"rms_norm supports rows of at most {MAX_NORM_COLS} elements, got {n_cols}")
    # Small rows: several rows per program so each program still moves a few KB.
    block_m = max(1, min(16, 2048 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "GEMMA_CAST": int(bool(gemma_cast))}


def rms_norm_bwd_meta(n_cols: int, gemma_cast: bool) -> dict:
    m = rms_norm_meta(n_cols, gemma_cast)
    del m["BLOCK_M"]
    return m


def _row_warps(block_n: int) -> int:
    if block_n >= 16384:
        return 16
    if block_n >= 4096:
        return 8
    if block_n >= 1024:
        return 4
    return 2


def _rms_norm_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for n in _norm_widths(family):
            for gemma in (False, True):
                yield {"x": dt, "w": dt, "y": dt}, {"n_cols": n, "gemma_cast": gemma}


RMS_NORM_FWD = register(KernelSpec(
    name="rms_norm_fwd",
    module="csrc_triton.rms_norm", function="rms_norm_fwd_kernel",
    pointer_types={"X": "x", "W": "w", "Y": "y", "RSTD": "fp32"},
    float_args=("eps", "offset"),
    meta=rms_norm_meta,
    config=lambda arch, c: (_row_warps(c["BLOCK_N"] * c["BLOCK_M"]), 1),
    aot_variants=_rms_norm_aot,
    doc="RMSNorm forward, one or more rows per program",
))

RMS_NORM_BWD = register(KernelSpec(
    name="rms_norm_bwd",
    module="csrc_triton.rms_norm", function="rms_norm_bwd_kernel",
    pointer_types={"DY": "y", "X": "x", "W": "w", "RSTD": "fp32", "DX": "x", "DW_PARTIAL": "fp32"},
    float_args=("offset",),
    meta=rms_norm_bwd_meta,
    config=lambda arch, c: (_row_warps(c["BLOCK_N"]), 1),
    aot_variants=_rms_norm_aot,
    doc="RMSNorm backward (dx and per-program dw partial sums), persistent grid",
))


# ---------------------------------------------------------------- SwiGLU / GeGLU
GLU_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
GLU_BLOCK = 2048


def glu_meta(act: str) -> dict:
    return {"ACT": GLU_ACTS[act], "BLOCK": GLU_BLOCK}


def _glu_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for act in GLU_ACTS:
            yield {"x": dt}, {"act": act}


GLU_FWD = register(KernelSpec(
    name="glu_fwd",
    module="csrc_triton.glu", function="glu_fwd_kernel",
    pointer_types={"GATE": "x", "UP": "x", "OUT": "x"},
    meta=glu_meta,
    config=lambda arch, c: (8, 1),
    aot_variants=_glu_aot,
    doc="act(gate) * up, act in SiLU / GELU / GELU-tanh",
))

GLU_BWD = register(KernelSpec(
    name="glu_bwd",
    module="csrc_triton.glu", function="glu_bwd_kernel",
    pointer_types={"DOUT": "x", "GATE": "x", "UP": "x", "DGATE": "x", "DUP": "x"},
    meta=glu_meta,
    config=lambda arch, c: (8, 1),
    aot_variants=_glu_aot,
    doc="gradients of act(gate) * up, activation recomputed",
))
