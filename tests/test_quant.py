"""NF4/FP4 (bitsandbytes) and GPTQ dequantisation (fusedlora.quant): reference comparisons, property tests,
an independent GPTQ reference, quant-state checks, bad input, torch.compile."""

import os
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedlora
from fusedlora.quant import dequantize_gptq, dequantize_nf4, naive_dequantize_gptq, naive_dequantize_nf4
from fusedlora.testing import (
    COMPILE_BACKEND,
    DEVICE,
    HAS_CUDA,
    assert_close,
    assert_compiled_matches_eager,
    fuzz_settings,
    fuzz_tol,
    nf4_state_stub,
    pack_int_words,
    random_gptq_tensors,
    rel_err,
    reset_dynamo,
)

bnbf = pytest.importorskip("bitsandbytes.functional")


def _trunc_bf16(x32):
    """fp32 -> bf16 by truncation (what the interpreter does)."""
    return (x32.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _assert_matches(ours, ref, ours_fp32=None):
    if ours.dtype != torch.bfloat16 or HAS_CUDA:
        assert torch.equal(ours, ref), f"max diff {(ours.float() - ref.float()).abs().max().item()}"
    else:
        assert ours_fp32 is not None
        assert torch.equal(ours, _trunc_bf16(ours_fp32)) and torch.equal(ours_fp32.to(torch.bfloat16), ref)


SHAPES = [(1, 64), (33, 70), (7, 333), (1, 1), (64, 4096)] + ([(4096, 4096), (11008, 4096)] if HAS_CUDA else [])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_bit_identical_to_bitsandbytes(shape, dtype, nested, quant_type):
    w = torch.randn(*shape, dtype=dtype, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    ref = bnbf.dequantize_4bit(q, qs)
    ours = dequantize_nf4(q, qs)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == dtype
    fp32 = None
    if dtype == torch.bfloat16 and not HAS_CUDA:
        qs.dtype = torch.float32
        fp32 = dequantize_nf4(q, qs)
        qs.dtype = dtype
    _assert_matches(ours, ref, fp32)
    assert torch.equal(naive_dequantize_nf4(q, qs), ref)  # the reference itself is exact


def _bnb_flat_dequant(q, qs):
    """bitsandbytes' dequantisation with flat blocks, as its CUDA kernel and quantizer define them.

    On CPU, bitsandbytes 0.50.2 routes even-width rows to a C kernel that indexes absmax per row when a
    row is not a multiple of the blocksize (seen with 3 x 4160, blocksize 128: max error 2.08 against
    0.50 for its own portable path); its portable implementation is the one that agrees with its
    quantizer and CUDA kernel, so the CPU comparison uses that."""
    if HAS_CUDA:
        return bnbf.dequantize_4bit(q, qs)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
    return _dequantize_4bit_compute(
        q.view(torch.uint8).reshape(-1), absmax.float(), qs.code, qs.blocksize, qs.shape, qs.dtype
    )


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_every_blocksize(blocksize, nested):
    w = torch.randn(3, 4096 + 64, dtype=torch.float16, device=DEVICE)  # numel not a multiple of blocksize
    q, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    ref = _bnb_flat_dequant(q, qs)
    assert torch.equal(dequantize_nf4(q, qs), ref)
    assert torch.equal(naive_dequantize_nf4(q, qs), ref)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_nf4_quant_storage_and_params4bit(storage):
    w = torch.randn(16, 128, dtype=torch.float16, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    assert q.dtype == storage
    ref = bnbf.dequantize_4bit(q, qs)
    assert torch.equal(dequantize_nf4(q, qs), ref)

    class Params4bitLike(torch.Tensor):  # what bnb.nn.Params4bit looks like to us: data + .quant_state
        pass

    p = q.as_subclass(Params4bitLike)
    p.quant_state = qs
    out = torch.empty_like(ref)
    got = dequantize_nf4(p, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nf4_output_dtype_from_fp32_state(dtype):
    """dtype= rounds the fp32 values once: equal to bnb's fp32 dequantisation cast to dtype."""
    w = torch.randn(33, 70, dtype=torch.float32, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref32 = bnbf.dequantize_4bit(q, qs)
    ours = dequantize_nf4(q, qs, dtype=dtype)
    assert ours.dtype == dtype and ours.shape == ref32.shape
    _assert_matches(ours, ref32.to(dtype), dequantize_nf4(q, qs))
    with pytest.raises(ValueError, match="out must be a torch.(float16|bfloat16) tensor of shape \\(33, 70\\)"):
        dequantize_nf4(q, qs, out=torch.empty(33, 70, device=DEVICE), dtype=dtype)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,extra", [((64, 128), 32), ((37, 192), 5), ((3, 4096), 16)])
def test_nf4_into_rows_of_a_wider_buffer(shape, extra, nested):
    """out= a [rows, in] block of a wider buffer (the LoRA MLP's [W | s B]): the same values as the
    contiguous output, and the columns beside the block untouched."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    w = torch.randn(*shape, dtype=torch.float32, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    ref = dequantize_nf4(q, qs, dtype=dtype)
    buf = torch.full((shape[0], shape[1] + extra), 3.0, dtype=dtype, device=DEVICE)
    got = dequantize_nf4(q, qs, out=buf[:, : shape[1]], dtype=dtype)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref)
    assert bool((buf[:, shape[1] :] == 3.0).all())
    with pytest.raises(ValueError, match="out must be contiguous, or a 2-D block of rows"):
        dequantize_nf4(q, qs, out=torch.empty(shape[1], shape[0], dtype=dtype, device=DEVICE).t(), dtype=dtype)


def test_nf4_bad_input():
    w = torch.randn(8, 64, dtype=torch.float16, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    with pytest.raises(ValueError, match="holds 255 bytes but shape \\(8, 64\\) needs 256"):
        dequantize_nf4(q[:-1], qs)
    with pytest.raises(ValueError, match="has no quant_state"):
        dequantize_nf4(q)
    state2 = qs.state2
    qs.state2 = None
    with pytest.raises(ValueError, match="nested .* but has no state2"):
        dequantize_nf4(q, qs)
    qs.state2 = state2
    a8, s8 = bnbf.quantize_blockwise(torch.randn(64, device=DEVICE))  # an 8-bit state, not 4-bit
    with pytest.raises(ValueError, match="quant_type None; expected 'nf4' or 'fp4'"):
        dequantize_nf4(q, s8)
    with pytest.raises(ValueError, match="out must be a torch.float16 tensor of shape \\(8, 64\\)"):
        dequantize_nf4(q, qs, out=torch.empty(8, 64, dtype=torch.float32, device=DEVICE))


# (fp32 quant_storage: bitsandbytes packs only byte counts divisible by 4)
VIEW_CASES = [(s, torch.uint8) for s in [(64, 128), (64, 64), (3, 5), (1, 3), (1, 2), (2, 1), (1, 1)]] + [
    ((64, 128), torch.float32),
    ((64, 64), torch.float32),
]


@pytest.mark.parametrize("view", ["transposed", "flat", "packed"])
@pytest.mark.parametrize("shape,storage", VIEW_CASES, ids=str)
def test_nf4_packed_views_follow_bitsandbytes(shape, storage, view):
    """bitsandbytes hands a packed weight with leading dimension 1 (the transposed view [1, n_bytes], or one
    byte) back transposed: the same shape and bits here, never the untransposed weight."""
    w = torch.randn(*shape, dtype=torch.float16, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    packed = {"transposed": q.t(), "flat": q.reshape(-1), "packed": q}[view]
    ref = bnbf.dequantize_4bit(packed, qs)
    ours = dequantize_nf4(packed, qs)
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    out = torch.empty(qs.shape, dtype=qs.dtype, device=DEVICE)  # out= is written in the state's shape
    got = dequantize_nf4(packed, qs, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == ref.shape and torch.equal(got, ref)


def test_nf4_transposed_view_of_a_3d_weight_is_refused():
    w = torch.randn(2, 3, 64, dtype=torch.float16, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with pytest.raises(
        ValueError,
        match=r"dequantize_nf4: the packed weight has shape \(1, 192\), the transposed "
        r"form .* but the weight's shape \(2, 3, 64\) is not 2-D",
    ):
        dequantize_nf4(q.t(), qs)
    assert torch.equal(dequantize_nf4(q, qs), bnbf.dequantize_4bit(q, qs))


GPTQ_CASES = [
    (64, 128, 4, 32, False),
    (128, 96, 4, -1, False),
    (256, 40, 4, 64, True),
    (64, 64, 8, 16, False),
    (64, 48, 2, 32, True),
    (32, 1, 4, 32, False),
]


if HAS_CUDA:
    GPTQ_CASES += [(8192, 8192, 4, 128, False), (4096, 11008, 4, 128, True)]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPTQ_CASES, ids=str)
def test_gptq_matches_format_reference(case, out_dtype, fmt, transpose):
    in_f, out_f, bits, group, act = case
    qw, qz, sc, g = random_gptq_tensors(in_f, out_f, bits, group, act)
    ours = dequantize_gptq(
        qw, qz, sc, g, bits=bits, group_size=group, format=fmt, out_dtype=out_dtype, transpose=transpose
    )
    ref = naive_dequantize_gptq(qw, qz, sc, g, bits=bits, group_size=group, format=fmt, out_dtype=out_dtype)
    ref = ref.t() if transpose else ref
    assert ours.shape == ref.shape and ours.dtype == out_dtype
    fp32 = None
    if out_dtype == torch.bfloat16 and not HAS_CUDA:
        fp32 = dequantize_gptq(
            qw, qz, sc, g, bits=bits, group_size=group, format=fmt, out_dtype=torch.float32, transpose=transpose
        )
    _assert_matches(ours, ref, fp32)


def test_gptq_symmetric_zero_point():
    """Symmetric GPTQ stores zero 2^(bits-1) - 1 in v1 format: w = (q - 8) * s."""
    in_f, out_f = 64, 16
    qw, _, sc, _ = random_gptq_tensors(in_f, out_f, 4, 32, False)
    qz = torch.full((2, 2), 0x77777777, dtype=torch.int32, device=DEVICE)
    w = (
        dequantize_gptq(qw, qz, sc, group_size=32, out_dtype=torch.float32)
        if not HAS_CUDA
        else dequantize_gptq(qw, qz, sc.float(), group_size=32)
    )
    q = (qw.unsqueeze(1) >> (torch.arange(8, device=DEVICE, dtype=torch.int32) * 4)[None, :, None]) & 15
    expect = ((q.reshape(in_f, out_f) - 8).float() * sc.float().repeat_interleave(32, 0)).t()
    assert torch.equal(w.float(), expect)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda qw, qz, sc, g: dequantize_gptq(qw, qz, sc, bits=3), "bits=3 is not supported"),
        (lambda qw, qz, sc, g: dequantize_gptq(qw.float(), qz, sc), "qweight must be a 2-D int32"),
        (lambda qw, qz, sc, g: dequantize_gptq(qw, qz[:, :-1], sc, group_size=32), "qzeros has shape"),
        (lambda qw, qz, sc, g: dequantize_gptq(qw, qz, sc[:, :-1], group_size=32), "scales has 127 columns"),
        (lambda qw, qz, sc, g: dequantize_gptq(qw, qz, sc, group_size=16), "gives 4 groups but scales has 2"),
        (
            lambda qw, qz, sc, g: dequantize_gptq(qw, qz, sc, g_idx=torch.zeros(5, dtype=torch.int32, device=DEVICE)),
            "g_idx must be an integer tensor of shape \\(64,\\)",
        ),
        (lambda qw, qz, sc, g: dequantize_gptq(qw, qz, sc, group_size=32, format="awq"), "format must be one of"),
    ],
)
def test_gptq_bad_input(bad, match):
    qw, qz, sc, g = random_gptq_tensors(64, 128, 4, 32, False)
    with pytest.raises(ValueError, match=match):
        bad(qw, qz, sc, g)


def test_nf4_state_checked_once_and_again_when_its_tensors_change():
    """The dequantiser caches what it checked on the quant state; a state whose tensors are replaced (as
    QuantState.to does) or whose layout changes is read afresh: never a stale plan's values."""
    w1, w2 = (torch.randn(32, 64, device=DEVICE) for _ in range(2))
    q1, qs1 = bnbf.quantize_4bit(w1, blocksize=64, compress_statistics=True, quant_type="nf4")
    q2, qs2 = bnbf.quantize_4bit(w2, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(dequantize_nf4(q1, qs1), naive_dequantize_nf4(q1, qs1))
    plan = qs1._fusedlora_nf4_plan
    assert torch.equal(dequantize_nf4(q1, qs1), naive_dequantize_nf4(q1, qs1)) and qs1._fusedlora_nf4_plan is plan
    qs1.absmax, qs1.offset, qs1.state2 = qs2.absmax, qs2.offset, qs2.state2  # another weight's statistics
    assert qs1._fusedlora_nf4_plan is plan  # (stale until the next call)
    assert torch.equal(dequantize_nf4(q2, qs1), naive_dequantize_nf4(q2, qs2))
    assert qs1._fusedlora_nf4_plan is not plan
    qs1.blocksize = 3
    with pytest.raises(ValueError, match="blocksize 3 is not one bitsandbytes allows"):
        dequantize_nf4(q2, qs1)


def test_nf4_state_on_another_device_is_named():
    """A quant state whose tensors sit on different devices (or apart from the weight) is refused, naming the
    tensor and both devices (the meta device stands in for a second device on any machine)."""
    w = torch.randn(32, 64, device=DEVICE)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    code = qs.code
    qs.code = code.to("meta")
    with pytest.raises(ValueError, match="quant_state.code is on meta but quant_state.absmax is on"):
        dequantize_nf4(q, qs)
    qs.code, state2_code = code, qs.state2.code
    qs.state2.code = state2_code.to("meta")
    with pytest.raises(ValueError, match="quant_state.state2.code is on meta but quant_state.absmax is on"):
        dequantize_nf4(q, qs)
    qs.state2.code = state2_code
    q2, qs2 = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    qs2.absmax, qs2.code = qs2.absmax.to("meta"), qs2.code.to("meta")
    with pytest.raises(ValueError, match="quant_state.absmax is on meta but the weight is on"):
        dequantize_nf4(q2, qs2)


def _gptq_base(act_order, fmt, in_f=64, out_f=48, group=32):
    from fusedlora.quant import GPTQState

    torch.manual_seed(1)
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device=DEVICE).to(torch.int32)
    qz = torch.randint(-(2**31), 2**31 - 1, (in_f // group, out_f // 8), dtype=torch.int64, device=DEVICE).to(
        torch.int32
    )
    sc = (torch.rand(in_f // group, out_f, device=DEVICE) * 0.01).half()
    g = (torch.randperm(in_f, device=DEVICE) // group).to(torch.int32) if act_order else None
    return qw, GPTQState(qz, sc, g, 4, group, fmt)


@pytest.mark.parametrize("kind", ["plain", "nf4", "nf4_nested", "fp4_nested_fp16", "gptq", "gptq_v2_act_order"])
def test_base_weight_crosses_a_custom_op_as_named_fields(kind):
    """base_arguments / base_from_arguments, the form in which the LoRA ops and fusedlora::dequantize take a
    base weight (tensors in BASE_TENSORS order, BaseLayout's named scalars): every kind comes back with its
    state's fields and tensors, and dequantises to the same weight."""
    from fusedlora.quant import BASE_TENSORS, _synthetic_nf4, base_arguments, base_from_arguments, dequantize_base

    if kind == "plain":
        W, quant = torch.randn(5, 7, device=DEVICE), None
    elif kind.startswith("gptq"):
        W, quant = _gptq_base("act_order" in kind, "gptq_v2" if "v2" in kind else "gptq")
    else:
        W, quant = _synthetic_nf4(
            (33, 70), "nested" in kind, DEVICE, torch.float16 if "fp16" in kind else torch.float32
        )
        quant.quant_type = kind[:3]
    tensors, layout = base_arguments(W, quant)
    assert len(tensors) == len(BASE_TENSORS) and tensors[0] is W
    assert (layout.out_features, layout.in_features) == tuple(dequantize_base(W, quant, torch.float32).shape)
    W2, quant2 = base_from_arguments(tensors, layout)
    assert W2 is W
    if quant is None:
        assert quant2 is None and layout.quant_format == "plain"
    elif kind.startswith("gptq"):
        assert quant2 == quant and layout.quant_format == quant.format
    else:
        for field in ("absmax", "code"):
            assert getattr(quant2, field) is getattr(quant, field)
        assert (quant2.blocksize, quant2.dtype, quant2.quant_type, quant2.nested, tuple(quant2.shape)) == (
            quant.blocksize,
            quant.dtype,
            quant.quant_type,
            quant.nested,
            tuple(quant.shape),
        )
        if quant.nested:
            assert quant2.state2.absmax is quant.state2.absmax and quant2.state2.blocksize == quant.state2.blocksize
            assert float(quant2.offset) == quant.offset
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_base(W2, quant2, dtype), dequantize_base(W, quant, dtype))


def test_base_arguments_refuse_an_unknown_state():
    from fusedlora.quant import base_arguments

    with pytest.raises(TypeError, match="unsupported quantisation state object"):
        base_arguments(torch.zeros(4, 4), object())


# -------------------------------------------------------------------------- state checks, bad input


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
    packed, qs = nf4_state_stub(**change)
    with pytest.raises(ValueError, match=match):
        dequantize_nf4(packed, qs)


def test_nf4_nested_checks():
    packed, qs = nf4_state_stub(nested=True)
    qs.absmax = qs.absmax.float()
    with pytest.raises(ValueError, match="nested absmax must be uint8, got torch.float32"):
        dequantize_nf4(packed, qs)
    packed, qs = nf4_state_stub(nested=True)
    qs.state2.blocksize = 100
    with pytest.raises(ValueError, match="state2 blocksize 100 must be a power of two"):
        dequantize_nf4(packed, qs)


def test_nf4_non_contiguous_and_wrong_device():
    packed, qs = nf4_state_stub()
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


# ----------------------------------------------------------------------------------- property tests


FUZZ = fuzz_settings()


@FUZZ
@given(st.data())
def test_fuzz_dequantize_gptq(data):
    from fusedlora.testing import pack_int_words

    bits = data.draw(st.sampled_from([2, 4, 8]))
    per = 32 // bits
    group = data.draw(st.sampled_from([16, 32, 64, -1]))
    n_in = data.draw(st.sampled_from([64, 128, 192]))
    n_out = per * data.draw(st.integers(1, 6))
    act_order = data.draw(st.booleans())
    fmt = data.draw(st.sampled_from(["gptq", "gptq_v2"]))
    out_dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    gs = n_in if group == -1 else group
    n_groups = n_in // gs
    q = torch.randint(0, 2**bits, (n_in, n_out))
    z = torch.randint(1, 2**bits, (n_groups, n_out))
    s = (torch.rand(n_groups, n_out) * 0.1 + 0.01).to(torch.float16)
    g_idx = (torch.randperm(n_in) // gs) if act_order else torch.arange(n_in) // gs
    qweight, qzeros = pack_int_words(q, bits, 0), pack_int_words(z - 1 if fmt == "gptq" else z, bits, 1)
    out = dequantize_gptq(
        qweight.to(DEVICE),
        qzeros.to(DEVICE),
        s.to(DEVICE),
        g_idx.to(DEVICE, torch.int32) if act_order else None,
        bits=bits,
        group_size=group,
        format=fmt,
        out_dtype=out_dtype,
    )
    want = ((q - z[g_idx]).double() * s.double()[g_idx]).t().to(DEVICE)
    assert out.dtype == out_dtype
    assert_close(out, want, 1e-6 if out_dtype == torch.float32 else fuzz_tol(out_dtype))


# -------------------------------------------------------------------- an independent GPTQ reference


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 16, True), (8, 64, False), (2, 32, True)])
def test_gptq_against_an_independent_reference(bits, group, act_order, fmt):
    """Integer weights, zeros and scales are drawn, packed as the format says (zeros stored minus one in
    'gptq'), and the kernel's output is compared element-wise with (q - z) * s computed from the draws."""
    g = torch.Generator().manual_seed(bits * 100 + group)
    n_in, n_out = 128, 48
    q = torch.randint(0, 2**bits, (n_in, n_out), generator=g)
    n_groups = n_in // group
    z = torch.randint(1, 2**bits, (n_groups, n_out), generator=g)
    s = torch.rand(n_groups, n_out, generator=g) * 0.1 + 0.01
    g_idx = (torch.randperm(n_in, generator=g) // group) if act_order else torch.arange(n_in) // group
    stored_z = z - 1 if fmt == "gptq" else z
    qweight, qzeros = pack_int_words(q, bits, 0), pack_int_words(stored_z, bits, 1)
    expect = ((q - z[g_idx]).double() * s.double()[g_idx]).t()  # [out, in]
    out = dequantize_gptq(
        qweight.to(DEVICE),
        qzeros.to(DEVICE),
        s.to(DEVICE, torch.float16),
        g_idx.to(DEVICE, torch.int32) if act_order else None,
        bits=bits,
        group_size=group,
        format=fmt,
        out_dtype=torch.float32,
    )
    assert out.shape == (n_out, n_in)
    s16 = s.to(torch.float16).double()
    assert_close(out, ((q - z[g_idx]).double() * s16[g_idx]).t().to(DEVICE), 1e-6)
    assert rel_err(out, expect.to(DEVICE)) < 1e-3  # the scales' fp16 rounding only


# ------------------------------------------------------------------------------------ torch.compile


fresh_dynamo = pytest.fixture(reset_dynamo)  # (the compile cases': Dynamo's caches empty around each)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("which", ["nf4", "nf4_out", "gptq", "gptq_transpose"])
def test_dequantize_compiles_and_matches_eager(which):
    from fusedlora.testing import random_gptq_tensors

    if which.startswith("nf4"):
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(
            torch.randn(48, 64, device=DEVICE), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        if which == "nf4":
            fn = lambda p: fusedlora.quant.dequantize_nf4(p, state, dtype=torch.float16)  # noqa: E731
        else:
            fn = lambda p: fusedlora.quant.dequantize_nf4(p, state, out=torch.empty(48, 64, device=DEVICE)) * 1  # noqa: E731
        inputs = (packed,)
    else:
        qweight, qzeros, scales, g_idx = random_gptq_tensors(64, 96, 4, 32, True)
        fn = lambda q: fusedlora.quant.dequantize_gptq(q, qzeros, scales, g_idx, transpose=which.endswith("transpose"))  # noqa: E731
        inputs = (qweight,)
    assert_compiled_matches_eager(fn, inputs, 0.0)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("which", ["nf4", "gptq"])
def test_dequantize_out_is_checked_under_compile(which):
    """Compiled, the result is copied into out=: an out of another dtype or shape is refused as in eager mode,
    never cast or broadcast into silently; a transposed NF4 view comes back transposed, as in eager mode."""
    from fusedlora.testing import random_gptq_tensors

    if which == "nf4":
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(torch.randn(48, 64, device=DEVICE), blocksize=64, quant_type="nf4")
        fn = torch.compile(lambda p, out: fusedlora.quant.dequantize_nf4(p, state, out=out), backend=COMPILE_BACKEND)
        shape, dtype = (48, 64), torch.float32
        transposed = torch.compile(lambda p: fusedlora.quant.dequantize_nf4(p, state), backend=COMPILE_BACKEND)(
            packed.t()
        )
        assert torch.equal(transposed, bnbf.dequantize_4bit(packed.t(), state))
    else:
        packed, qzeros, scales, g_idx = random_gptq_tensors(64, 96, 4, 32, True)
        fn = torch.compile(
            lambda q, out: fusedlora.quant.dequantize_gptq(q, qzeros, scales, g_idx, out=out), backend=COMPILE_BACKEND
        )
        shape, dtype = (96, 64), torch.float16
    op = f"dequantize_{which}"
    for bad in (
        torch.empty(shape, dtype=torch.bfloat16, device=DEVICE),
        torch.empty(2, *shape, dtype=dtype, device=DEVICE),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{op}: out must be a {dtype} tensor of shape {shape}")):
            fn(packed, bad)
    good = torch.empty(shape, dtype=dtype, device=DEVICE)
    assert fn(packed, good).data_ptr() == good.data_ptr()
