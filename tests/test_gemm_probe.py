"""build_tools.gemm_probe (the Triton GEMMs `tune.py triton_gemm` and `gemm_glu` weigh against cuBLAS) against
float64 references. fp16 / fp32 operands: the CPU interpreter's bf16 tl.dot is wrong."""

import pytest
import torch
import triton

from build_tools.gemm_probe import (
    gemm_abt_ptr,
    gemm_abt_tma,
    gemm_glu_lora_fwd,
    naive_gemm_glu_lora_fwd,
    use_torch_scratch,
)


def _needs_tma(device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm_90")


# 3 x 4 tiles of 32: GROUP_M 2 leaves a last group of one tile row (the grouped order's edge)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_pointer_gemm(device, dtype, tol):
    if device == "cuda" and dtype == torch.float32:
        tol = 5e-3  # tl.dot's fp32 default on the GPU is TF32: operands rounded to 10-bit mantissas
    m, n, k = 96, 128, 48
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    c = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    gemm_abt_ptr[(triton.cdiv(m, 32) * triton.cdiv(n, 32),)](a, b, c, m, n, k, BM=32, BN=32, BK=16, GROUP_M=2, STAGES=2)
    ref = a.double() @ b.double().t()
    assert (c.double() - ref).abs().max() <= tol * ref.abs().max()


def test_persistent_tma_gemm(device):
    _needs_tma(device)
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, n, k = 96, 128, 48
    a, b = torch.randn(m, k, dtype=torch.float16, device=device), torch.randn(n, k, dtype=torch.float16, device=device)
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    descs = (
        TensorDescriptor.from_tensor(a, [32, 16]),
        TensorDescriptor.from_tensor(b, [32, 16]),
        TensorDescriptor.from_tensor(c, [32, 32]),
    )
    gemm_abt_tma[(5,)](*descs, m, n, k, BM=32, BN=32, BK=16, GROUP_M=2, STAGES=2, NUM_SMS=5)  # 12 tiles, 5 programs
    ref = a.double() @ b.double().t()
    assert (c.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # one bf16 rounding of the fp32 sums


# T, H, I, rank: one row; tiles cut by every edge (tiles of 32 x 32 x 16 here); a rank padded to R = 16
@pytest.mark.parametrize("T,H,I,r", [(1, 32, 32, 16), (70, 48, 40, 5), (33, 24, 72, 16)])
def test_gemm_glu_lora_fwd(device, T, H, I, r):
    """e, g with their adapter terms and h = silu(e) * g vs float64 (fp16: one rounding of each, plus h's
    from the rounded e, g); the buffer's columns past e | g untouched. 3 programs walk the tiles."""
    _needs_tma(device)
    if device == "cuda":
        use_torch_scratch()
    x = torch.randn(T, H, device=device).half()
    w = (torch.randn(2 * I, H, device=device) / H**0.5).half()
    xa = torch.randn(T, 2 * r, device=device).half()
    b_g, b_u = ((torch.randn(I, r, device=device) / r**0.5).half() for _ in range(2))
    eg = torch.full((T, 2 * I + 16), float("nan"), device=device).half()
    h = torch.empty(T, I, device=device).half()
    gemm_glu_lora_fwd(
        x,
        w[:I],
        w[I:],
        xa,
        r,
        b_g,
        b_u,
        (0.5, 2.0),
        (eg[:, :I], eg[:, I : 2 * I]),
        h,
        programs=3,
        warps=4,
        tile=(32, 32, 16, 2, 2),
    )
    want = naive_gemm_glu_lora_fwd(x, w[:I], w[I:], xa[:, :r], xa[:, r:], b_g, b_u, (0.5, 2.0))
    for name, got, ref in (("e", eg[:, :I], want[0]), ("g", eg[:, I : 2 * I], want[1]), ("h", h, want[2])):
        assert (got.double() - ref).abs().max() <= 3e-3 * ref.abs().max(), name
    assert bool(eg[:, 2 * I :].isnan().all())
