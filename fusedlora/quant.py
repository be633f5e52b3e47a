"""Dequantisation of quantised base weights: bitsandbytes NF4/FP4 and GPTQ, one kernel launch each.

- `dequantize_nf4(weight, quant_state=None, out=None)`: bit-identical to
  `bitsandbytes.functional.dequantize_4bit`, nested (double-quant) absmax included, any bnb blocksize,
  quant_storage uint8 / fp16 / bf16 / fp32 (FSDP QLoRA), output dtype from `quant_state.dtype`; no
  buffer besides `out` (reusable across steps). FP4 too (the code table comes from the quant state).
- `dequantize_gptq(qweight, qzeros, scales, g_idx=None, bits=4, ...)`: auto-gptq / gptqmodel packing,
  act-order g_idx, symmetric and asymmetric, any group size, 2/4/8 bits; fp16 or bf16 output.
Both return the weight in nn.Linear layout [out_features, in_features] (GPTQ: `transpose=True` gives
[in, out], the layout a matmul X @ W can use directly).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from csrc_triton.quant import GPTQ_DEQUANT, NF4_BLOCKSIZES

from .loader import launch
from .ops import _custom
from .ops._common import interpreting, rel_err
from .ops.nf4 import nf4_launch

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(op, msg):
    raise ValueError(f"{op}: {msg}")


def _check_out(op, out, shape, dtype, device, contiguous=False):
    """`out` has the result's shape, dtype and device: checked on the eager and the torch.compile path alike
    (there the result is copied into out, which would otherwise cast or broadcast it silently)."""
    if (
        tuple(out.shape) != tuple(shape)
        or out.dtype != dtype
        or out.device != device
        or (contiguous and not out.is_contiguous())
    ):
        _fail(
            op, f"out must be a {'contiguous ' if contiguous else ''}{dtype} tensor of shape {tuple(shape)} on {device}"
        )


# ------------------------------------------------------------------------------------------------ NF4
def naive_dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain-torch reference written from the format (same rounding steps as bitsandbytes)."""
    qs = quant_state
    a = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    codes = torch.stack([a >> 4, a & 15], dim=1).reshape(-1)
    n = math.prod(qs.shape)
    vals = qs.code.float()[codes[:n]]
    if qs.nested:
        s2 = qs.state2
        absmax = s2.code.float()[qs.absmax.to(torch.int64)]
        absmax = absmax * s2.absmax.float().repeat_interleave(s2.blocksize)[: absmax.numel()]
        absmax = absmax + qs.offset
    else:
        absmax = qs.absmax.float()
    out = vals * absmax.repeat_interleave(qs.blocksize)[:n]
    return out.to(qs.dtype).reshape(qs.shape)


def _as_quant_state(weight, quant_state):
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                "dequantize_nf4: weight has no quant_state; pass a bitsandbytes Params4bit or "
                "(packed tensor, QuantState)"
            )
    return quant_state


def dequantize_nf4(
    weight: torch.Tensor, quant_state=None, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantise a bitsandbytes 4-bit weight (NF4 or FP4) in one kernel.

    dtype (default quant_state.dtype): the output dtype. Each value is computed in fp32 as bitsandbytes
    does and rounded once, so with a float32 quant_state the result equals
    `dequantize_4bit(...).to(dtype)` without the fp32 intermediate. A packed weight whose leading dimension
    is 1 (the transposed view bitsandbytes accepts) gives the weight transposed, as dequantize_4bit does."""
    qs = _as_quant_state(weight, quant_state)
    transposed = _bnb_transposed_form(weight, qs)
    if _custom.compiling():
        dtype = qs.dtype if dtype is None else dtype
        if out is not None:
            _check_out("dequantize_nf4", out, qs.shape, dtype, weight.device)
        result = _compiled_dequantize(weight, qs, dtype, out)
    else:
        result = _dequantize_nf4(weight, qs, out, dtype)
    return result.t() if transposed else result


def _bnb_transposed_form(weight, qs) -> bool:
    """bitsandbytes' dequantize_4bit hands back `out.t()` when the packed weight's leading dimension is 1 (the
    transposed view [1, n_bytes] of its [n_bytes, 1] packing; a weight of one byte too): the same convention
    here, so that a transposed view never comes back untransposed. (`out`, when given, is still written in
    the state's own shape, as bitsandbytes does.)"""
    if not isinstance(weight, torch.Tensor) or weight.dim() == 0 or weight.shape[0] != 1:
        return False
    if len(getattr(qs, "shape", ())) > 2:
        _fail(
            "dequantize_nf4",
            f"the packed weight has shape {tuple(weight.shape)}, the transposed form whose "
            f"result bitsandbytes transposes, but the weight's shape {tuple(qs.shape)} is not 2-D; "
            f"pass the packed weight as [{(math.prod(qs.shape) + 1) // 2}, 1]",
        )
    return True


class _NF4Plan(NamedTuple):
    """What a quant state gives every launch, checked once: the kernel's tensors and scalars. `key`: (the
    state's own tensors, compared by identity; its layout, by value) as it was made from; a state whose tensors were replaced (QuantState.to) or
    whose layout changed is planned again (its output dtype is read at every call)."""

    key: tuple
    shape: tuple
    n: int
    device: torch.device
    absmax: torch.Tensor
    absmax2: torch.Tensor
    code: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    launch_shape: dict


_PLAN_ATTR = "_fusedlora_nf4_plan"


def _nf4_plan(qs, weight_device: torch.device) -> _NF4Plan:
    """weight_device: checked first against the state's absmax, so that a state apart from its weight is
    reported as that, whichever of the state's own tensors moved with it."""
    s2 = getattr(qs, "state2", None) if qs.nested else None
    tensors = (qs.absmax, qs.code, getattr(qs, "offset", None), getattr(s2, "absmax", None), getattr(s2, "code", None))
    key = (tensors, (qs.shape, qs.blocksize, getattr(qs, "quant_type", None), qs.nested))
    plan = getattr(qs, _PLAN_ATTR, None)  # (bitsandbytes' QuantState takes it; NamedTuple states plan each call)
    if plan is not None and all(a is b for a, b in zip(plan.key[0], tensors)) and plan.key[1] == key[1]:
        return plan
    op = "dequantize_nf4"
    qtype = getattr(qs, "quant_type", None)
    if qtype not in ("nf4", "fp4"):
        _fail(op, f"quant_state has quant_type {qtype!r}; expected 'nf4' or 'fp4' (a 4-bit state)")
    if qs.blocksize not in NF4_BLOCKSIZES:
        _fail(op, f"blocksize {qs.blocksize} is not one bitsandbytes allows {NF4_BLOCKSIZES}")
    n = math.prod(qs.shape)
    dev = qs.absmax.device
    if dev != weight_device:
        _fail(op, f"quant_state.absmax is on {dev} but the weight is on {weight_device}")
    n_blocks = -(-n // qs.blocksize)
    if qs.absmax.numel() < n_blocks:
        _fail(op, f"absmax has {qs.absmax.numel()} entries, the weight needs {n_blocks}")
    if qs.nested:
        if s2 is None or s2.absmax is None or s2.code is None:
            _fail(op, "quant_state is nested (double quantisation) but has no state2 with absmax and code")
        if qs.absmax.dtype != torch.uint8:
            _fail(op, f"nested absmax must be uint8, got {qs.absmax.dtype}")
        absmax, absmax2, code2 = qs.absmax, s2.absmax.float(), s2.code.float()
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=dev).reshape(1)
        blocksize2 = s2.blocksize
        if blocksize2 & (blocksize2 - 1):
            _fail(op, f"state2 blocksize {blocksize2} must be a power of two")
        for name, t in (("state2.absmax", absmax2), ("state2.code", code2)):
            if t.device != dev:
                _fail(op, f"quant_state.{name} is on {t.device} but quant_state.absmax is on {dev}")
    else:
        if qs.absmax.dtype != torch.float32:
            _fail(op, f"absmax must be float32 when not nested, got {qs.absmax.dtype}")
        absmax = absmax2 = code2 = offset = qs.absmax
        blocksize2 = 256
    if qs.code.device != dev:
        _fail(op, f"quant_state.code is on {qs.code.device} but quant_state.absmax is on {dev}")
    plan = _NF4Plan(
        key,
        tuple(qs.shape),
        n,
        dev,
        absmax,
        absmax2,
        qs.code.float(),
        code2,
        offset,
        dict(blocksize=qs.blocksize, nested=bool(qs.nested), blocksize2=blocksize2),
    )
    try:
        setattr(qs, _PLAN_ATTR, plan)
    except AttributeError:
        pass
    return plan


def _plain(weight):
    """A Parameter (bitsandbytes' Params4bit) as a plain tensor over the same memory, so that reading its
    size and pointer skips its __torch_function__; `as_subclass` issues no aten op where `.data` issues a
    detach. A subclass with its own __torch_dispatch__ (a DTensor) has no plain storage of its own: `.data`."""
    if type(weight) is torch.Tensor or not isinstance(weight, torch.Tensor):
        return weight
    if type(weight).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
        return weight.as_subclass(torch.Tensor)
    return weight.data


def _dequantize_nf4(weight, qs, out, dtype):
    op = "dequantize_nf4"
    packed = _plain(weight)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor, got {type(weight).__name__}")
    plan = _nf4_plan(qs, packed.device)
    dtype = qs.dtype if dtype is None else dtype
    if dtype not in OUT_DTYPES:
        _fail(op, f"output dtype is {dtype}; expected fp16, bf16 or fp32")
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes != (plan.n + 1) // 2:
        _fail(op, f"packed weight holds {n_bytes} bytes but shape {plan.shape} needs {(plan.n + 1) // 2}")
    if not packed.is_contiguous():
        _fail(op, "packed weight must be contiguous")
    dev = packed.device
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        _fail(op, f"weight is on {dev}; fusedlora kernels need CUDA tensors")
    if plan.device != dev:
        _fail(op, f"quant_state.absmax is on {plan.device} but the weight is on {dev}")
    blocksize = plan.launch_shape["blocksize"]
    if out is None:
        out = torch.empty(plan.shape, dtype=dtype, device=dev)
    else:
        _check_out(op, out, plan.shape, dtype, dev)
        if not out.is_contiguous() and not row_block_ok(out, blocksize):
            _fail(
                op,
                "out must be contiguous, or a 2-D block of rows (unit column stride, rows a multiple of the "
                f"blocksize {blocksize} long) of a wider buffer",
            )
    # the kernel reads bytes from the start of the packed buffer: any contiguous shape, any storage dtype
    data = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    nf4_launch(data, plan.absmax, plan.absmax2, plan.code, plan.code2, plan.offset, out, plan.n, **plan.launch_shape)
    return out


def row_block_ok(out: torch.Tensor, blocksize: int) -> bool:
    """`out` is a block of rows of a wider buffer that dequantize_nf4 can write in place: 2-D, unit column
    stride, rows a whole number of quantisation blocks long."""
    return (
        out.dim() == 2
        and out.stride(1) == 1
        and out.stride(0) >= out.shape[1]
        and out.shape[1] % blocksize == 0
        and out.shape[0] < 65536
    )  # rows go on the grid's second axis


# ----------------------------------------------------------------------------------------------- GPTQ
GPTQ_BITS = (2, 4, 8)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # v1 (auto-gptq) stores zero - 1


def _unpack_rows(packed, bits):
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def naive_dequantize_gptq(qweight, qzeros, scales, g_idx=None, bits=4, group_size=None, format="gptq", out_dtype=None):
    """Plain-torch reference from the format: [out_features, in_features]."""
    in_features = qweight.shape[0] * 32 // bits
    q = _unpack_rows(qweight, bits)  # [in, out]
    z = _unpack_rows(qzeros.t().contiguous(), bits).t()[:, : qweight.shape[1]]  # [groups, out]
    z = z + GPTQ_FORMATS[format]
    if g_idx is None:
        gs = in_features if group_size in (None, -1) else group_size
        g_idx = torch.arange(in_features, device=qweight.device) // gs
    g = g_idx.long()
    w = (q - z[g]).float() * scales.float()[g]
    return w.to(out_dtype or scales.dtype).t().contiguous()


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int | None = None,
    format: str = "gptq",
    out_dtype: torch.dtype | None = None,
    transpose: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise a GPTQ QuantLinear's weight in one kernel.

    qweight int32 [in * bits / 32, out]; qzeros int32 [groups, out * bits / 32]; scales [groups, out];
    g_idx int32 [in] (act-order) or None with `group_size` (None / -1: one group). format "gptq"
    (auto-gptq, zeros stored minus one) or "gptq_v2". Returns [out, in] ([in, out] with transpose)."""
    if _custom.compiling():
        state = GPTQState(qzeros, scales, g_idx, bits, -1 if group_size is None else int(group_size), format)
        W = _compiled_dequantize(qweight, state, out_dtype or scales.dtype)
        W = W.t().contiguous() if transpose else W
        if out is None:
            return W
        _check_out("dequantize_gptq", out, W.shape, W.dtype, W.device)
        return out.copy_(W)
    return _dequantize_gptq(qweight, qzeros, scales, g_idx, bits, group_size, format, out_dtype, transpose, out)


def _dequantize_gptq(qweight, qzeros, scales, g_idx, bits, group_size, format, out_dtype, transpose, out):
    op = "dequantize_gptq"
    if bits not in GPTQ_BITS:
        _fail(op, f"bits={bits} is not supported (2, 4 or 8; 3-bit packs across int32 words)")
    if format not in GPTQ_FORMATS:
        _fail(op, f"format must be one of {tuple(GPTQ_FORMATS)}, got {format!r}")
    for name, t, dt in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 2:
            _fail(
                op,
                f"{name} must be a 2-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                f"{tuple(getattr(t, 'shape', ()))}",
            )
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scales.dim() != 2:
        _fail(op, f"scales must be a 2-D float tensor, got {scales.dtype} {tuple(scales.shape)}")
    per = 32 // bits
    in_features, out_features = qweight.shape[0] * per, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape[1] != out_features:
        _fail(op, f"scales has {scales.shape[1]} columns but qweight has {out_features} output features")
    if qzeros.shape != (n_groups, -(-out_features // per)):
        _fail(
            op,
            f"qzeros has shape {tuple(qzeros.shape)}; expected ({n_groups}, {-(-out_features // per)}) "
            f"for {n_groups} groups of {bits}-bit zeros",
        )
    if g_idx is not None:
        if g_idx.shape != (in_features,) or g_idx.dtype not in (torch.int32, torch.int64):
            _fail(
                op, f"g_idx must be an integer tensor of shape ({in_features},), got {g_idx.dtype} {tuple(g_idx.shape)}"
            )
        g_idx = g_idx.to(torch.int32).contiguous()
        gs = in_features
    else:
        gs = in_features if group_size in (None, -1) else int(group_size)
        if gs <= 0 or -(-in_features // gs) != n_groups:
            _fail(op, f"group_size {group_size} gives {-(-in_features // max(gs, 1))} groups but scales has {n_groups}")
    dev = qweight.device
    for name, t in (("qzeros", qzeros), ("scales", scales)) + ((("g_idx", g_idx),) if g_idx is not None else ()):
        if t.device != dev:
            _fail(op, f"{name} is on {t.device} but qweight is on {dev}")
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        _fail(op, f"qweight is on {dev}; fusedlora kernels need CUDA tensors")
    out_dtype = out_dtype or scales.dtype
    shape = (in_features, out_features) if transpose else (out_features, in_features)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=dev)
    else:
        _check_out(op, out, shape, out_dtype, dev, contiguous=True)
    s_o, s_i = (1, out.stride(0)) if transpose else (out.stride(0), 1)
    shape = dict(bits=bits, has_g_idx=g_idx is not None, transpose=bool(transpose))
    meta = GPTQ_DEQUANT.constexprs(**shape)
    grid = (-(-in_features // meta["BLOCK_I"]), -(-out_features // meta["BLOCK_O"]), 1)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    launch(
        GPTQ_DEQUANT,
        grid,
        (
            qweight,
            qzeros,
            scales,
            g_idx if g_idx is not None else qweight,
            out,
            in_features,
            out_features,
            gs,
            qweight.stride(0),
            qzeros.stride(0),
            scales.stride(0),
            s_o,
            s_i,
            GPTQ_FORMATS[format],
        ),
        **shape,
    )
    return out


# ------------------------------------------------------------------- a LoRA projection's base weight
class GPTQState(NamedTuple):
    """The quantisation state of a GPTQ QuantLinear (its qweight is passed as the weight)."""

    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    format: str = "gptq"


class NF4State2(NamedTuple):
    """The second-level state of a nested (double-quantised) 4-bit state."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int


class NF4State(NamedTuple):
    """The fields of a bitsandbytes QuantState that dequantize_nf4 reads (base_from_arguments rebuilds one
    inside a custom op)."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype
    quant_type: str
    nested: bool
    state2: NF4State2 | None
    offset: torch.Tensor | float


# ------------------------------------------------- a base weight across a custom op's boundary (torch.compile)
# A custom op takes tensors, lists of optional tensors and plain scalars: a base weight crosses as one tensor
# list in the order BASE_TENSORS (None where its kind has no such tensor) and the named scalars of BaseLayout.
BASE_TENSORS = ("weight", "absmax", "code", "absmax2", "code2", "offset", "qzeros", "scales", "g_idx")


class BaseLayout(NamedTuple):
    """A base weight's quantisation state less its tensors. Fields a kind does not use hold 0 (float32)."""

    quant_format: str  # "plain", "nf4" / "fp4" (bitsandbytes 4-bit), "gptq" / "gptq_v2"
    out_features: int
    in_features: int
    state_dtype: torch.dtype  # 4-bit: the dtype its state dequantises to
    blocksize: int  # 4-bit: values per absmax
    nested_blocksize: int  # nested (double-quantised) 4-bit: absmax values per second-level absmax; else 0
    bits: int  # GPTQ
    group_size: int  # GPTQ


def base_arguments(W, quant) -> tuple[list, BaseLayout]:
    """(tensors in BASE_TENSORS order, BaseLayout) of a base weight and its quantisation state."""
    if not (quant is None or isinstance(quant, GPTQState) or is_nf4(quant)):
        raise TypeError(f"unsupported quantisation state {type(quant).__name__}")
    out_f, in_f = weight_shape(W, quant)
    named = {"weight": W}
    layout = dict(
        quant_format="plain",
        out_features=out_f,
        in_features=in_f,
        state_dtype=torch.float32,
        blocksize=0,
        nested_blocksize=0,
        bits=0,
        group_size=0,
    )
    if isinstance(quant, GPTQState):
        named.update(qzeros=quant.qzeros, scales=quant.scales, g_idx=quant.g_idx)
        layout.update(quant_format=quant.format, bits=quant.bits, group_size=quant.group_size)
    elif is_nf4(quant):
        named.update(absmax=quant.absmax, code=quant.code)
        layout.update(quant_format=quant.quant_type, state_dtype=quant.dtype, blocksize=quant.blocksize)
        if quant.nested:
            offset = quant.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=W.device)
            named.update(absmax2=quant.state2.absmax, code2=quant.state2.code, offset=offset)
            layout.update(nested_blocksize=quant.state2.blocksize)
    return [named.get(name) for name in BASE_TENSORS], BaseLayout(**layout)


def base_from_arguments(tensors, layout: BaseLayout):
    """(W, quant state) from base_arguments' tensors and layout."""
    t = dict(zip(BASE_TENSORS, tensors))
    kind = layout.quant_format
    if kind == "plain":
        return t["weight"], None
    if kind in GPTQ_FORMATS:
        return t["weight"], GPTQState(t["qzeros"], t["scales"], t["g_idx"], layout.bits, layout.group_size, kind)
    nested = layout.nested_blocksize > 0
    state2 = NF4State2(t["absmax2"], t["code2"], layout.nested_blocksize) if nested else None
    return t["weight"], NF4State(
        t["absmax"],
        t["code"],
        layout.blocksize,
        (layout.out_features, layout.in_features),
        layout.state_dtype,
        kind,
        nested,
        state2,
        t["offset"] if nested else 0.0,
    )


def _dequantize_op(
    base: list[torch.Tensor | None],
    quant_format: str,
    out_features: int,
    in_features: int,
    state_dtype: torch.dtype,
    blocksize: int,
    nested_blocksize: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    layout = BaseLayout(
        quant_format, out_features, in_features, state_dtype, blocksize, nested_blocksize, bits, group_size
    )
    W, quant = base_from_arguments(base, layout)
    out = dequantize_base(W, quant, dtype)
    return out.clone() if out is W else out  # (a plain weight already in dtype: an op may not return its input)


DEQUANTIZE_OP = _custom.define("dequantize", _dequantize_op)


def _compiled_dequantize(W, quant, dtype, out=None):
    """dequantize_base through the custom op fusedlora::dequantize (torch.compile), copied into `out` if given."""
    base, layout = base_arguments(W, quant)
    result = DEQUANTIZE_OP(base, *layout, dtype)
    return result if out is None else out.copy_(result)


def is_nf4(quant) -> bool:
    return getattr(quant, "quant_type", None) in ("nf4", "fp4")


def nf4_writes_into(quant, dtype, out: torch.Tensor) -> bool:
    """dequantize_nf4 can write this weight into `out` itself: a 4-bit state whose values round straight to
    `dtype` (see dequantize_base), and `out` contiguous or a block of rows of a wider buffer."""
    return (
        is_nf4(quant)
        and quant.dtype in (torch.float32, dtype)
        and (out.is_contiguous() or row_block_ok(out, quant.blocksize))
    )


def dequantize_base(W: torch.Tensor, quant, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight as a [out, in] tensor of `dtype` (written into `out` when given)."""
    if out is not None:
        if nf4_writes_into(quant, dtype, out):
            return _dequantize_nf4(W, quant, out, dtype)  # straight into out, no temporary
        return out.copy_(dequantize_base(W, quant, dtype))
    if quant is None:
        return W if W.dtype == dtype else W.to(dtype)
    if isinstance(quant, GPTQState):
        return _dequantize_gptq(
            W, quant.qzeros, quant.scales, quant.g_idx, quant.bits, quant.group_size, quant.format, dtype, False, None
        )
    if is_nf4(quant):
        # From a float32 state, round the fp32 values straight to `dtype` (what PEFT's dequantise-then-cast
        # gives, without the fp32 copy); from a 16-bit state keep its rounding first, as PEFT does.
        if quant.dtype in (torch.float32, dtype):
            return _dequantize_nf4(W, quant, None, dtype)
        return _dequantize_nf4(W, quant, None, None).to(dtype)
    raise TypeError(f"unsupported quantisation state {type(quant).__name__}")


def weight_shape(W, quant):
    if quant is None:
        return W.shape
    if isinstance(quant, GPTQState):
        return (W.shape[1], W.shape[0] * 32 // quant.bits)
    shape = getattr(quant, "shape", None)
    if shape is None:
        raise ValueError("a quant_state with no shape: is it the state of this weight?")
    return tuple(shape)


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def _synthetic_nf4(shape, nested, device, dtype, blocksize=64):
    """A random bitsandbytes-format 4-bit weight and quant state (no bitsandbytes needed)."""
    from types import SimpleNamespace

    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    code = torch.sort(torch.rand(16, device=device) * 2 - 1).values
    if nested:
        s2 = SimpleNamespace(
            absmax=torch.rand(-(-n_blocks // 256), device=device) + 0.5,
            code=torch.linspace(-1, 1, 256, device=device),
            blocksize=256,
        )
        qs = SimpleNamespace(
            absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device),
            state2=s2,
            offset=0.25,
            nested=True,
        )
    else:
        qs = SimpleNamespace(absmax=torch.rand(n_blocks, device=device) + 0.1, nested=False)
    qs.code, qs.blocksize, qs.shape, qs.dtype, qs.quant_type = code, blocksize, torch.Size(shape), dtype, "nf4"
    return packed, qs


def selfcheck(device, dtype):
    shape = (4096, 4096) if device == "cuda" else (33, 70)
    err_nf4 = 0.0
    exact = device == "cuda" or dtype != torch.bfloat16  # the interpreter truncates to bf16
    for nested in (False, True):
        packed, qs = _synthetic_nf4(shape, nested, device, dtype)
        ours, ref = dequantize_nf4(packed, qs), naive_dequantize_nf4(packed, qs)
        err_nf4 = max(err_nf4, 0.0 if torch.equal(ours, ref) else rel_err(ours, ref) + (1.0 if exact else 0.0))
        # into the rows of a wider buffer (the LoRA MLP's [W | s B | 0]: the STRIDED variants)
        rows = (4096, 2048) if device == "cuda" else (9, 128)
        packed, qs = _synthetic_nf4(rows, nested, device, dtype)
        buf = torch.zeros(rows[0], rows[1] + 32, dtype=qs.dtype, device=device)
        ours, ref = dequantize_nf4(packed, qs, out=buf[:, : rows[1]]), naive_dequantize_nf4(packed, qs)
        spill = bool(buf[:, rows[1] :].any())  # the columns beside the block must stay untouched
        if spill or not torch.equal(ours, ref):
            err_nf4 = max(err_nf4, rel_err(ours, ref) + (1.0 if exact or spill else 0.0))
    in_f, out_f = (4096, 4096) if device == "cuda" else (64, 48)
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device=device).to(torch.int32)
    qz = torch.randint(-(2**31), 2**31 - 1, (in_f // 32, out_f // 8), dtype=torch.int64, device=device).to(torch.int32)
    sc = (torch.rand(in_f // 32, out_f, device=device) * 0.01).half()
    g = (torch.randperm(in_f, device=device) // 32).to(torch.int32)
    ours = dequantize_gptq(qw, qz, sc, g, out_dtype=dtype)
    ref = naive_dequantize_gptq(qw, qz, sc, g, out_dtype=dtype)
    err_gptq = 0.0 if torch.equal(ours, ref) else rel_err(ours, ref) + (1.0 if exact else 0.0)
    tol = 0.0 if exact else 8e-3  # bit-identical, except the interpreter's bf16 truncation (1 ulp)
    return {"nf4_dequant": (err_nf4, tol), "gptq_dequant": (err_gptq, tol)}
