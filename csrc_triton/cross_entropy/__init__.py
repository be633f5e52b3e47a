"""cross_entropy: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, next_pow2, register

CE_MODES = {"loss": 0, "loss_and_grad": 1, "grad": 2}


# The fastest block / warps from prebuilt cubins on an H100 (docs/perf-notes.md, tuned launch configs)
CE_BLOCK = 16384
CE_PROGRAMS_PER_SM = 0  # 0: one program per row (persistent grids of 4 per SM measured slower)


def cross_entropy_meta(n_cols: int, softcap: bool, mode: str, smoothing: bool = False) -> dict:
    # SMOOTH only where the loss is computed: its sum over the row is one more reduction per chunk
    return {
        "BLOCK_V": min(CE_BLOCK, next_pow2(n_cols)),
        "HAS_SOFTCAP": int(bool(softcap)),
        "MODE": CE_MODES[mode],
        "SMOOTH": int(bool(smoothing) and mode != "grad"),
    }


def _ce_warps(block_v: int) -> int:
    return 32 if block_v >= 16384 else 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def _ce_aot(family):
    vocab_blocks = {}
    for v in family.get("vocab_sizes", ()):
        vocab_blocks.setdefault(min(CE_BLOCK, next_pow2(v)), v)  # one variant per block size serves them all
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for v in vocab_blocks.values():
            for softcap in (False, True):
                for mode in CE_MODES:
                    for smoothing in (False,) if mode == "grad" else (False, True):
                        yield (
                            {"x": dt, "label": "i64"},
                            {"n_cols": v, "softcap": softcap, "mode": mode, "smoothing": smoothing},
                            {"scale_stride": "1"} if mode == "grad" else {},
                        )


CROSS_ENTROPY = register(
    KernelSpec(
        name="cross_entropy",
        module="csrc_triton.cross_entropy.kernel",
        function="cross_entropy_kernel",
        pointer_types={"LOGITS": "x", "LABELS": "label", "LOSS": "fp32", "LSE": "fp32", "GRAD": "x", "SCALE": "fp32"},
        float_args=("label_smoothing", "softcap", "logit_scale", "lse_square_scale"),
        meta=cross_entropy_meta,
        config=lambda arch, c: (_ce_warps(c["BLOCK_V"]), 1),
        aot_variants=_ce_aot,
        doc="row-wise cross-entropy (optional z-loss): loss, lse and (optionally) the gradient in the logits' dtype",
        check="fusedlora.ops.cross_entropy:selfcheck",
    )
)

CE_PREPARE_INV = {"count": 0, "divisor": 1, "given": 2}  # given: the caller writes INV

CE_PREPARE = register(
    KernelSpec(
        name="ce_prepare",
        module="csrc_triton.cross_entropy.kernel",
        function="ce_prepare_kernel",
        pointer_types={"LABELS": "label", "INV": "fp32", "OK": "i32"},
        float_args=("divisor",),
        meta=lambda inv: {"BLOCK": 2048, "INV_MODE": CE_PREPARE_INV[inv]},
        config=lambda arch, c: (8, 1),
        aot_variants=lambda family: (({"label": lt}, {"inv": inv}) for lt in ("i64", "i32") for inv in CE_PREPARE_INV),
        doc="cross-entropy set-up: labels range check and the loss scale (1 / count of used labels)",
        check="fusedlora.ops.cross_entropy:selfcheck",
    )
)

SCALE_BLOCK = 4096
SCALE_PROGRAMS_PER_SM = 8  # persistent: s == 1 (the usual case) costs ~1000 empty programs, not one per block

SCALE_BY_SCALAR = register(
    KernelSpec(
        name="scale_by_scalar",
        module="csrc_triton.cross_entropy.kernel",
        function="scale_by_scalar_kernel",
        pointer_types={"X": "x", "S": "fp32"},
        meta=lambda: {"BLOCK": SCALE_BLOCK},
        config=lambda arch, c: (8, 1),
        aot_variants=lambda family: (({"x": dt}, {}) for dt in list(family.get("dtypes", ("bf16", "fp16"))) + ["fp32"]),
        doc="x *= s[0] in place, free when s[0] == 1",
        check="fusedlora.ops.cross_entropy:selfcheck",
    )
)
