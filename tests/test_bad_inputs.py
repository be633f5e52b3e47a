"""Bad inputs of every validation branch not covered next to its op: each raises an error naming the problem."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fusedlora import lora
from fusedlora.ops import chunked_linear_loss, fused_linear_cross_entropy
from fusedlora.quant import dequantize_gptq, dequantize_nf4, naive_dequantize_nf4
from fusedlora.testing import DEVICE

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ fused / chunked linear losses
def test_flce_bias_shape_and_dtype():
    h = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="bias must have shape \\(10,\\) and dtype torch.float32"):
        fused_linear_cross_entropy(h, w, y, bias=torch.zeros(9, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape \\(10,\\)"):
        fused_linear_cross_entropy(h, w, y, bias=torch.zeros(10, device=DEVICE, dtype=torch.float16))


def test_chunked_linear_loss_arguments():
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    t = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        chunked_linear_loss(h, w, t, "mse")
    with pytest.raises(ValueError, match="num_chunks must be >= 1, got 0"):
        chunked_linear_loss(h, w, t, lambda z, u: (z - u) ** 2, num_chunks=0)
    with pytest.raises(ValueError, match="targets have shape \\(5, 3\\), hidden \\(4, 8\\)"):
        chunked_linear_loss(h, w, torch.zeros(5, 3, device=DEVICE), lambda z, u: (z - u) ** 2)


# ------------------------------------------------------------------ NF4 state checks
def _nf4_state(n=128, nested=False, **kw):
    qs = SimpleNamespace(
        quant_type="nf4",
        blocksize=64,
        dtype=torch.float16,
        shape=torch.Size((2, n // 2)),
        absmax=torch.rand(-(-n // 64), device=DEVICE),
        code=torch.linspace(-1, 1, 16, device=DEVICE),
        nested=nested,
        state2=None,
        offset=0.0,
    )
    if nested:
        qs.absmax = torch.randint(0, 256, (-(-n // 64),), dtype=torch.uint8, device=DEVICE)
        qs.state2 = SimpleNamespace(
            absmax=torch.rand(1, device=DEVICE), code=torch.linspace(-1, 1, 256, device=DEVICE), blocksize=256
        )
    for k, v in kw.items():
        setattr(qs, k, v)
    return torch.zeros(n // 2, 1, dtype=torch.uint8, device=DEVICE), qs


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(blocksize=48), "blocksize 48 is not one bitsandbytes allows"),
        (dict(dtype=torch.int8), "output dtype is torch.int8; expected fp16, bf16 or fp32"),
        (dict(absmax=torch.rand(1)), "absmax has 1 entries, the weight needs 2"),
        (dict(absmax=torch.rand(2, dtype=torch.float64)), "absmax must be float32 when not nested, got torch.float64"),
    ],
)
def test_nf4_state_checks(change, match):
    if "absmax" in change:
        change = {"absmax": change["absmax"].to(DEVICE)}
    packed, qs = _nf4_state(**change)
    with pytest.raises(ValueError, match=match):
        dequantize_nf4(packed, qs)


def test_nf4_nested_checks():
    packed, qs = _nf4_state(nested=True)
    qs.absmax = qs.absmax.float()
    with pytest.raises(ValueError, match="nested absmax must be uint8, got torch.float32"):
        dequantize_nf4(packed, qs)
    packed, qs = _nf4_state(nested=True)
    qs.state2.blocksize = 100
    with pytest.raises(ValueError, match="state2 blocksize 100 must be a power of two"):
        dequantize_nf4(packed, qs)


def test_nf4_non_contiguous_and_wrong_device():
    packed, qs = _nf4_state()
    with pytest.raises(ValueError, match="packed weight must be contiguous"):
        dequantize_nf4(torch.zeros(64, 2, dtype=torch.uint8, device=DEVICE)[:, :1], qs)
    if DEVICE == "cpu":
        os.environ.pop("TRITON_INTERPRET")
        try:
            with pytest.raises(ValueError, match="weight is on cpu; fusedlora kernels need CUDA tensors"):
                dequantize_nf4(packed, qs)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"
    # A state apart from its weight is reported as the weight's device against the state's absmax (checked
    # first), the state's other tensors against its absmax; "meta" stands in for a second device on a CPU.
    other = "cpu" if DEVICE == "cuda" else "meta"
    code = qs.code
    qs.code = code.to(other)  # (a replaced tensor: the state is checked again, not its cached plan)
    with pytest.raises(ValueError, match=f"quant_state.code is on {other} but quant_state.absmax is on {DEVICE}"):
        dequantize_nf4(packed, qs)
    qs.code, qs.absmax = code, qs.absmax.to(other)
    with pytest.raises(ValueError, match=f"quant_state.absmax is on {other} but the weight is on {DEVICE}"):
        dequantize_nf4(packed, qs)


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
    packed, qs = _nf4_state()
    assert torch.equal(dequantize_nf4(packed, qs), naive_dequantize_nf4(packed, qs))


def test_gptq_scales_and_devices():
    qw = torch.zeros(8, 16, dtype=torch.int32, device=DEVICE)
    qz = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="scales must be a 2-D float tensor, got torch.int32"):
        dequantize_gptq(qw, qz, torch.zeros(2, 16, dtype=torch.int32, device=DEVICE), group_size=32)
    with pytest.raises(ValueError, match="out must be a contiguous torch.float16 tensor of shape \\(16, 64\\)"):
        dequantize_gptq(
            qw,
            qz,
            torch.zeros(2, 16, dtype=torch.float16, device=DEVICE),
            group_size=32,
            out=torch.empty(64, 16, dtype=torch.float16, device=DEVICE),
        )
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="scales is on cpu but qweight is on cuda"):
            dequantize_gptq(qw, qz, torch.zeros(2, 16, dtype=torch.float16), group_size=32)


# ------------------------------------------------------------------ LoRA reports
def _peft_proj(**over):
    lin = torch.nn.Linear(8, 8, bias=False)
    proj = SimpleNamespace(
        base_layer=lin,
        lora_A={"a": torch.nn.Linear(8, 2)},
        lora_B={"a": torch.nn.Linear(2, 8)},
        scaling={"a": 1.0},
        active_adapters=["a"],
        disable_adapters=False,
        merged=False,
        use_dora={"a": False},
        lora_bias={"a": False},
    )
    for k, v in over.items():
        setattr(proj, k, v)
    return proj


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(active_adapters=["a", "b"]), "2 active adapters at once"),
        (dict(lora_bias={"a": True}), "LoRA bias \\(lora_bias=True\\) is not fused"),
    ],
)
def test_lora_unsupported_features_are_reported(over, match):
    with pytest.raises(lora.UnsupportedLoRA, match=match):
        lora.get_lora_parameters(_peft_proj(**over))


def test_lora_mlp_with_bias_is_reported():
    mlp = SimpleNamespace(gate_proj=_peft_proj(), up_proj=_peft_proj(), down_proj=_peft_proj(), training=False)
    mlp.up_proj.base_layer = torch.nn.Linear(8, 8, bias=True)
    with pytest.raises(lora.UnsupportedLoRA, match="MLP projections with a bias are not fused"):
        lora.apply_lora_mlp_swiglu(mlp, torch.randn(2, 8))


def test_lora_unknown_quant_state():
    with pytest.raises(TypeError, match="unsupported quantisation state object"):
        lora.dequantize_base(torch.zeros(4, 4), object(), torch.float32)


def test_lora_quant_state_without_shape():
    with pytest.raises(ValueError, match="a quant_state with no shape"):
        lora.LoRA_O.apply(torch.randn(2, 8), torch.zeros(4, 1, dtype=torch.uint8), SimpleNamespace(), None, None, None)


# ------------------------------------------------------------------ command lines
def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_build_cli_needs_config_or_variant():
    r = _cli("fusedlora.build")
    assert r.returncode != 0 and "give --config or --variant" in r.stderr


def test_build_cli_refuses_old_arch():
    r = _cli("fusedlora.build", "--config", '{"hidden_size": 64}', "--arch", "75")
    assert r.returncode != 0 and "unsupported arch [75]: fusedlora needs sm_80 or newer" in r.stderr


def test_aot_cli_refuses_unknown_arch():
    r = _cli("build_tools.aot", "--arch", "70", "--out", "/tmp/never")
    assert r.returncode != 0 and "unsupported arch [70]" in r.stderr


def test_family_from_config_without_hidden_size():
    from fusedlora.build import family_from_config

    with pytest.raises(ValueError, match="model config has no hidden_size"):
        family_from_config({"vocab_size": 10})


# ------------------------------------------------------------------ errors in the caller's terms
def _block():
    from fusedlora.testing import make

    return make(r=4)


def test_lora_input_errors_name_the_function_and_argument(monkeypatch):
    blk = _block()
    with pytest.raises(
        ValueError,
        match=r"LoRA_QKV \(apply_lora_qkv\): the input X has shape \(2, 3, 63\) but the "
        r"weight takes 64 input features",
    ):
        lora.apply_lora_qkv(blk.self_attn, torch.randn(2, 3, 63, device=DEVICE))
    with pytest.raises(ValueError, match=r"LoRA_MLP \(apply_lora_mlp_\*\): the input X has shape \(5, 32\)"):
        lora.apply_lora_mlp_swiglu(blk.mlp, torch.randn(5, 32, device=DEVICE))
    with pytest.raises(
        TypeError, match=r"LoRA_O \(apply_lora_o\): the input X must be a float tensor, got torch.int64"
    ):
        lora.apply_lora_o(blk.self_attn, torch.ones(2, 64, dtype=torch.int64, device=DEVICE))
    with pytest.raises(
        TypeError,
        match=r"the input X is torch.float16 but the base weight is torch.float32 and "
        r"autocast is off \(PEFT's layer raises here too\)",
    ):
        lora.apply_lora_o(blk.self_attn, torch.randn(2, 64, device=DEVICE, dtype=torch.float16))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(
            ValueError, match=r"LoRA_MLP \(apply_lora_mlp_\*\): X is on cpu; fusedlora kernels need CUDA"
        ):
            lora.apply_lora_mlp_swiglu(blk.mlp, torch.randn(2, 64))


def test_lora_int8_base_is_unsupported():
    proj = _peft_proj()
    proj.base_layer = SimpleNamespace(weight=torch.zeros(8, 8, dtype=torch.int8), bias=None)
    with pytest.raises(lora.UnsupportedLoRA, match="keeps a torch.int8 weight with no 4-bit quant state"):
        lora.get_lora_parameters(proj)


def test_rms_norm_empty_last_dimension():
    from fusedlora.ops import rms_norm

    with pytest.raises(
        ValueError, match=r"rms_norm: x has shape \(4, 0\): its last dimension \(the one normalised\) is empty"
    ):
        rms_norm(torch.randn(4, 0, device=DEVICE), torch.ones(0, device=DEVICE))


def test_rope_shape_errors_print_real_alternatives():
    from fusedlora.ops import rope

    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos/sin have shape \(1, 4, 8\); expected \[1, 5, rotary_dim\] \(or a"):
        rope(q, q, torch.randn(1, 4, 8, device=DEVICE), torch.randn(1, 4, 8, device=DEVICE))
    q2 = torch.randn(3, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \[3, 5, rotary_dim\] or \[1, 5, rotary_dim\]"):
        rope(q2, q2, torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE))


def test_chunked_linear_loss_refuses_a_reducing_loss():
    h, w = torch.randn(6, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    t = torch.randn(6, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"loss_fn must return per-item losses \(reduction='none'\).*it returned \(\)"):
        chunked_linear_loss(h, w, t, F.mse_loss, num_chunks=2)
    ok = chunked_linear_loss(h, w, t, lambda z, u: F.mse_loss(z, u, reduction="none"), num_chunks=2)
    assert torch.allclose(ok, F.mse_loss(F.linear(h, w), t))


def test_selfcheck_help_prints_help_and_runs_nothing():
    r = _cli("fusedlora.selfcheck", "--help")
    assert r.returncode == 0 and "usage: python -m fusedlora.selfcheck" in r.stdout and "PASS" not in r.stdout
