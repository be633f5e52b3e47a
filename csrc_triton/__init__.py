"""Triton kernel sources of fusedlora.

Every `@triton.jit` kernel of the project lives here, one module per op. Nothing in this
package imports torch: the ahead-of-time build compiles these kernels on machines that have
only triton installed. The kernels are described (signature, constexpr variants, launch
configs) once, in `fusedlora.kernels`.
"""
