"""A patched HF + PEFT model under FSDP2 (fully_shard per decoder layer) and DDP in two processes (gloo and
Triton's interpreter on CPU; NCCL where two GPUs exist): per-step global loss and the trained LoRA weights
against an unsharded, unpatched model taking the same steps (tests/hf_dist_worker.py). Variants: patched,
patched with offloaded checkpointing, patched with HF's gradient checkpointing, QLoRA (bitsandbytes NF4 stored in fp32, sharded by FSDP2: the quant
state comes from the Linear4bit module), and the unpatched model (the harness itself)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("hf_dist_worker.py")
ROOT = WORKER.parent.parent


CPU_VARIANTS = ["patched", "offload", "gc", "qlora", "unpatched"]
GPU_VARIANTS = ["patched", "offload", "gc", "qlora"]


def _launch(kind, variants, device):
    """One torchrun launch checking `variants` one after another (each prints its OK line on both ranks)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            kind,
            ",".join(variants),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def launches():
    """(kind, device) -> the launch of all that device's variants, run once per module (a launch's start-up,
    two interpreters importing torch, transformers and peft, cost as much as a variant's check)."""
    done = {}

    def launch(kind, device):
        if (kind, device) not in done:
            done[kind, device] = _launch(kind, CPU_VARIANTS if device == "cpu" else GPU_VARIANTS, device)
        return done[kind, device]

    return launch


def _assert_variant_ok(r, kind, variant, variants):
    """Both ranks printed this variant's OK line (a failing variant ends the launch: its traceback is here, and
    the variants after it were not run); after the last one the launch exits cleanly."""
    assert r.stdout.count(f"{kind.upper()} {variant} OK") == 2, r.stdout[-3000:] + r.stderr[-6000:]
    if variant == variants[-1]:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="GPU machines run the NCCL version (triton 3.6's interpreter "
    "beside the GPUs cannot run glu_lora_bwd's loop)",
)
def test_two_processes_cpu(kind, variant, launches):
    _assert_variant_ok(launches(kind, "cpu"), kind, variant, CPU_VARIANTS)


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus(kind, variant, launches):
    _assert_variant_ok(launches(kind, "cuda"), kind, variant, GPU_VARIANTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs: build_tools/multi_gpu_check.py itself (8B, 20 steps)")
def test_multi_gpu_check_and_example_on_cpu():
    """build_tools/multi_gpu_check.py end to end with two gloo processes: examples/fsdp2_qlora.py patched and
    unpatched under FSDP2 (with its CPUOffloadPolicy option), and patched in one process over the same global
    batch."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "build_tools" / "multi_gpu_check.py"),
            "--gpus",
            "2",
            "--model",
            "tiny",
            "--mode",
            "lora",
            "--steps",
            "3",
            "--seq",
            "32",
            "--global-batch",
            "2",
            "--loss-tol",
            "1e-5",
            "--weight-tol",
            "1e-5",
            "--cpu-offload",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all checks passed" in r.stdout and "| patched N |" in r.stdout


def test_example_names_a_global_batch_the_ranks_cannot_split():
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "fsdp2_qlora.py"),
            "--model",
            "tiny",
            "--global-batch",
            "3",
            "--steps",
            "1",
            "--seq",
            "16",
            "--mode",
            "lora",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode != 0
    assert "--global-batch 3 must be a multiple of the 2 ranks" in r.stdout + r.stderr
