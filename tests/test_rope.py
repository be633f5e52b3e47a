"""RoPE of q and k (GQA) vs an fp64 reference of HF's apply_rotary_pos_emb, with position_ids.

fp32: ~1e-6; fp16/bf16: one output rounding, so ~2^-11 / 2^-8 relative in norm."""

import pytest
import torch

from fusedlora.ops import naive_rope, rope
from fusedlora.testing import DEVICE, HAS_CUDA, assert_device_assert, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
# (B, Hq, Hk, S, D, rotary dim)
CASES = [(1, 1, 1, 1, 64, 64), (2, 5, 3, 7, 80, 80), (2, 4, 2, 9, 96, 32), (1, 3, 1, 3, 256, 256)]
if HAS_CUDA:
    CASES += [(4, 32, 8, 2048, 128, 128), (2, 40, 8, 333, 128, 64)]


def _cache(max_pos, r, device, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64, device=device) / r))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=device), inv)
    e = torch.cat([f, f], -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def _positions(b, s, kind):
    if kind == "packed":  # sequences packed in one row: positions restart
        p = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)])
        return p.expand(b, s).clone()
    if kind == "offset":  # left padding / cache offsets: a different start per row
        return torch.stack([torch.arange(s) + 3 * i for i in range(b)])
    return torch.arange(s)[None] + 5  # [1, S] broadcast over the batch


@pytest.mark.parametrize("mode", ["hf", "packed", "offset", "broadcast"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rope_matches_reference(case, dtype, mode):
    b, hq, hk, s, d, r = case
    q = torch.randn(b, s, hq, d, device=DEVICE).to(dtype).transpose(1, 2)  # HF's layout: a transposed view
    k = torch.randn(b, hk, s, d, device=DEVICE).to(dtype)
    cos, sin = _cache(s + 3 * b + 8, r, DEVICE, dtype)
    if mode == "hf":
        pos = _positions(b, s, "offset").to(DEVICE)
        args = (cos[pos], sin[pos], None)
        ref_args = (cos[pos].double(), sin[pos].double(), None)
    else:
        pos = _positions(b, s, {"packed": "packed", "offset": "offset", "broadcast": "bcast"}[mode]).to(DEVICE)
        args = (cos, sin, pos)
        ref_args = (cos.double(), sin.double(), pos)
    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = rope(qk, kk, *args)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    qr, kr = naive_rope(q64, k64, *ref_args)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [gq, gk])
    torch.autograd.backward([qr, kr], [gq.double(), gk.double()])
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    tol = TOL[dtype]
    for a, ref in ((qo, qr), (ko, kr), (qk.grad, q64.grad), (kk.grad, k64.grad)):
        assert rel_err(a, ref) < tol


def test_fp32_cache_with_bf16_inputs_and_only_q_used():
    q = torch.randn(2, 4, 5, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 64, device=DEVICE, requires_grad=True)
    cos, sin = _cache(16, 64, DEVICE, torch.float32)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], device=DEVICE)
    qo, _ = rope(q, k, cos, sin, pos)
    qo.sum().backward()
    q64 = q.detach().double().requires_grad_()
    naive_rope(q64, k.detach().double(), cos.double(), sin.double(), pos)[0].sum().backward()
    assert rel_err(q.grad, q64.grad) < 1e-5 and torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda q, k, c, s, p: rope(q, k[:, :, :3], c, s, p), "must share B, S and D"),
        (lambda q, k, c, s, p: rope(q, k.double(), c, s, p), "k has dtype float64"),
        (lambda q, k, c, s, p: rope(q, k, c[:, :63], s[:, :63], p), "must be even"),
        (lambda q, k, c, s, p: rope(q, k, c, s[:, :32], p), "must match"),
        (lambda q, k, c, s, p: rope(q, k, c[None], s[None], p), "must be a \\[max_pos, rotary_dim\\] cache"),
        (lambda q, k, c, s, p: rope(q, k, c, s, p[:, :2]), "position_ids has shape"),
        (lambda q, k, c, s, p: rope(q, k, c, s, p.float()), "position_ids has dtype float32"),
        (lambda q, k, c, s, p: rope(q, k, c[:4][None], s[:4][None], None), "cos/sin have shape"),
        (lambda q, k, c, s, p: rope(q[0], k, c, s, p), "must be \\[B, H, S, D\\]"),
    ],
)
def test_bad_input(bad, match):
    q = torch.randn(2, 4, 5, 64, device=DEVICE)
    k = torch.randn(2, 2, 5, 64, device=DEVICE)
    cos, sin = _cache(16, 64, DEVICE, torch.float32)
    pos = torch.arange(5, device=DEVICE)[None].expand(2, 5)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(q, k, cos, sin, pos)


OOR_POS = """
import torch
from fusedlora.ops import rope
q = torch.randn(1, 2, 3, 64, device="cuda")
cos = torch.randn(4, 64, device="cuda")
rope(q, q, cos, cos, torch.tensor([[0, 1, 4]], device="cuda"))
torch.cuda.synchronize()
"""


def test_out_of_range_position_raises():
    if HAS_CUDA:  # a device-side assert ends the CUDA context: check it in its own process
        assert_device_assert(OOR_POS, "position_ids must be in")
        return
    q = torch.randn(1, 2, 3, 64)
    cos, sin = _cache(4, 64, DEVICE, torch.float32)
    with pytest.raises(RuntimeError, match="position_ids must be in \\[0, 4\\)"):
        rope(q, q, cos, sin, torch.tensor([[0, 1, 4]]))
