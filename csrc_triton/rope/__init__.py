"""rope: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, next_pow2, register


def rope_meta(half: int, n_pass: int, has_pos: bool, backward: bool) -> dict:
    block_half = next_pow2(half)
    # heads per program and warps from tune.py rope on an H100 (docs/perf-notes.md)
    return {
        "BLOCK_H": max(1, min(16, 512 // block_half)),
        "BLOCK_HALF": block_half,
        "BLOCK_PASS": next_pow2(n_pass) if n_pass > 0 else 0,
        "HAS_POS": int(bool(has_pos)),
        "BACKWARD": int(bool(backward)),
    }


def _rope_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for d in family.get("head_dims", ()):
            for has_pos in (False, True):
                for backward in (False, True):
                    for cdt in (dt, "fp32") if has_pos else (dt,):  # caches are often kept in fp32
                        yield (
                            {"x": dt, "c": cdt, "pos": "i64" if has_pos else cdt},
                            {"half": d // 2, "n_pass": 0, "has_pos": has_pos, "backward": backward},
                            {"half": d // 2, "n_pass": 0, "pos_ss": 1 if has_pos else 0},
                        )


ROPE = register(
    KernelSpec(
        name="rope",
        module="csrc_triton.rope.kernel",
        function="rope_kernel",
        pointer_types={"Q": "x", "K": "x", "QO": "x", "KO": "x", "COS": "c", "SIN": "c", "POS": "pos"},
        meta=rope_meta,
        config=lambda arch, c: (1 if c["BLOCK_H"] * c["BLOCK_HALF"] <= 512 else 4, 1),
        aot_variants=_rope_aot,
        doc="rotary embedding of q and k (GQA) in one launch, optional position_ids gather",
        check="fusedlora.ops.rope:selfcheck",
    )
)
