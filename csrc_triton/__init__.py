"""Kernel sources of fusedlora, one folder per op (rms_norm, glu, glu_lora, cross_entropy, rope, quant).

In each folder, `kernel.py` holds the `@triton.jit` functions and `__init__.py` their registry entries (pointer
dtype roles, constexprs per shape, launch configs, AOT variants: `fusedlora.kernel_spec.KernelSpec`), so an op's
kernels are described once, beside their source, for the JIT path and the AOT build alike. `_*.py` here are
device helpers shared by the kernels (part of every kernel's source fingerprint). Nothing here imports torch:
the ahead-of-time build needs only triton; and the entries import no triton, so the prebuilt path never does.
"""
