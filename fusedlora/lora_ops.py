"""The fused LoRA functions as torch.library custom ops: what `apply_lora_*` call under torch.compile.

`lora_o`, `lora_qkv` and `lora_mlp` take LoRA_O / LoRA_QKV / LoRA_MLP's arguments and run the same plan,
forward and backward functions of `fusedlora.lora` inside the custom ops fusedlora::lora_{o,qkv,mlp}
(and their *_backward), so Dynamo sees one opaque call per layer and its gradient formula. What crosses the
op boundary is tensors and plain scalars only:
- each projection's base weight as tensors + ints (plain; bitsandbytes 4-bit: packed weight, absmax, code,
  nested state; GPTQ: qweight, qzeros, scales, g_idx), rebuilt inside as `NF4State` / `GPTQState`;
- the trainable tensors (A, B, biases) in one tensor list, so autograd returns a gradient for each;
- dropout masks, drawn before the call in PEFT's order (q, k, v / gate, up, down), so the traced graph owns
  the random numbers;
- the compute dtype (autocast's, decided at trace time);
- the tensors the backward needs, as extra outputs; an entry that is the input X itself (no cast) or a
  dropout mask comes back as a marker and is rebuilt from the op's inputs (an op may not return its inputs).
The MLP backward writes its gradients over the forward's gate/up buffer as in eager (and, as there, only
when autograd frees the graph after this backward): that buffer is an output of the forward op read by
nothing but this backward op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lora as L
from .ops import _custom
from .quant import decode_base, encode_base

N_FROZEN = 7   # per projection: six base-weight tensors (None where unused) and the dropout mask
N_INTS = 10    # kind, out, in, five quantisation ints, has adapter, has bias
MASK = N_FROZEN - 1
_ACTIVATIONS = {
    "silu": (L.swiglu_fg, L.swiglu_fg_backward),
    "gelu": (L.geglu_exact_fg, L.geglu_exact_fg_backward),
    "gelu_tanh": (L.geglu_approx_fg, L.geglu_approx_fg_backward),
}
_SAVED_NONE, _SAVED_X, _SAVED_MASK = 0, 1, 2  # marker codes (fusedlora.ops._custom.marker): None, X, mask i


# ----------------------------------------------------------------------------------- encode / decode
def _encode(prs, X, dtype, training):
    """(params, frozen, ints, floats) of the projections; dropout masks drawn here in projection order
    (the input rows of each; down_proj's input is [rows, intermediate])."""
    params, biases, frozen, ints, floats = [], [], [], [], []
    rows = X.numel() // X.shape[-1] if X.dim() else 1
    for pr in prs:
        tensors, q = encode_base(pr.W, pr.quant)
        out_f, in_f = L._weight_shape(pr.W, pr.quant)
        mask = None
        if pr.A is not None and pr.dropout != 0.0 and training:
            mask = F.dropout(torch.ones(rows, in_f, dtype=dtype, device=X.device), pr.dropout, True)
        frozen += tensors + [mask]
        ints += [q[0], out_f, in_f, *q[1:], 0, pr.A is not None, pr.bias is not None]
        floats += [pr.s, pr.dropout]
        if pr.A is not None:
            params += [pr.A, pr.B]
        if pr.bias is not None:
            biases.append(pr.bias)
    return params + biases, frozen, ints, floats


def _decode(params, frozen, ints, floats):
    prs, adapters, biases = [], [], []
    n = len(ints) // N_INTS
    it = iter(params)
    for i in range(n):
        if ints[i * N_INTS + 8]:
            adapters.append((next(it), next(it)))
        else:
            adapters.append((None, None))
    for i in range(n):
        biases.append(next(it) if ints[i * N_INTS + 9] else None)
    for i in range(n):
        kind, out_f, in_f, *q = ints[i * N_INTS:i * N_INTS + 8]
        t = frozen[i * N_FROZEN:(i + 1) * N_FROZEN]
        W, quant = decode_base(t, kind, out_f, in_f, q)
        (A, B), s, p = adapters[i], floats[2 * i], floats[2 * i + 1]
        prs.append(L._Proj(W, quant, A, B, s, biases[i], p, t[MASK]))
    return prs


def _param_names(kind, ints):
    """Gradient names (the Functions' slot names) of the params list, in its order."""
    prefixes = {"o": ("",), "qkv": ("q", "k", "v"), "mlp": ("g", "u", "d")}[kind]
    n = len(ints) // N_INTS
    names = [f"{prefixes[i]}{ab}" for i in range(n) if ints[i * N_INTS + 8] for ab in "AB"]
    names += [f"{prefixes[i]}_bias" if prefixes[i] else "bias" for i in range(n) if ints[i * N_INTS + 9]]
    return names


def _encode_saved(saved, X, prs, outs, inputs):
    """The saved tensors as op outputs: markers for None, X itself and the dropout masks, anything else
    sharing memory with an input or another output cloned (in practice a rank-r column block)."""
    out = []
    for t in saved:
        if t is None:
            out.append(_custom.marker(X, _SAVED_NONE))
        elif torch._C._is_alias_of(t, X):  # X2 = X itself in the compute dtype
            out.append(_custom.marker(X, _SAVED_X))
        elif any(t is pr.mask for pr in prs):
            out.append(_custom.marker(X, _SAVED_MASK + next(i for i, pr in enumerate(prs) if t is pr.mask)))
        else:
            out.append(t)
    return _unaliased(out, inputs, list(outs))


def _unaliased(outs, inputs, earlier=()):
    """outs with each tensor that is, or views the memory of, an input or an earlier output cloned: a custom
    op's outputs may alias neither. Each output is also made contiguous (in practice a rank-r column block of a
    wider buffer): the real and the fake run may differ in which views they return, but never in the layout
    Inductor is promised. Fresh contiguous tensors are taken as they are."""
    done = list(earlier)
    result = []
    for t in outs:
        if t is not None and not t.is_contiguous():
            t = t.contiguous()
        elif t is not None and (t._base is not None or any(t is i for i in inputs)):
            if any(i is not None and torch._C._is_alias_of(t, i) for i in (*inputs, *done)):
                t = t.clone()
        result.append(t)
        if t is not None:
            done.append(t)
    return result


def _decode_saved(saved, X, prs):
    out = []
    for t in saved:
        code = _custom.marker_code(t)
        if code is None:
            out.append(t)
        elif code == _SAVED_NONE:
            out.append(None)
        elif code == _SAVED_X:
            out.append(L._flat(X))
        else:
            out.append(prs[code - _SAVED_MASK].mask)
    return out


class _OpCtx:
    """What the plan / forward / backward functions of fusedlora.lora read and write on an autograd ctx."""

    def save_for_backward(self, *tensors):
        self.saved = tensors


# --------------------------------------------------------------------------------------- the ops
def _define(kind, n_out, plan, forward, backward, slots):
    def extra(act, inplace):
        return (*_ACTIVATIONS[act], inplace) if kind == "mlp" else ()

    def forward_op(X: torch.Tensor, params: list[torch.Tensor], frozen: list[torch.Tensor | None], ints: list[int],
                   floats: list[float], dtype: torch.dtype, training: bool, act: str,
                   inplace: bool) -> list[torch.Tensor]:
        prs = _decode(params, frozen, ints, floats)
        ctx = _OpCtx()
        outs = forward(ctx, X, prs, dtype, training, *extra(act, inplace))
        return [*outs, *_encode_saved(ctx.saved, X, prs, outs, (X, *params, *frozen))]

    def backward_op(grads: list[torch.Tensor | None], X: torch.Tensor, params: list[torch.Tensor],
                    frozen: list[torch.Tensor | None], ints: list[int], floats: list[float], dtype: torch.dtype,
                    training: bool, act: str, inplace: bool, needs: list[bool],
                    saved: list[torch.Tensor]) -> list[torch.Tensor]:
        prs = _decode(params, frozen, ints, floats)
        ctx = _OpCtx()
        plan(ctx, X, prs, dtype, training, *extra(act, inplace))
        ctx.saved_tensors = tuple(_decode_saved(saved, X, prs))
        names = ["X", *_param_names(kind, ints)]
        need = dict.fromkeys(slots.names, False)
        need.update(zip(names, needs))
        named = backward(ctx, need, *grads)
        inputs = (X, *params, *frozen, *saved, *grads)
        return [_custom.mark(g, X) for g in _unaliased([named.get(n) for n in names], inputs)]

    fwd = _custom.define(f"lora_{kind}", forward_op)
    bwd = _custom.define(f"lora_{kind}_backward", backward_op)

    def setup_context(ctx, inputs, output):
        X, params, frozen, ints, floats, dtype, training, act, inplace = inputs
        ctx.counts = (len(params), len(frozen))
        ctx.args = (ints, floats, dtype, training, act, inplace)
        ctx.save_for_backward(X, *params, *frozen, *output[n_out:])

    def autograd_backward(ctx, grads):
        L.refuse_double_backward(f"lora_{kind}")
        X, *rest = ctx.saved_tensors
        n_params, n_frozen = ctx.counts
        params, frozen, saved = rest[:n_params], rest[n_params:n_params + n_frozen], rest[n_params + n_frozen:]
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        got = bwd(list(grads[:n_out]), X, list(params), list(frozen), *ctx.args, [need_x, *need_params], list(saved))
        return (_custom.unmark(got[0]), [_custom.unmark(g) for g in got[1:]]) + (None,) * 7

    fwd.register_autograd(autograd_backward, setup_context=setup_context)
    return fwd


LORA_O_OP = _define("o", 1, L._o_plan, L._o_forward, L._o_backward, L.O_SLOTS)
LORA_QKV_OP = _define("qkv", 3, L._qkv_plan, L._qkv_forward, L._qkv_backward, L.QKV_SLOTS)
LORA_MLP_OP = _define("mlp", 1, L._mlp_plan, L._mlp_forward, L._mlp_backward, L.MLP_SLOTS)


# ------------------------------------------------------------------------------ LoRA_*.apply's twins
def lora_o(X, W, W_quant, A, B, S, bias=None, dropout=0.0, training=False):
    """LoRA_O.apply through the custom op (same arguments, same result)."""
    prs = L._o_projections(X, W, W_quant, A, B, S, bias, dropout)
    return _call(LORA_O_OP, X, prs, training)[0]


def lora_qkv(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, inplace=True, q_bias=None, k_bias=None,
             v_bias=None, dropouts=(0.0, 0.0, 0.0), training=False):
    """LoRA_QKV.apply through the custom op."""
    prs = L._qkv_projections(X, qW, qQ, qA, qB, qS, kW, kQ, kA, kB, kS, vW, vQ, vA, vB, vS, q_bias, k_bias, v_bias,
                             dropouts)
    return tuple(_call(LORA_QKV_OP, X, prs, training)[:3])


def lora_mlp(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, activation, inplace=True,
             dropouts=(0.0, 0.0, 0.0), training=False):
    """LoRA_MLP.apply through the custom op; `activation` names one of the fused GLU activations
    ("silu", "gelu", "gelu_tanh") instead of the two callables."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    prs = L._mlp_projections(X, gW, gQ, gA, gB, gS, uW, uQ, uA, uB, uS, dW, dQ, dA, dB, dS, dropouts)
    return _call(LORA_MLP_OP, X, prs, training, activation, inplace)[0]


def _call(op, X, prs, training, activation="", inplace=False):
    dtype = L._compute_dtype(X)  # autocast's, decided here (at trace time)
    return op(X, *_encode(prs, X, dtype, training), dtype, bool(training), activation, bool(inplace))
