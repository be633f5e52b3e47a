"""build_tools.gemm_probe (the Triton GEMMs `tune.py triton_gemm` weighs against cuBLAS) against a float64
reference. fp16 / fp32 operands: the CPU interpreter's bf16 tl.dot is wrong."""
import pytest
import torch
import triton

from build_tools.gemm_probe import gemm_abt_ptr, gemm_abt_tma


# 3 x 4 tiles of 32: GROUP_M 2 leaves a last group of one tile row (the grouped order's edge)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_pointer_gemm(device, dtype, tol):
    m, n, k = 96, 128, 48
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    c = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    gemm_abt_ptr[(triton.cdiv(m, 32) * triton.cdiv(n, 32),)](a, b, c, m, n, k, BM=32, BN=32, BK=16, GROUP_M=2, STAGES=2)
    ref = a.double() @ b.double().t()
    assert (c.double() - ref).abs().max() <= tol * ref.abs().max()


def test_persistent_tma_gemm(device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm_90")
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, n, k = 96, 128, 48
    a, b = torch.randn(m, k, dtype=torch.float16, device=device), torch.randn(n, k, dtype=torch.float16, device=device)
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    descs = (TensorDescriptor.from_tensor(a, [32, 16]), TensorDescriptor.from_tensor(b, [32, 16]),
             TensorDescriptor.from_tensor(c, [32, 32]))
    gemm_abt_tma[(5,)](*descs, m, n, k, BM=32, BN=32, BK=16, GROUP_M=2, STAGES=2, NUM_SMS=5)  # 12 tiles, 5 programs
    ref = a.double() @ b.double().t()
    assert (c.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # one bf16 rounding of the fp32 sums
