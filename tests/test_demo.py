"""The demo's workload: packed batches, and the whole demo (two fresh processes) on the tiny shape; the
benchmarks' workload on top of it (benchmarks/workload.py)."""

import json

import pytest
import torch

from fusedlora import workload
from fusedlora.testing import HAS_CUDA


def test_packed_batches_restart_positions_at_documents():
    ((ids, labels, pos),) = workload.batches(1, 2, 4096, packed=True, device="cpu")
    tokens, starts = workload.text_tokens(2 * 4096)
    assert torch.equal(ids.reshape(-1), tokens)
    flat_pos, flat_labels = pos.reshape(-1), labels.reshape(-1)
    inner = [s for s in starts if 0 < s < 2 * 4096 and s % 4096]
    assert inner, "the first 8 KiB of the stdlib should hold a document boundary"
    for s in inner:
        assert flat_pos[s] == 0 and flat_pos[s - 1] > 0 and flat_labels[s] == -100
    assert (pos[:, 0] == 0).all()
    steps = pos[:, 1:] - pos[:, :-1]
    assert ((steps == 1) | (pos[:, 1:] == 0)).all()


def test_demo_tiny_shows_loss_parity(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU demo is the 1B shape: run it through ci/gpu_e2e.sh")
    from fusedlora import demo

    rc = demo.main(
        ["--lora", "--steps", "3", "--batch", "1", "--seq", "32", "--log-every", "1", "--out", str(tmp_path)]
    )
    assert rc == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    hf, fused = results
    assert hf["variant"] == "hf" and fused["variant"] == "fusedlora" and len(fused["losses"]) == 3
    assert fused["patch"]["kinds"]["attention"]["patched"] == 2 and fused["interpreter"]
    for a, b in zip(hf["losses"], fused["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "tokens/s" in (tmp_path / "demo.md").read_text()


def test_demo_cuda_graphs_without_a_gpu_says_so(capsys):
    if HAS_CUDA:
        pytest.skip("checks the message on a machine without a GPU")
    from fusedlora import demo

    with pytest.raises(SystemExit):
        demo.main(["--cuda-graphs"])
    assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err


def test_workload_lists_saved_activations_and_passes_patch_options():
    """--saved lists what autograd keeps for the backward; --patch-options reach fusedlora.patch: without
    recompute_norms the tiny model (2 layers) keeps 3 more [tokens, hidden] norm outputs, same losses."""
    import argparse
    import dataclasses

    from benchmarks import workload as bench_workload

    if torch.cuda.is_available():
        pytest.skip("the CPU run of the tiny shape")
    ap = argparse.ArgumentParser()
    bench_workload.add_bench_args(ap)
    results = []
    for options in ('{"recompute_norms": false}', ""):
        args = ap.parse_args(
            [
                "--model",
                "tiny",
                "--lora",
                "--steps",
                "2",
                "--batch",
                "2",
                "--seq",
                "32",
                "--saved",
                "--patch-options",
                options,
            ]
        )
        spec = bench_workload.BenchSpec.from_args(args, variant="fusedlora")
        results.append(bench_workload.run(spec))
    kept, recomputed = results
    assert kept["patch_options"] == {"recompute_norms": False} and recomputed["patch_options"] == {}
    assert kept["losses"] == recomputed["losses"]
    by_shape = [{tuple(g["shape"]): g["storages"] for g in r["saved"]["largest"]} for r in results]
    tokens_by_hidden = (64, workload.SHAPES["tiny"]["hidden_size"])
    assert by_shape[0][tokens_by_hidden] - by_shape[1][tokens_by_hidden] == 3
    per_norm = 64 * tokens_by_hidden[1] * 4
    assert (
        abs((kept["saved"]["gib"] - recomputed["saved"]["gib"]) * 2**30 - (3 * per_norm - tokens_by_hidden[1] * 4)) < 1
    )
    with pytest.raises(SystemExit, match="only for the fusedlora"):
        bench_workload.run(dataclasses.replace(spec, variant="hf", patch_options={"recompute_norms": False}))


def test_run_specs_round_trip_through_the_workload_command_line():
    """A run goes to its fresh process as a command line (RunSpec.to_argv): every field, the benchmarks' own
    (BenchSpec) too, comes back the same from the workload's options, whatever its value."""
    import argparse

    from benchmarks import workload as bench_workload

    specs = [
        (workload.RunSpec(), workload.add_run_args),
        (
            workload.RunSpec(
                variant="hf",
                model="tiny",
                mode="lora",
                steps=3,
                batch=1,
                seq=32,
                gc=True,
                packed=True,
                lr=2.5e-4,
                log_every=1,
            ),
            workload.add_run_args,
        ),
        (
            workload.RunSpec(variant="fusedlora_graphs", offload=True, patch_options={"recompute_norms": False}),
            workload.add_run_args,
        ),
        (
            bench_workload.BenchSpec(
                variant="liger", profile=3, peak_tflops=500.5, saved=True, find_context=8192, context_step=512
            ),
            bench_workload.add_bench_args,
        ),
    ]
    for spec, add_args in specs:
        ap = argparse.ArgumentParser()
        ap.add_argument("--variant")
        add_args(ap)
        assert type(spec).from_args(ap.parse_args(spec.to_argv())) == spec, spec


def test_bad_patch_options_are_named():
    import argparse

    with pytest.raises(SystemExit, match="--patch-options: expected a JSON object of fusedlora.patch keyword"):
        workload.RunSpec.from_args(argparse.Namespace(variant="fusedlora", patch_options="{recompute_norms: 0}"))
    with pytest.raises(SystemExit, match="--patch-options: expected a JSON object"):
        workload.RunSpec.from_args(argparse.Namespace(variant="fusedlora", patch_options="[1, 2]"))


def test_the_benchmarks_have_moved_out_of_the_package(capsys):
    """`python -m fusedlora.bench e2e ...` says where the command went (the harness is no longer installed)."""
    from pathlib import Path

    from fusedlora import bench

    assert bench.main(["e2e", "--models", "1b"]) == 2
    assert "`python -m benchmarks.e2e --models 1b`" in capsys.readouterr().err
    assert bench.main(["context"]) == 2 and "`python -m benchmarks.context`" in capsys.readouterr().err
    package = Path(bench.__file__).parent  # (a file left here would be installed: tests/test_cli_and_wheel.py)
    for moved in ("bench_e2e", "bench_context", "bench_report", "step_profile"):
        assert not (package / f"{moved}.py").exists(), moved


def test_the_installed_workload_names_a_variant_it_does_not_build():
    """A peer's variant asked of the installed workload is refused by name, not built as plain HF+PEFT."""
    with pytest.raises(ValueError, match="variant 'liger' is not one of hf, compile"):
        workload.build("tiny", "lora", "liger", "cpu", False)
