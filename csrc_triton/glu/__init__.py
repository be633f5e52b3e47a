"""glu: the registry entries of the kernels in kernel.py (pointer dtype roles, constexprs per shape,
launch configs, AOT variants). Importing this module does not import triton: the prebuilt-cubin path
never pays for it; kernel.py (the @triton.jit sources) is imported on the first JIT or AOT use."""

from __future__ import annotations

from fusedlora.kernel_spec import KernelSpec, register

GLU_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
GLU_BLOCK = 2048  # elements per program (tune.py glu on an H100: docs/perf-notes.md)


def glu_meta(act: str) -> dict:
    return {"ACT": GLU_ACTS[act], "BLOCK": GLU_BLOCK}


def glu_bwd_meta(act: str, store_h: bool = False) -> dict:
    return {**glu_meta(act), "STORE_H": int(bool(store_h))}


def _glu_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for act in GLU_ACTS:
            yield {"x": dt}, {"act": act}


def _glu_bwd_aot(family):
    for dtypes, shape in _glu_aot(family):
        for store_h in (False, True):  # True: the fused LoRA MLP backward
            yield dtypes, {**shape, "store_h": store_h}


GLU_FWD = register(
    KernelSpec(
        name="glu_fwd",
        module="csrc_triton.glu.kernel",
        function="glu_fwd_kernel",
        pointer_types={"GATE": "x", "UP": "x", "OUT": "x"},
        meta=glu_meta,
        config=lambda arch, c: (16, 1),
        aot_variants=_glu_aot,
        doc="act(gate) * up, act in SiLU / GELU / GELU-tanh",
        check="fusedlora.ops.glu:selfcheck",
    )
)

GLU_BWD = register(
    KernelSpec(
        name="glu_bwd",
        module="csrc_triton.glu.kernel",
        function="glu_bwd_kernel",
        pointer_types={"DOUT": "x", "GATE": "x", "UP": "x", "DGATE": "x", "DUP": "x", "H": "x"},
        meta=glu_bwd_meta,
        config=lambda arch, c: (16, 1),
        aot_variants=_glu_bwd_aot,
        doc="gradients of act(gate) * up, activation recomputed; STORE_H also writes h over d(out)",
        check="fusedlora.ops.glu:selfcheck",
    )
)
