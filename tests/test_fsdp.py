"""The fused LoRA functions under FSDP2 (fully_shard, DTensor parameters) in two processes: the worker
(tests/fsdp_worker.py) compares outputs, dX and every LoRA gradient over two SGD steps with an unsharded
float64 PEFT model. On CPU: gloo and Triton's interpreter; with two GPUs also NCCL, fp32 and bf16 mixed
precision."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = WORKER.parent.parent


def _run(mode: str, device: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo and the interpreter, whatever the machine has
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count("FSDP2 OK") == 2, r.stdout


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="GPU machines run the NCCL tests (triton 3.6's interpreter, "
    "as installed beside the GPUs, cannot run glu_lora_bwd's loop: a numpy 2 scalar conversion)",
)
def test_fsdp2_cpu_fp32():
    _run("fp32", "cpu")


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs two GPUs")
def test_fsdp2_two_gpus(mode):
    _run(mode, "cuda")
