"""The demo's workload: packed batches, and the whole demo (two fresh processes) on the tiny shape."""
import json

import pytest
import torch

from conftest import HAS_CUDA
from fusedlora import workload


def test_packed_batches_restart_positions_at_documents():
    (ids, labels, pos), = workload.batches(1, 2, 4096, packed=True, device="cpu")
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
    rc = demo.main(["--lora", "--steps", "3", "--batch", "1", "--seq", "32", "--log-every", "1", "--out", str(tmp_path)])
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
    if torch.cuda.is_available():
        pytest.skip("the CPU run of the tiny shape")
    ap = argparse.ArgumentParser()
    workload.add_run_args(ap)
    results = []
    for options in ('{"recompute_norms": false}', ""):
        args = ap.parse_args(["--model", "tiny", "--lora", "--steps", "2", "--batch", "2", "--seq", "32", "--saved",
                              "--patch-options", options])
        args.variant = "fusedlora"
        results.append(workload.run(args))
    kept, recomputed = results
    assert kept["patch_options"] == {"recompute_norms": False} and recomputed["patch_options"] == {}
    assert kept["losses"] == recomputed["losses"]
    by_shape = [{tuple(g["shape"]): g["storages"] for g in r["saved"]["largest"]} for r in results]
    tokens_by_hidden = (64, workload.SHAPES["tiny"]["hidden_size"])
    assert by_shape[0][tokens_by_hidden] - by_shape[1][tokens_by_hidden] == 3
    per_norm = 64 * tokens_by_hidden[1] * 4
    assert abs((kept["saved"]["gib"] - recomputed["saved"]["gib"]) * 2**30 - (3 * per_norm - tokens_by_hidden[1] * 4)) < 1
    with pytest.raises(SystemExit, match="only for the fusedlora"):
        args.variant, args.patch_options = "hf", '{"recompute_norms": false}'
        workload.run(args)
