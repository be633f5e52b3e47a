"""Rotary position embedding for q and k in one launch (kernel: csrc_triton/rope/kernel.py).

Follows HF's `apply_rotary_pos_emb` (rotate_half convention). cos/sin either as HF passes them
([B or 1, S, r], position_ids=None) or as a [max_pos, r] cache gathered by `position_ids` [B or 1, S]
inside the kernel — packed sequences whose positions restart, left padding and offsets all work.
A rotary dim r < head dim D rotates the first r dims and copies the rest (partial rotary).
"""

from __future__ import annotations

import torch

from csrc_triton.rope import ROPE

from ..loader import launch
from . import _custom
from ._common import check_tensor, grads_of, rel_err

POS_DTYPES = (torch.int64, torch.int32)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def naive_rope(q, k, cos, sin, position_ids=None):
    """Plain-torch reference (computes in the inputs' dtype, as HF does)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    elif cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]

    def apply(x):
        xr, xp = x[..., :r], x[..., r:]
        return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)

    return apply(q), apply(k)


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(q, k, qo, ko, cos, sin, pos, backward: bool):
    bsz, hq, seq, dim = q.shape
    hk = k.shape[1]
    r = cos.shape[-1]
    has_pos = pos is not None
    shape = dict(half=r // 2, n_pass=dim - r, has_pos=has_pos, backward=backward)
    if has_pos:
        cos_sb, cos_ss = 0, cos.stride(0)
        pos_t, pos_sb, pos_ss = pos, (pos.stride(0) if pos.shape[0] > 1 else 0), pos.stride(1)
    else:
        cos_sb, cos_ss = (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)
        pos_t, pos_sb, pos_ss = cos, 0, 0
    bh = ROPE.constexprs(**shape)["BLOCK_H"]
    grid = (bsz * seq, (hq + bh - 1) // bh + (hk + bh - 1) // bh, 1)
    launch(
        ROPE,
        grid,
        (
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            pos_t,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo.stride(0),
            qo.stride(1),
            qo.stride(2),
            ko.stride(0),
            ko.stride(1),
            ko.stride(2),
            cos_sb,
            cos_ss,
            pos_sb,
            pos_ss,
            seq,
            hq,
            hk,
            r // 2,
            dim - r,
        ),
        **shape,
    )


# One op for eager and torch.compile (fusedlora.ops._custom)
def _forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    rope_launch(q, k, qo, ko, cos, sin, pos, False)
    return qo, ko


def _setup(ctx, inputs, output):
    q, k, cos, sin, pos = inputs
    ctx.save_for_backward(cos, sin, pos)
    # the gradients' layout: q's and k's own where empty_like keeps it (HF's q is a transposed view), so that
    # autograd needs no copy
    ctx.grad_like = (torch.empty_like(q, device="meta"), torch.empty_like(k, device="meta"))


def _backward(ctx, dqo, dko):
    cos, sin, pos = ctx.saved_tensors
    q_like, k_like = ctx.grad_like
    # None: that output was not used
    dqo = torch.zeros(q_like.shape, dtype=q_like.dtype, device=cos.device) if dqo is None else dqo
    dko = torch.zeros(k_like.shape, dtype=k_like.dtype, device=cos.device) if dko is None else dko
    dq, dk = ROPE_BACKWARD_OP(
        dqo, dko, cos, sin, pos, list(q_like.shape), list(q_like.stride()), list(k_like.shape), list(k_like.stride())
    )
    return dq, dk, None, None, None


def _backward_launch(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor | None,
    q_size: list[int],
    q_stride: list[int],
    k_size: list[int],
    k_stride: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    dq = torch.empty_strided(q_size, q_stride, dtype=dqo.dtype, device=dqo.device)
    dk = torch.empty_strided(k_size, k_stride, dtype=dko.dtype, device=dko.device)
    rope_launch(_last_contiguous(dqo), _last_contiguous(dko), dq, dk, cos, sin, pos, True)
    return dq, dk


ROPE_OP = _custom.AutogradOp("rope", _forward, _setup, _backward)
ROPE_BACKWARD_OP = _custom.Launcher("rope_backward", _backward_launch)


def _batch_or_1(bsz, *rest):
    """'[B, ...] or [1, ...]' with the real sizes ('[1, ...]' alone when B is 1)."""
    tail = ", ".join(str(r) for r in rest)
    return f"[1, {tail}]" if bsz == 1 else f"[{bsz}, {tail}] or [1, {tail}]"


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D]; returns (q_rot, k_rot), differentiable in q and k."""
    op = "rope"
    check_tensor(op, "q", q)
    check_tensor(op, "k", k, like=q, like_name="q")
    check_tensor(op, "cos", cos, like=q, like_name="q")
    check_tensor(op, "sin", sin, like=q, like_name="q")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be [B, H, S, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    bsz, _, seq, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (bsz, seq, dim):
        raise ValueError(f"{op}: k {tuple(k.shape)} must share B, S and D with q {tuple(q.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k is {k.dtype} but q is {q.dtype}; they must match")
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} {cos.dtype} and sin {tuple(sin.shape)} {sin.dtype} must match")
    r = cos.shape[-1]
    if r % 2 or r > dim or r == 0:
        raise ValueError(f"{op}: cos/sin last dimension (rotary dim) is {r}; it must be even and <= head dim {dim}")
    if position_ids is not None:
        check_tensor(op, "position_ids", position_ids, dtypes=POS_DTYPES, like=q, like_name="q")
        if cos.dim() != 2:
            raise ValueError(
                f"{op}: with position_ids, cos/sin must be a [max_pos, rotary_dim] cache; got "
                f"{tuple(cos.shape)} (pass position_ids=None for per-token cos/sin)"
            )
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, bsz):
            raise ValueError(
                f"{op}: position_ids has shape {tuple(position_ids.shape)}; expected {_batch_or_1(bsz, seq)}"
            )
        torch._assert_async(
            ((position_ids >= 0) & (position_ids < cos.shape[0])).all(),
            f"{op}: position_ids must be in [0, {cos.shape[0]}) (the cos/sin cache length)",
        )
    else:
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        if cos.dim() != 3 or cos.shape[1] != seq or cos.shape[0] not in (1, bsz):
            raise ValueError(
                f"{op}: cos/sin have shape {tuple(cos.shape)}; expected "
                f"{_batch_or_1(bsz, seq, 'rotary_dim')} (or a [max_pos, rotary_dim] cache with position_ids)"
            )
    q, k = _last_contiguous(q), _last_contiguous(k)
    cos, sin = _last_contiguous(cos), _last_contiguous(sin)
    return ROPE_OP(q, k, cos, sin, position_ids)


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    b, hq, hk, s, d = (2, 32, 8, 512, 128) if device == "cuda" else (1, 4, 2, 9, 64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    f = torch.outer(torch.arange(2 * s, device=device, dtype=torch.float64), inv)
    cos, sin = torch.cat([f, f], -1).cos().to(dtype), torch.cat([f, f], -1).sin().to(dtype)
    pos = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).to(device)[None].expand(b, s)  # packed
    q = torch.randn(b, s, hq, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hk, s, d, device=device).to(dtype).requires_grad_()
    qo, ko = rope(q, k, cos, sin, pos)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = grads_of((qo, ko), (gq, gk), (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qr, kr = naive_rope(q64, k64, cos.double(), sin.double(), pos)
    dq64, dk64 = grads_of((qr, kr), (gq.double(), gk.double()), (q64, k64))
    tol = 1.5e-2 if dtype != torch.float32 else 1e-5
    err = max(rel_err(qo, qr), rel_err(ko, kr), rel_err(dq, dq64), rel_err(dk, dk64))
    return {"rope": (err, tol)}
