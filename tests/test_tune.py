"""build_tools/tune.py's sweeps run through the ops' own launchers under KernelSpec.override: the override
reaches the launch (and the result stays right), and every sweep runs at smoke sizes (CI: the interpreter)."""

import pytest
import torch

from csrc_triton.rms_norm import RMS_NORM_FWD
from fusedlora import loader
from fusedlora.ops import naive_rms_norm, rms_norm
from fusedlora.testing import DEVICE


def test_override_reaches_the_launch_and_keeps_the_result(monkeypatch):
    seen = []
    real = loader.Loader.launch_jit

    def spy(self, spec, grid, args, constexprs, num_warps=None, num_stages=None):
        seen.append((spec.name, grid, dict(constexprs), num_warps))
        return real(self, spec, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(loader.Loader, "launch_jit", spy)
    x, w = torch.randn(9, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    default = RMS_NORM_FWD.constexprs(n_cols=64, gemma_cast=False)
    with RMS_NORM_FWD.override(BLOCK_M=2, num_warps=2):
        assert RMS_NORM_FWD.constexprs(n_cols=64, gemma_cast=False)["BLOCK_M"] == 2
        y = rms_norm(x, w)
    assert seen and seen[0][0] == "rms_norm_fwd" and seen[0][2]["BLOCK_M"] == 2 and seen[0][3] == 2
    assert seen[0][1][0] == 5  # the launcher sized its grid from the overridden BLOCK_M: ceil(9 / 2)
    assert torch.allclose(y, naive_rms_norm(x, w), rtol=1e-5, atol=1e-5)
    assert RMS_NORM_FWD.constexprs(n_cols=64, gemma_cast=False) == default  # gone after the block
    seen.clear()
    rms_norm(x, w)
    assert not seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run the real sweeps: python -m build_tools.tune")
def test_every_sweep_runs_at_smoke_sizes(capsys):
    from build_tools import tune

    try:
        tune.main(["--smoke"])
    finally:
        tune.SMOKE, tune.DEV = False, "cuda"
    out = capsys.readouterr().out
    for name in (
        "cross_entropy",
        "swiglu",
        "glu_lora_bwd",
        "glu_lora_fwd",
        "glu_lora_dyb",
        "rope fwd",
        "rms_norm",
        "nf4 nested",
        "gptq",
    ):
        assert f"== {name}" in out, name
    assert "skip" not in out


def test_smoke_refuses_a_gpu_probe():
    from build_tools import tune

    try:
        with pytest.raises(SystemExit, match="triton_gemm is a GPU probe, not a sweep: no --smoke run"):
            tune.main(["--smoke", "triton_gemm"])
    finally:
        tune.SMOKE, tune.DEV = False, "cuda"
