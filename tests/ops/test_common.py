"""What the ops share (fusedlora.ops._common): the TRITON_INTERPRET check reads the variable as Triton does, and
CPU tensors run under every spelling Triton accepts."""

import pytest
import torch

from fusedlora.quant import dequantize_nf4, naive_dequantize_nf4
from fusedlora.testing import DEVICE, nf4_state_stub


@pytest.mark.parametrize(
    "value",
    [
        "1",
        "true",
        "TRUE",
        "True",
        "yes",
        "Yes",
        "on",
        "ON",
        "y",
        "Y",
        "0",
        "false",
        "off",
        "no",
        "",
        " 1",
        "1 ",
        "2",
        "t",
    ],
)
def test_interpreting_reads_triton_interpret_as_triton_does(monkeypatch, value):
    """fusedlora's TRITON_INTERPRET check agrees with Triton's own parsing of it (its knob, read afresh)."""
    from triton import knobs

    from fusedlora.ops._common import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is bool(knobs.runtime.interpret)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs CPU tensors; this GPU process compiled its kernels")
@pytest.mark.parametrize("value", ["true", "yes", "on"])
def test_cpu_tensors_run_under_any_spelling_triton_accepts(monkeypatch, value):
    from fusedlora.ops import naive_rms_norm, rms_norm

    monkeypatch.setenv("TRITON_INTERPRET", value)
    x, w = torch.randn(3, 64), torch.randn(64)
    assert torch.allclose(rms_norm(x, w), naive_rms_norm(x, w), rtol=1e-5, atol=1e-5)
    packed, qs = nf4_state_stub()
    assert torch.equal(dequantize_nf4(packed, qs), naive_dequantize_nf4(packed, qs))
