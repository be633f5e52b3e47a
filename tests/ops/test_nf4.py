"""fusedlora/ops/nf4.py: the NF4 launch shared by quant.dequantize_nf4 and the MoE experts' chunks. Correctness is
tested through its callers (tests/test_quant.py against bitsandbytes; tests/ops/test_moe_lora.py, each chunk
bit-identical); here the range's bad inputs, refused in its own terms before any launch."""

import pytest
import torch

from fusedlora.ops.nf4 import nf4_range, nf4_range_alignment


def _args(n):
    data = torch.zeros((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.ones(-(-n // 64), dtype=torch.float32)
    return data, absmax, absmax, torch.zeros(16), torch.zeros(256), torch.zeros(1)


def test_alignment_is_whole_blocks_or_whole_second_level_blocks():
    assert nf4_range_alignment(64, False) == 64
    assert nf4_range_alignment(64, True) == 64 * 256


def test_a_range_off_the_block_grid_is_refused():
    with pytest.raises(ValueError, match=r"nf4_range: first 32 is not a multiple of 64"):
        nf4_range(*_args(256), 32, 64, torch.empty(64), blocksize=64, nested=False)
    with pytest.raises(ValueError, match=r"nf4_range: first 64 is not a multiple of 16384"):
        nf4_range(*_args(256), 64, 64, torch.empty(64), blocksize=64, nested=True)


@pytest.mark.parametrize(
    "out", [torch.empty(63), torch.empty(8, 8).t(), torch.empty(2, 64)], ids=["short", "strided", "2d"]
)
def test_an_output_that_cannot_hold_the_range_is_refused(out):
    with pytest.raises(ValueError, match=r"nf4_range: out must be a contiguous 1-D buffer of at least 64 elements"):
        nf4_range(*_args(256), 64, 64, out, blocksize=64, nested=False)
