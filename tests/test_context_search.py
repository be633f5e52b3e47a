"""The longest-sequence search of `python -m benchmarks.context`: doubling then bisection (a synthetic
memory limit), the benchmark workload's --find-context on the tiny shape (CPU: every length fits), the report
table; the e2e benchmark's table and options; the peers' handling."""

from benchmarks import context as bench_context
from benchmarks import workload


def test_search_doubles_then_bisects_to_the_granularity():
    calls = []

    def fits(n):
        calls.append(n)
        return {"tokens_per_s": 1.0 / n} if n <= 21_000 else None

    longest, result, tried = workload.search_longest(fits, 1024, 1 << 20, 1024)
    assert longest == 20_480 and result == {"tokens_per_s": 1.0 / 20_480}
    assert calls[:6] == [1024, 2048, 4096, 8192, 16384, 32768]  # doubling until the first failure
    assert all(16384 <= n <= 32768 for n in calls[6:]) and len(calls) <= 6 + 4
    assert tried == [(n, n <= 21_000) for n in calls]


def test_search_edges():
    assert workload.search_longest(lambda n: None, 1024, 4096, 1024)[0] == 0  # nothing fits
    longest, _, tried = workload.search_longest(lambda n: {}, 1024, 5000, 1024)  # everything fits: up to the limit
    assert longest == 5000 and [n for n, _ in tried] == [1024, 2048, 4096, 5000]


def test_find_context_on_the_tiny_shape():
    args = workload.BenchSpec(
        variant="fusedlora",
        model="tiny",
        mode="lora",
        gc=False,
        offload=True,
        packed=False,
        steps=2,
        batch=1,
        seq=32,
        lr=1e-4,
        log_every=1,
        profile=0,
        peak_tflops=790.0,
        find_context=64,
    )
    r = workload.run(args)
    assert r["longest"] == 64 and r["tried"] == [(32, True), (64, True)] and r["tokens_per_s"] > 0


def test_context_report_table():
    rows = [
        {"label": "hf+gc", "longest": 8192, "tokens_per_s": 1000.0, "peak_gib": 70.0, "tried": [(4096, True)]},
        {"label": "fusedlora+offload", "longest": 65536, "tokens_per_s": 2500.0, "peak_gib": 60.0, "tried": []},
        {"label": "liger+gc", "error": "exit code 1"},
    ]
    table = bench_context.markdown(rows)
    assert "| fusedlora+offload | 65,536 | 8.0x | 2,500 | 60.0 |" in table and "failed: exit code 1" in table


def test_offload_is_refused_for_a_variant_without_it():
    import pytest

    args = workload.BenchSpec(
        variant="hf",
        model="tiny",
        mode="lora",
        gc=False,
        offload=True,
        packed=False,
        steps=2,
        batch=1,
        seq=32,
        lr=1e-4,
        log_every=1,
        profile=0,
        peak_tflops=790.0,
        find_context=64,
    )
    with pytest.raises(SystemExit, match="--offload is fusedlora's offloaded checkpointing: only for the fusedlora"):
        workload.run(args)


def test_bench_context_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert bench_context.main(["--model", "tiny"]) == 2
    assert "python -m benchmarks.context needs a CUDA GPU" in capsys.readouterr().err


def test_context_table_gives_tokens_per_second_at_each_length_tried():
    rows = [
        {
            "label": "fusedlora+offload",
            "longest": 8192,
            "tokens_per_s": 900.0,
            "peak_gib": 9.0,
            "tried": [(4096, True), (8192, True), (16384, False)],
            "rates": [(4096, 1500.0), (8192, 900.0)],
        }
    ]
    assert "4096: 1,500, 8192: 900, 16384: n |" in bench_context.markdown(rows)


def test_e2e_table_compares_offloaded_runs_with_hf_checkpointing():
    from benchmarks import e2e as bench_e2e

    def row(variant, gc, offload, tps):
        return {
            "model": "1b",
            "mode": "qlora",
            "variant": variant,
            "gc": gc,
            "offload": offload,
            "tokens_per_s": tps,
            "step_ms": 1.0,
            "peak_gib": 1.0,
            "first_step_s": 1.0,
            "losses": [2.0],
            "fusedlora_jit_kernels": 0,
        }

    offloaded = dict(row("fusedlora", False, True, 150.0), reserved_gib=2.5)
    table = bench_e2e.markdown([row("hf", False, False, 100.0), row("hf", True, False, 50.0), offloaded])
    assert "| 1b | qlora | offload | fusedlora | 150 | 3.00x | 1.0 | 1.00 | 2.50 |" in table
    assert "| 1b | qlora | on | hf | 50 | 1.00x |" in table


def test_e2e_bad_gc_setting_is_named(capsys):
    import pytest

    from benchmarks import e2e as bench_e2e

    with pytest.raises(SystemExit):
        bench_e2e.main(["--gc", "on,sometimes"])
    assert "--gc: expected a comma list of off, on, offload, both; got 'on,sometimes'" in capsys.readouterr().err


def test_unsloth_runs_only_where_it_is_found_and_is_never_imported_here(monkeypatch, tmp_path, capsys):
    """The e2e benchmark's unsloth variant: skipped (said so) when neither installed nor in the bundle folder,
    kept when the folder has it; finding it imports nothing (Unsloth patches transformers on import), and the
    other variants' version lists leave it out."""
    import importlib.util
    import sys

    from benchmarks import report as bench_report

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(workload.UNSLOTH_PATH, raising=False)
    if importlib.util.find_spec("unsloth") is None:
        assert bench_report.selected("hf,unsloth,fusedlora", "liger") == ["hf", "fusedlora"]
        assert "Unsloth is not installed" in capsys.readouterr().err
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("raise ImportError('found, never to be imported')\n")
    monkeypatch.setenv(workload.UNSLOTH_PATH, str(tmp_path))
    assert bench_report.selected("hf,unsloth", "liger") == ["hf", "unsloth"]
    assert "unsloth" not in sys.modules and "unsloth" not in workload.versions()
    # the report's versions line takes each package from whichever run has it
    line = bench_report.measured_line(
        [
            {"device": "GPU", "versions": {"torch": "2"}},
            {"device": "GPU", "versions": {"torch": "2", "unsloth": "2026"}},
        ]
    )
    assert line.endswith("on GPU, torch 2, unsloth 2026")


def test_unsloth_variant_needs_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message without a GPU")
    with pytest.raises(SystemExit, match="the unsloth variant needs a CUDA GPU"):
        workload.main(["--variant", "unsloth", "--model", "tiny", "--steps", "1"])
