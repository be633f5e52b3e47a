"""Public ops: each a function of tensors and plain scalars, differentiable, with a `naive_*` reference."""
from .glu import geglu, naive_geglu, naive_swiglu, swiglu
from .rms_norm import naive_rms_norm, rms_norm

__all__ = ["rms_norm", "naive_rms_norm", "swiglu", "naive_swiglu", "geglu", "naive_geglu"]
