"""Public ops: each a function of tensors and plain scalars, differentiable, with a `naive_*` reference."""

from .cross_entropy import cross_entropy, naive_cross_entropy
from .glu import geglu, naive_geglu, naive_swiglu, swiglu
from .linear_loss import chunked_linear_loss, fused_linear_cross_entropy, naive_linear_cross_entropy
from .rms_norm import naive_rms_norm, rms_norm
from .rope import naive_rope, rope

__all__ = [
    "rms_norm",
    "naive_rms_norm",
    "swiglu",
    "naive_swiglu",
    "geglu",
    "naive_geglu",
    "cross_entropy",
    "naive_cross_entropy",
    "fused_linear_cross_entropy",
    "naive_linear_cross_entropy",
    "chunked_linear_loss",
    "rope",
    "naive_rope",
]
