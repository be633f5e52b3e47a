"""Test set-up: with no CUDA GPU, kernels run in Triton's CPU interpreter; pytest's fixtures and hooks.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it then). The helpers the
tests share are fusedlora.testing's (the test files import them from there; re-exported here for the subprocess
workers, which import conftest first to set TRITON_INTERPRET)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from fusedlora.testing import DEVICE, assert_close, assert_device_assert, kernel_round, rel_err, run_isolated  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """FUSEDLORA_FAILURE_LOG=path: each failure's traceback appended there as it happens (pytest prints them only
    at the end, which a run cut by its time limit never reaches); written once, by the xdist controller."""
    path = os.environ.get("FUSEDLORA_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


_FP32_PRECISION_KNOBS = (
    (torch.backends, "fp32_precision"),
    (torch.backends.cuda.matmul, "fp32_precision"),
    (torch.backends.cudnn, "fp32_precision"),
)


@pytest.fixture(autouse=True)
def _fp32_matmuls_stay_ieee():
    """A Trainer test may turn TF32 on process-wide (TrainingArguments does under torch_compile or bf16,
    through transformers' enable_tf32): restore the fp32 matmul precision after every test, so a later fp32
    comparison against an fp64 reference is not compared at TF32's ~1e-3 precision (seen on an H200)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _FP32_PRECISION_KNOBS if hasattr(obj, name)]
    yield
    for obj, name, value in saved:
        setattr(obj, name, value)
