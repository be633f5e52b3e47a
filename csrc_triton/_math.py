"""Device helpers shared by kernels (plain tl ops only: the interpreter has no libdevice), and the one reading
of TRITON_INTERPRET that kernels, launchers and ops share."""

import os

import triton
import triton.language as tl

# The values Triton itself takes as "on" for TRITON_INTERPRET (its C++ getenv_bool, the same in 3.6 and 3.9):
# case-insensitive, no whitespace stripped; anything else, "" included, is off.
TRITON_TRUE_VALUES = ("1", "y", "yes", "on", "true")


def interpreter_on() -> bool:
    """TRITON_INTERPRET is on as Triton reads it: kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in TRITON_TRUE_VALUES


# bf16 / fp16 tl.dot is wrong in Triton's interpreter: there those operands are multiplied in fp32
# (read at import, as triton.jit reads TRITON_INTERPRET; the AOT build never sets it: a dead branch in cubins)
INTERPRETER_FP32_DOT = tl.constexpr(interpreter_on())


@triton.jit
def mma(a, b, acc):
    # acc + a @ b. fp32 operands: exact products (tl.dot would use TF32 on the GPU); fp16/bf16: tensor cores
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERPRETER_FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1, stable for large |x| in fp32
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def gelu_and_grad(g, APPROX: tl.constexpr):
    """(gelu(g), d gelu / d g) in fp32; APPROX=0: erf form, APPROX=1: tanh form."""
    if APPROX:
        c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        inner = c * (g + 0.044715 * g * g * g)
        t = tanh(inner)
        act = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
        act = g * cdf
        grad = cdf + g * pdf
    return act, grad


ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        return gelu_and_grad(g, ACT == 2)
