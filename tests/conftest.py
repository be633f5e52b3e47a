"""Test set-up: with no CUDA GPU, kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it then)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


_FP32_PRECISION_KNOBS = ((torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"),
                         (torch.backends.cudnn, "fp32_precision"))


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_ieee():
    """A Trainer test may turn TF32 on process-wide (TrainingArguments does under torch_compile or bf16,
    through transformers' enable_tf32): restore the fp32 matmul precision after every test, so a later fp32
    comparison against an fp64 reference is not compared at TF32's ~1e-3 precision (seen on an H200)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _FP32_PRECISION_KNOBS if hasattr(obj, name)]
    yield
    for obj, name, value in saved:
        setattr(obj, name, value)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||; the denominator is floored at 1e-2 so an exactly-zero reference (a 1-class
    cross-entropy, say) compares absolutely."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-2)).item()


def run_isolated(code: str):
    """Run `code` in a fresh Python process (a CUDA device-side assert ends the process's context)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def assert_device_assert(code: str, message: str):
    """`code` (run in its own process: a device-side assert ends the CUDA context) fails with `message`."""
    r = run_isolated(code)
    assert r.returncode != 0 and (message in r.stderr or "device-side assert" in r.stderr), r.stderr[-2000:]


def assert_close(got, ref, tol: float, name: str = "", floor: float = 1e-2):
    """Norm-wise AND element-wise: ||got - ref|| / ||ref|| <= tol, and every |got - ref| <= tol * max|ref|
    (both scales floored at `floor`), so a fault confined to one row, column or element fails as well."""
    g, r = got.detach().double(), ref.detach().double()
    assert g.shape == r.shape, (name, tuple(g.shape), tuple(r.shape))
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    norm_err = ((g - r).norm() / r.norm().clamp_min(floor)).item()
    scale = max(r.abs().max().item() if r.numel() else 0.0, floor)
    elem_err = ((g - r).abs().max().item() if r.numel() else 0.0) / scale
    assert norm_err <= tol and elem_err <= tol, (f"{name}: norm-wise {norm_err:.3e}, element-wise {elem_err:.3e} "
                                                 f"(worst at {tuple(int(i) for i in torch.nonzero((g - r).abs() == (g - r).abs().max())[0])}), tol {tol:.1e}")


def kernel_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values rounded to a 16-bit dtype the way the kernels' casts do it here: CUDA rounds to nearest;
    Triton's interpreter (triton 3.9) truncates fp32 -> bf16 (fp16 it rounds)."""
    t = t.float()
    if dtype == torch.bfloat16 and not HAS_CUDA:
        return (t.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return t.to(dtype)
