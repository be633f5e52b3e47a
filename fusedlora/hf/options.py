"""`fusedlora.patch`'s options as one frozen record, checked when it is made (`PatchOptions`)."""

from __future__ import annotations

import dataclasses
import math

from ..ops.moe_lora import MOE_BASE_GEMMS

MLP_CHUNK_BYTES = 1 << 30  # gate/up activations of one MLP call above this run in row chunks (mlp_chunk_bytes)


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """What `fusedlora.patch(model, options=...)` does; the fields are patch's keyword arguments, with the same
    defaults and meaning (see `fusedlora.hf.patch`). A value of the wrong kind raises, naming the option."""

    rms_norm: bool = True
    rope: bool = True
    mlp: bool = True
    qkv: bool = True
    o: bool = True
    loss: bool = True
    offload_checkpoints: bool = False
    cuda_graphs: bool = False
    mlp_chunk_bytes: int = MLP_CHUNK_BYTES
    recompute_norms: bool = True
    offload_host_limit_gib: float | None = None
    moe_base_gemm: str = "auto"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool):
                self._set(f.name, _switch(f.name, getattr(self, f.name)))
        chunk = self.mlp_chunk_bytes
        if not (_real(chunk) and math.isfinite(chunk) and chunk >= 0):
            raise ValueError(f"fusedlora.patch: option mlp_chunk_bytes must be a size in bytes >= 0, got {chunk!r}")
        self._set("mlp_chunk_bytes", int(chunk))
        limit = self.offload_host_limit_gib
        if limit is not None and not (_real(limit) and math.isfinite(limit) and limit >= 0):
            raise ValueError(
                f"fusedlora.patch: option offload_host_limit_gib must be a size in GiB >= 0 or None, got {limit!r}"
            )

        if self.moe_base_gemm not in MOE_BASE_GEMMS:
            raise ValueError(
                f"fusedlora.patch: option moe_base_gemm must be one of {MOE_BASE_GEMMS}, got {self.moe_base_gemm!r}"
            )

    def _set(self, name, value):
        object.__setattr__(self, name, value)  # (normalising a field while the frozen record is being made)

    @classmethod
    def merged(cls, options: PatchOptions | None, changes: dict) -> PatchOptions:
        """`options` (None: the defaults) with the keyword arguments `changes` over them: what
        `patch(model, options=options, **changes)` runs with."""
        if options is not None and not isinstance(options, PatchOptions):
            raise TypeError(f"fusedlora.patch: options must be a fusedlora.PatchOptions, got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(
                f"fusedlora.patch: unknown option {', '.join(map(repr, unknown))} (the options: {', '.join(names)})"
            )
        return dataclasses.replace(options or cls(), **changes)

    def wants(self, kind: str) -> bool:
        """Whether modules of this kind (fusedlora.hf.report.KINDS) are to be patched; attention is while any of
        q/k/v, o and RoPE is."""
        if kind == "attention":
            return self.qkv or self.o or self.rope
        if kind == "moe":  # a MoE block is the layer's MLP
            return self.mlp
        return getattr(self, kind)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _switch(name: str, value) -> bool:
    """An on/off option as a bool: True, False, or 1 / 0."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"fusedlora.patch: option {name} must be True or False, got {value!r}")
