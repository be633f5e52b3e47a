"""rms_norm: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, next_pow2, register

MAX_NORM_COLS = 65536


def _norm_widths(family):
    return sorted(set(family.get("hidden_sizes", ())) | set(family.get("head_dims", ())))


# casting mode -> (gemma_cast, none_cast) constexpr flags (fusedlora.ops.rms_norm documents the modes)
CAST_FLAGS = {"llama": (False, False), "gemma": (True, False), "none": (False, True)}


def rms_norm_meta(n_cols: int, gemma_cast: bool, none_cast: bool = False, has_weight: bool = True) -> dict:
    """gemma_cast / none_cast: the casting mode's flags (CAST_FLAGS); has_weight False: a norm without a
    weight (y = x * rstd), where Gemma's product in fp32 is Llama's (nothing is multiplied after the cast)."""
    block_n = next_pow2(n_cols)
    if block_n > MAX_NORM_COLS:
        raise ValueError(f"rms_norm supports rows of at most {MAX_NORM_COLS} elements, got {n_cols}")
    # Small rows: several rows per program so each program still moves a few KB.
    block_m = max(1, min(16, 2048 // block_n))
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "GEMMA_CAST": int(bool(gemma_cast and has_weight)),
        "NONE_CAST": int(bool(none_cast)),
        "HAS_WEIGHT": int(bool(has_weight)),
    }


def rms_norm_bwd_meta(n_cols: int, gemma_cast: bool, has_weight: bool = True) -> dict:
    """The None mode's backward is the Llama one (its forward saves the fp32 rstd, as Llama's does)."""
    m = rms_norm_meta(n_cols, gemma_cast, has_weight=has_weight)
    del m["NONE_CAST"]
    return m


def _row_warps(block_n: int) -> int:
    # from build_tools/tune.py's sweep on an H100 (docs/perf-notes.md)
    if block_n >= 16384:
        return 16
    if block_n >= 4096:
        return 8
    if block_n >= 1024:
        return 4
    return 2


RMS_BWD_PROGRAMS_PER_SM = 2


def _rms_norm_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for n in _norm_widths(family):
            for gemma, none in CAST_FLAGS.values():
                for has_weight in (True, False):  # (family_variants drops the duplicates meta makes)
                    yield (
                        {"x": dt, "w": dt, "y": dt},
                        {"n_cols": n, "gemma_cast": gemma, "none_cast": none, "has_weight": has_weight},
                    )


def _rms_norm_bwd_aot(family):
    for dtypes, shape in _rms_norm_aot(family):
        yield dtypes, {k: v for k, v in shape.items() if k != "none_cast"}


RMS_NORM_FWD = register(
    KernelSpec(
        name="rms_norm_fwd",
        module="csrc_triton.rms_norm.kernel",
        function="rms_norm_fwd_kernel",
        pointer_types={"X": "x", "W": "w", "Y": "y", "RSTD": "fp32"},
        float_args=("eps", "offset"),
        meta=rms_norm_meta,
        config=lambda arch, c: (_row_warps(c["BLOCK_N"] * c["BLOCK_M"]), 1),
        aot_variants=_rms_norm_aot,
        doc="RMSNorm forward, one or more rows per program",
        check="fusedlora.ops.rms_norm:selfcheck",
    )
)

RMS_NORM_BWD = register(
    KernelSpec(
        name="rms_norm_bwd",
        module="csrc_triton.rms_norm.kernel",
        function="rms_norm_bwd_kernel",
        pointer_types={"DY": "y", "X": "x", "W": "w", "RSTD": "fp32", "DX": "x", "DW_PARTIAL": "fp32"},
        float_args=("offset",),
        meta=rms_norm_bwd_meta,
        config=lambda arch, c: (min(16, 2 * _row_warps(c["BLOCK_N"] * c["BLOCK_M"])), 1),
        aot_variants=_rms_norm_bwd_aot,
        doc="RMSNorm backward (dx and per-program dw partial sums), persistent grid",
        check="fusedlora.ops.rms_norm:selfcheck",
    )
)
