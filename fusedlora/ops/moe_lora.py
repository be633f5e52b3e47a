"""Routed experts with LoRA (issue 36): what one MoE layer's experts compute, with PEFT's `target_parameters` LoRA.

`moe_lora_experts(x, top_k_index, top_k_weights, gate_up, down, ...)` is the op the MoE patch calls; each
projection of the expert stack travels as an `ExpertProj` read at call time. `naive_moe_lora` is the plain-torch
reference the tests compare with (docs/moe-design.md section 5.1 gives the semantics; section 2 PEFT's layouts):

    for each (t, j) with e = top_k_index[t, j]:
        h = W_gu,e x_t + s_gu B_gu,e (A_gu,e x_t) + b_gu,e        a = GLU(h)
        y = W_d,e a   + s_d  B_d,e  (A_d,e a)    + b_d,e         out_t += top_k_weights[t, j] * y

PEFT layouts: A [E*r, in] expert-major (A_e = A.view(E, r, in)[e]); B [out, r*E] expert-minor
(B_e[o, j] = B[o, j*E + e]). W is [E, out, in], or [E, in, out] when `transposed` (gpt_oss).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from csrc_triton.moe_lora import (
    MOE_BLOCK_M,
    MOE_COMBINE_ROWS,
    MOE_DOWN_BWD,
    MOE_DOWN_FWD,
    MOE_GATE_UP_BWD_DX,
    MOE_GATE_UP_FWD,
    MOE_GLU_ROWS_BWD,
    MOE_GLU_ROWS_FWD,
    MOE_LORA_SEG_GRAD,
    moe_rank_pad,
)

from ..loader import launch, launches_nothing
from . import _custom
from ._common import autocast_dtype, cdiv, check_tensor, interpreting, rel_err
from .glu import refuse_double_backward
from .nf4 import nf4_range, nf4_range_alignment

MOE_ACTIVATIONS = ("silu", "gptoss")  # silu: concatenated [gate; up] rows; gptoss: interleaved, clamped SwiGLU
# The frozen experts' GEMMs: "triton" (csrc_triton/moe_lora's grouped GEMMs, the LoRA terms inside the tiles),
# "grouped_mm" (torch._grouped_mm for every GEMM, the GLU and the LoRA gradients in Triton: docs/moe-design.md
# 5.7), "auto" (grouped_mm where it serves: see `base_gemm_of`).
MOE_BASE_GEMMS = ("auto", "triton", "grouped_mm")


@dataclass(frozen=True)
class ExpertProj:
    """One projection of an experts stack (gate_up or down), as read from the module at call time.

    weight: [E, out, in] ([E, in, out] when `transposed`), or bitsandbytes NF4 bytes with `quant_state`
    (whose `shape` is the stored 3-D layout). lora_A [E*r, in] / lora_B [out, r*E] in PEFT's layout, or None
    (no adapter on this projection). bias: [E, out] or None."""

    weight: torch.Tensor
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    quant_state: object | None = None
    transposed: bool = False

    @property
    def num_experts(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else self.weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.shape[0] // self.num_experts


def _dense_stack(p: ExpertProj, dtype) -> torch.Tensor:
    """The [E, out, in] weight stack in `dtype` (dequantised whole: the reference, not the fused path)."""
    W = p.weight
    if p.quant_state is not None:  # bitsandbytes' own decode (fusedlora.quant sits above the ops)
        import bitsandbytes.functional as bnb_functional

        W = bnb_functional.dequantize_4bit(W, p.quant_state)
    if p.transposed:
        W = W.transpose(1, 2)
    return W.to(dtype)


def _lora_factors(p: ExpertProj, dtype):
    """(A_e [E, r, in], B_e [E, out, r]) views of PEFT's layouts, or None without an adapter."""
    if p.lora_A is None or p.lora_B is None:
        return None
    E, r = p.num_experts, p.rank
    A = p.lora_A.to(dtype).view(E, r, -1)
    B = p.lora_B.to(dtype).view(p.lora_B.shape[0], r, E).permute(2, 0, 1)
    return A, B


def naive_glu(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The experts' GLU on the gate_up output h [rows, 2I]: silu on concatenated halves, or gpt_oss's clamped
    SwiGLU on interleaved columns (gate = h[:, ::2], up = h[:, 1::2])."""
    if activation == "silu":
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if activation == "gptoss":
        gate = h[..., ::2].clamp(max=limit)
        up = h[..., 1::2].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    raise ValueError(f"naive_moe_lora: activation must be one of {MOE_ACTIVATIONS}, got {activation!r}")


def _project(X, e, W, factors, p: ExpertProj):
    Y = X @ W[e].t()
    if factors is not None:
        A, B = factors
        Y = Y + p.scale * ((X @ A[e].t()) @ B[e].t())
    if p.bias is not None:
        Y = Y + p.bias[e].to(Y.dtype)
    return Y


def naive_moe_lora(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertProj,
    down: ExpertProj,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Plain-torch reference of the routed experts with LoRA, differentiable in x, the routing weights and the
    LoRA factors. One loop over the experts (host syncs: a reference, never the fast path). Computes in x's
    dtype; the k outputs of a token are summed in slot order, as transformers' grouped_mm path does."""
    T, H = x.shape
    k = top_k_index.shape[1]
    dtype = x.dtype
    W_gu, W_d = _dense_stack(gate_up, dtype), _dense_stack(down, dtype)
    f_gu, f_d = _lora_factors(gate_up, dtype), _lora_factors(down, dtype)
    flat_expert = top_k_index.reshape(-1)
    flat_weight = top_k_weights.reshape(-1)
    slots_out = x.new_zeros(T * k, H)
    for e in range(W_gu.shape[0]):
        slots = (flat_expert == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        X = x[slots // k]
        h = _project(X, e, W_gu, f_gu, gate_up)
        y = _project(naive_glu(h, activation, alpha, limit), e, W_d, f_d, down)
        slots_out = slots_out.index_copy(0, slots, y * flat_weight[slots, None].to(dtype))
    return slots_out.view(T, k, H).sum(1)


# ---------------------------------------------------------------- the fused path (csrc_triton/moe_lora)
class Route(NamedTuple):
    """Routing metadata of one call, on the device (docs/moe-design.md 5.2): the T*k (token, slot) pairs sorted
    by expert ("rows"). tile_expert [max_tiles]: the expert of each M-tile of block_m rows (E for the tiles
    past the real count); tile_row0 [max_tiles]: its first row; start [E+1]: each expert's first row;
    slot [TK]: t*k + j of each row. All int32, in the order the kernels take them."""

    tile_expert: torch.Tensor
    tile_row0: torch.Tensor
    start: torch.Tensor
    slot: torch.Tensor


def max_tiles(n_rows: int, n_experts: int, block_m: int) -> int:
    """A bound on the M-tiles of any routing of n_rows rows (each expert's last tile may be partial), from the
    shapes alone: the GEMM grids never wait for the counts."""
    return cdiv(n_rows, block_m) + n_experts


def moe_route(top_k_index: torch.Tensor, n_experts: int, block_m: int) -> Route:
    """The routing metadata from a sort and two searchsorted (no bincount, nonzero or .item(): no host sync).
    An index outside [0, n_experts) fails a device-side assertion (asynchronous on a GPU)."""
    flat = top_k_index.reshape(-1).to(torch.int32)
    key, order = torch.sort(flat, stable=True)
    experts = torch.arange(n_experts + 1, device=flat.device, dtype=torch.int32)
    start = torch.searchsorted(key, experts, out_int32=True)
    torch._assert_async(
        (start[0] == 0) & (start[-1] == flat.numel()),
        f"moe_lora_experts: top_k_index has values outside [0, {n_experts}) (the number of experts)",
    )
    tiles = (start[1:] - start[:-1] + (block_m - 1)) // block_m
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    m = torch.arange(max_tiles(flat.numel(), n_experts, block_m), device=flat.device, dtype=torch.int32)
    tile_expert = torch.searchsorted(tile_end, m, right=True, out_int32=True)
    e = tile_expert.clamp_max(n_experts - 1)
    tile_row0 = start[e] + (m - (tile_end - tiles)[e]) * block_m
    return Route(tile_expert, tile_row0, start, order.to(torch.int32))


class _Proj(NamedTuple):
    """One projection as the kernels take it: the stored weight (a bf16/fp16 stack, or NF4 bytes with `quant`
    = [absmax, absmax2, code, code2, offset], `blocksize` and `nested`), the LoRA factors and bias in the
    compute dtype (`like` stands in for the absent ones), and the constexprs' shape arguments."""

    weight: torch.Tensor
    quant: list
    blocksize: int
    nested: bool
    expert_numel: int
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: torch.Tensor
    rank: int
    scale: float
    shape: dict


def _proj(weight, quant, lora_A, lora_B, bias, transposed, blocksize, nested, scale, n_experts, expert_numel, like):
    rank = 0 if lora_A is None else lora_A.shape[0] // n_experts
    dtype = like.dtype
    return _Proj(
        weight,
        quant,
        int(blocksize),
        bool(nested),
        expert_numel,
        like if lora_A is None else lora_A.to(dtype).contiguous(),
        like if lora_B is None else lora_B.to(dtype).contiguous(),
        like if bias is None else bias.to(dtype).contiguous(),
        rank,
        float(scale),
        dict(transposed=bool(transposed), has_bias=bias is not None, rank=rank),
    )


# The dequantised weights of one chunk of NF4 experts (both projections) stay under this: a scratch buffer the
# GEMMs read, never the whole stack in bf16 (Qwen3-30B-A3B: 28 experts of 128 a chunk; Mixtral: 1 of 8).
MOE_NF4_CHUNK_BYTES = 256 << 20


def expert_ranges(gu: _Proj, d: _Proj, n_experts: int, itemsize: int) -> list[tuple[int, int]]:
    """The [first, end) expert ranges the GEMMs run over: all experts in one launch when neither stack is
    quantised, else chunks of MOE_NF4_CHUNK_BYTES of dequantised weights (at least one expert), each starting
    on whole (second-level) quantisation blocks of both stacks."""
    quantised = [p for p in (gu, d) if p.quant]
    if not quantised:
        return [(0, n_experts)]
    step = 1
    for p in quantised:
        align = nf4_range_alignment(p.blocksize, p.nested)
        step = math.lcm(step, align // math.gcd(p.expert_numel, align))
    per_expert = sum(p.expert_numel for p in quantised) * itemsize
    chunk = max(step, MOE_NF4_CHUNK_BYTES // per_expert // step * step)
    return [(e0, min(n_experts, e0 + chunk)) for e0 in range(0, n_experts, chunk)]


def _scratch(p: _Proj, ranges, like):
    """The buffer a quantised stack's chunks are dequantised into (None for a stored bf16/fp16 stack)."""
    return like.new_empty(max(e1 - e0 for e0, e1 in ranges) * p.expert_numel) if p.quant else None


def _stack(p: _Proj, first: int, end: int, scratch):
    """Experts [first, end) of p as the GEMM kernels read them (expert `first` at the start): a view of the
    stored stack, or NF4 dequantised into scratch."""
    if not p.quant:
        return p.weight[first:]
    n = p.expert_numel
    return nf4_range(p.weight, *p.quant, first * n, (end - first) * n, scratch, p.blocksize, p.nested)


def _projs(
    x,
    gu_weight,
    gu_quant,
    gu_lora_A,
    gu_lora_B,
    gu_bias,
    d_weight,
    d_quant,
    d_lora_A,
    d_lora_B,
    d_bias,
    dims,
    scales,
):
    n_experts, n_inter, gu_trans, d_trans, gu_bs, gu_nested, d_bs, d_nested, block_m, _grouped = dims
    numel = 2 * n_inter * x.shape[1]  # one expert's weights, either projection
    gu = _proj(
        gu_weight, gu_quant, gu_lora_A, gu_lora_B, gu_bias, gu_trans, gu_bs, gu_nested, scales[0], n_experts, numel, x
    )
    d = _proj(
        d_weight, d_quant, d_lora_A, d_lora_B, d_bias, d_trans, d_bs, d_nested, scales[1], n_experts, numel // 2, x
    )
    return gu, d, n_experts, n_inter, block_m


def _block_n(spec, **shape) -> int:
    # the output columns of one program, as launched (a tuning override's BN included): the grid's axis 1
    return spec.constexprs(**shape)["BN"]


def _rank_buffer(x, rows, p: _Proj):
    """[rows, RP] rank-r products of projection p (unused when it has no adapter: x stands in)."""
    return x.new_empty(rows, moe_rank_pad(p.rank)) if p.rank else x


# ---------------------------------------------------------------- the hybrid path (docs/moe-design.md 5.7)
# The same op with every GEMM in torch._grouped_mm (CUTLASS on sm_90): the rows gathered into expert order once,
# the LoRA terms as rank-r grouped GEMMs beside the frozen ones, the GLU and its backward in Triton over the rows.
# It returns what the fused path returns (EG, XA, HA for the backward; DEG, h, DOB, DHB and the routing weight's
# partials for the LoRA gradients), so both paths share the routing, the segment gradients and the reductions.


def _factor_stacks(p: _Proj, n_experts: int):
    """(A [E, RP, in], B [E, out, RP]): PEFT's factors as contiguous per-expert stacks, rank zero-padded to RP
    (torch._grouped_mm wants 16-byte strides; the padded columns of XA, HA, DOB and DHB are then zeros)."""
    r, rp = p.rank, moe_rank_pad(p.rank)
    A = p.lora_A.view(n_experts, r, -1)
    B = p.lora_B.view(p.lora_B.shape[0], r, n_experts).permute(2, 0, 1)
    if rp != r:
        A = torch.nn.functional.pad(A, (0, 0, 0, rp - r))
        B = torch.nn.functional.pad(B, (0, rp - r))
    return A.contiguous(), B.contiguous()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # a [rows, K] times each group's b [K, N]; on fake tensors (the op's fake, torch.compile's tracing) only the
    # output's shape, since torch's meta accepts bf16 alone and the CPU path also runs fp32 / fp16
    if launches_nothing(a):
        return a.new_empty(a.shape[0], b.shape[-1])
    return torch._grouped_mm(a, b, offs=offs)


def _grouped_proj(rows, weight_t, p: _Proj, offs, n_experts, backward: bool):
    """The frozen grouped GEMM rows @ W_e^T (weight_t: W's stack as grouped_mm's right operand), and for an
    adapter the rank-r product rows A_e^T (backward: rows B_e, unscaled) with the second factor's stack as the
    next grouped GEMM's right operand (B_e^T [E, RP, out]; backward A_e [E, RP, in]); the LoRA term
    s (product) (factor) is left to the row kernel that reads the output. The last two None without one."""
    out = _grouped_mm(rows, weight_t, offs)
    if not p.rank:
        return out, None, None
    A, B = _factor_stacks(p, n_experts)
    first, second = (B, A) if backward else (A.transpose(1, 2), B.transpose(1, 2))
    return out, _grouped_mm(rows, first, offs), second


class RowsLoRA(NamedTuple):
    """A LoRA term a row kernel adds to the rows it reads: scale small[row] @ factor[row_expert[row]], with
    small [TK, RP] and factor [E, RP, N] (any strides); the rows sorted by expert."""

    row_expert: torch.Tensor
    small: torch.Tensor
    factor: torch.Tensor
    scale: float
    rank: int


def _rows_lora_args(lora: RowsLoRA | None, like: torch.Tensor, int_like: torch.Tensor) -> tuple:
    """The row kernels' (ROW_E, SMALL, F) pointers and (F's three strides, scale) for `lora`, or stand-ins."""
    if lora is None:
        return (int_like, like, like), (0, 0, 0, 0.0)
    return (lora.row_expert, lora.small, lora.factor), (*lora.factor.stride(), lora.scale)


def row_experts(start: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Each sorted row's expert (int32 [n_rows]) from the group starts [E + 1], on the device (no host sync)."""
    rows = torch.arange(n_rows, device=start.device, dtype=torch.int32)
    return torch.searchsorted(start[1:], rows, right=True, out_int32=True)


def _glu_rows_grid(n_rows: int, n_inter: int, spec, **shape):
    meta = spec.constexprs(**shape)
    return cdiv(n_rows, meta["BM"]), cdiv(n_inter, meta["BN"])


def glu_rows(eg: torch.Tensor, activation: str, alpha: float, limit: float, lora: RowsLoRA | None = None):
    """h [TK, I] = GLU of the gate/up pre-activations eg [TK, 2I] (W's output order), rounded once: the
    hybrid path's GLU, as the fused forward's epilogue. lora: eg is the frozen GEMM's output and the
    gate/up LoRA term (factor: B's stack [E, RP, 2I]) is added first; eg then holds the sum (in place)."""
    n_rows, n_inter = eg.shape[0], eg.shape[1] // 2
    h = eg.new_empty(n_rows, n_inter)
    rank = lora.rank if lora is not None else 0
    grid = _glu_rows_grid(n_rows, n_inter, MOE_GLU_ROWS_FWD, act=activation, rank=rank)
    pointers, scalars = _rows_lora_args(lora, eg, eg.view(torch.int32))  # (a view: no allocation per launch)
    launch(
        MOE_GLU_ROWS_FWD,
        (*grid, 1),
        (eg, h, *pointers, n_rows, n_inter, *scalars, alpha, limit),
        act=activation,
        rank=rank,
    )
    return h


def combine_rows(
    rows: torch.Tensor,
    slot: torch.Tensor,
    rw: torch.Tensor,
    k: int,
    weighted: bool,
    extra: torch.Tensor | None = None,
    extra_scale: float = 0.0,
) -> torch.Tensor:
    """out [T, N] = sum over a token's k slots of (rows + extra_scale extra)[the slot's sorted row], times
    rw[slot] when weighted (rw: fp32 in slot order; slot: the sorted rows' slots), from rows [TK, N] in expert
    order (extra: a LoRA term's unscaled rows in the same order, or None), summed in fp32 and rounded once."""
    n_rows, n_cols = rows.shape
    rows_of_slot = torch.empty_like(slot).index_copy_(
        0, slot.long(), torch.arange(n_rows, device=slot.device, dtype=slot.dtype)
    )
    out = rows.new_empty(n_rows // k, n_cols)
    has_extra = extra is not None
    meta = MOE_COMBINE_ROWS.constexprs(weighted=weighted, has_extra=has_extra)
    grid = (cdiv(out.shape[0], meta["BT"]), cdiv(n_cols, meta["BN"]), 1)
    launch(
        MOE_COMBINE_ROWS,
        grid,
        (rows, extra if has_extra else rows, rows_of_slot, rw, out, out.shape[0], n_cols, k, float(extra_scale)),
        weighted=weighted,
        has_extra=has_extra,
    )
    return out


def glu_rows_backward(g, eg, rw, slot, activation: str, alpha: float, limit: float, lora: RowsLoRA | None = None):
    """(d eg, the routing weight's gradient partials [TK, tiles] in slot order, h or None): the GLU's backward
    of the sorted rows with dh = rw[slot[row]] g[row] (g: h's unweighted gradient); the partials sum g h.
    lora: g is the frozen down projection's part and its LoRA term (factor: A's stack [E, RP, I]) is added
    first; h is then returned too (A's gradient reads it)."""
    n_rows, n_inter = eg.shape[0], eg.shape[1] // 2
    rank = lora.rank if lora is not None else 0
    grid = _glu_rows_grid(n_rows, n_inter, MOE_GLU_ROWS_BWD, act=activation, rank=rank)
    deg = torch.empty_like(eg)  # (a fresh buffer: the saved EG stays intact for a retained graph)
    dw_part = rw.new_empty(n_rows, grid[1])
    h = eg.new_empty(n_rows, n_inter) if rank else eg
    pointers, scalars = _rows_lora_args(lora, eg, slot)
    launch(
        MOE_GLU_ROWS_BWD,
        (*grid, 1),
        (g, eg, rw, slot, *pointers, deg, h, dw_part, n_rows, n_inter, grid[1], *scalars, alpha, limit),
        act=activation,
        rank=rank,
    )
    return deg, dw_part, h if rank else None


def _lora_rows(small, factor, offs):
    """A LoRA term's rows (unscaled) through one more grouped GEMM, or None without an adapter."""
    return None if small is None else _grouped_mm(small, factor, offs)


def _hybrid_forward(x, route: Route, rw, gu: _Proj, d: _Proj, k, n_experts, n_inter, activation, alpha, limit):
    """(out [T, H], EG, XA or None, HA or None). Each LoRA term is added by the row kernel that reads its
    projection's output: gate/up's inside the GLU (one rank-r dot per expert a tile spans), down's in the
    combine (its rows through a grouped GEMM: they are gathered per token there)."""
    slot = route.slot.long()
    offs = route.start[1:]
    xs = x.index_select(0, slot // k)  # the tokens in expert order
    eg, xa, b_stack = _grouped_proj(xs, gu.weight.transpose(1, 2), gu, offs, n_experts, False)
    fold = None if xa is None else RowsLoRA(row_experts(route.start, xs.shape[0]), xa, b_stack, gu.scale, gu.rank)
    h = glu_rows(eg, activation, alpha, limit, fold)
    y, ha, b_d = _grouped_proj(h, d.weight.transpose(1, 2), d, offs, n_experts, False)
    return combine_rows(y, route.slot, rw, k, True, _lora_rows(ha, b_d, offs), d.scale), eg, xa, ha


def _hybrid_backward(dout, x, rw, eg, route: Route, gu: _Proj, d: _Proj, k, n_experts, n_inter, activation, scales):
    """(dx [T, H], the routing weight's partials [TK, tiles] in slot order, DEG, h, DOB, DHB), the last three
    None where their projection has no adapter; the LoRA terms added as in _hybrid_forward."""
    slot = route.slot.long()
    offs = route.start[1:]
    g, ob, a_d = _grouped_proj(dout.index_select(0, slot // k), d.weight, d, offs, n_experts, True)
    dob = fold = None
    if ob is not None:  # s RW[slot] (g B_e), as the fused path's DOB
        dob = (ob.float() * (rw.index_select(0, slot) * d.scale).unsqueeze(1)).to(x.dtype)
        fold = RowsLoRA(row_experts(route.start, g.shape[0]), ob, a_d, d.scale, d.rank)
    deg, dw_part, h = glu_rows_backward(g, eg, rw, route.slot, activation, scales[2], scales[3], fold)
    dxs, hb, a_gu = _grouped_proj(deg, gu.weight, gu, offs, n_experts, True)
    dhb = None if hb is None else (hb.float() * gu.scale).to(x.dtype)
    dx = combine_rows(dxs, route.slot, rw, k, False, _lora_rows(hb, a_gu, offs), gu.scale)
    return dx, dw_part, deg, h, dob, dhb


def _fused_forward(x, route: Route, rw, gu: _Proj, d: _Proj, k, n_experts, n_inter, activation, alpha, limit, block_m):
    """The Triton path's forward GEMMs: what _hybrid_forward returns (rank buffers unused without an adapter)."""
    T, H = x.shape
    tk, tiles = T * k, route.tile_expert.shape[0]
    eg = x.new_empty(tk, 2 * n_inter)
    h = x.new_empty(tk, n_inter)
    xa = _rank_buffer(x, tk, gu)
    out_slots = x.new_empty(tk, H)
    ha = _rank_buffer(x, tk, d)
    gu_cols = cdiv(n_inter, _block_n(MOE_GATE_UP_FWD, act=activation, block_m=block_m, **gu.shape))
    d_cols = cdiv(H, _block_n(MOE_DOWN_FWD, block_m=block_m, **d.shape))
    ranges = expert_ranges(gu, d, n_experts, x.element_size())
    gu_scratch, d_scratch = _scratch(gu, ranges, x), _scratch(d, ranges, x)
    for first, end in ranges:  # (a chunk's down projection reads only h rows of its own experts)
        gu_args = (_stack(gu, first, end, gu_scratch), gu.lora_A, gu.lora_B, gu.bias, *route)
        launch(
            MOE_GATE_UP_FWD,
            (tiles, gu_cols, 1),
            (x, *gu_args, eg, h, xa, n_experts, first, end, k, H, n_inter, gu.rank, gu.scale, alpha, limit),
            act=activation,
            block_m=block_m,
            **gu.shape,
        )
        d_args = (_stack(d, first, end, d_scratch), d.lora_A, d.lora_B, d.bias, rw, *route)
        launch(
            MOE_DOWN_FWD,
            (tiles, d_cols, 1),
            (h, *d_args, out_slots, ha, n_experts, first, end, k, H, n_inter, d.rank, d.scale),
            block_m=block_m,
            **d.shape,
        )
    # in slot order, as transformers' grouped_mm path sums; the dtype given: CUDA autocast runs a sum without one
    # in fp32, which made the MoE block's output (and from it the residual stream) fp32
    return out_slots.view(T, k, H).sum(1, dtype=x.dtype), eg, xa, ha


def _forward_op(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gu_weight: torch.Tensor,
    gu_quant: list[torch.Tensor],
    gu_lora_A: torch.Tensor | None,
    gu_lora_B: torch.Tensor | None,
    gu_bias: torch.Tensor | None,
    d_weight: torch.Tensor,
    d_quant: list[torch.Tensor],
    d_lora_A: torch.Tensor | None,
    d_lora_B: torch.Tensor | None,
    d_bias: torch.Tensor | None,
    dims: list[int],
    scales: list[float],
    activation: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(out [T, H], then what the backward reads: rw (the routing weights in fp32, slot order), EG [TK, 2I]
    (the gate/up pre-activations), XA, HA (rank-r products; markers without an adapter), and the Route)."""
    T, H = x.shape
    k = top_k_index.shape[1]
    rw = top_k_weights.reshape(-1).to(torch.float32, copy=True)  # (an output: never an alias of the input)
    gu, d, n_experts, n_inter, block_m = _projs(
        x,
        gu_weight,
        gu_quant,
        gu_lora_A,
        gu_lora_B,
        gu_bias,
        d_weight,
        d_quant,
        d_lora_A,
        d_lora_B,
        d_bias,
        dims,
        scales,
    )
    alpha, limit = scales[2], scales[3]
    route = moe_route(top_k_index, n_experts, block_m)
    run = _hybrid_forward if dims[9] else functools.partial(_fused_forward, block_m=block_m)
    out, eg, xa, ha = run(x, route, rw, gu, d, k, n_experts, n_inter, activation, alpha, limit)
    return (out, rw, eg, _custom.mark(xa if gu.rank else None, x), _custom.mark(ha if d.rank else None, x), *route)


def _seg_grad(big, small, route, rw, out, rank, scale, n_experts, k, gather, row_scale, layout):
    """A LoRA factor's gradient into `out` (fp32, PEFT's layout: "A" [E*r, C] or "B" [C, r*E])."""
    n_cols = big.shape[1]
    strides = (rank * n_cols, n_cols, 1) if layout == "A" else (1, n_experts, rank * n_experts)
    launch(
        MOE_LORA_SEG_GRAD,
        (n_experts, cdiv(n_cols, _block_n(MOE_LORA_SEG_GRAD, rank=rank, gather=gather, row_scale=row_scale)), 1),
        (big, small, route.slot, rw, route.start, out, n_cols, k, rank, *strides, float(scale)),
        rank=rank,
        gather=gather,
        row_scale=row_scale,
    )
    return out


def _fused_backward(
    dout, x, rw, eg, route: Route, gu: _Proj, d: _Proj, k, n_experts, n_inter, activation, scales, block_m
):
    """The Triton path's backward GEMMs: what _hybrid_backward returns (rank buffers unused without an adapter)."""
    tk, H, tiles = rw.shape[0], x.shape[1], route.tile_expert.shape[0]
    i_tiles = cdiv(n_inter, _block_n(MOE_DOWN_BWD, act=activation, block_m=block_m, **d.shape))
    deg = torch.empty_like(eg)  # (a fresh buffer: the saved EG stays intact for a retained graph)
    dw_part = rw.new_empty(tk, i_tiles)
    h = x.new_empty(tk, n_inter) if d.rank else x
    dob = _rank_buffer(x, tk, d)
    dx_slots = x.new_empty(tk, H)
    dhb = _rank_buffer(x, tk, gu)
    dx_cols = cdiv(H, _block_n(MOE_GATE_UP_BWD_DX, block_m=block_m, **gu.shape))
    ranges = expert_ranges(gu, d, n_experts, x.element_size())
    gu_scratch, d_scratch = _scratch(gu, ranges, x), _scratch(d, ranges, x)
    for first, end in ranges:  # (a chunk's gate/up backward reads only dEG rows of its own experts)
        d_args = (_stack(d, first, end, d_scratch), d.lora_A, d.lora_B, d.bias, rw, eg, *route, deg, h, dob, dw_part)
        launch(
            MOE_DOWN_BWD,
            (tiles, i_tiles, 1),
            (dout, *d_args, n_experts, first, end, k, H, n_inter, d.rank, i_tiles, d.scale, scales[2], scales[3]),
            act=activation,
            block_m=block_m,
            **d.shape,
        )
        gu_args = (_stack(gu, first, end, gu_scratch), gu.lora_A, gu.lora_B, *route, dx_slots, dhb)
        launch(
            MOE_GATE_UP_BWD_DX,
            (tiles, dx_cols, 1),
            (deg, *gu_args, n_experts, first, end, k, H, n_inter, gu.rank, gu.scale),
            block_m=block_m,
            **gu.shape,
        )
    return dx_slots.view(-1, k, H).sum(1, dtype=x.dtype), dw_part, deg, h, dob, dhb


def _backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    rw: torch.Tensor,
    eg: torch.Tensor,
    xa: torch.Tensor,
    ha: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row0: torch.Tensor,
    start: torch.Tensor,
    slot: torch.Tensor,
    gu_weight: torch.Tensor,
    gu_quant: list[torch.Tensor],
    gu_lora_A: torch.Tensor | None,
    gu_lora_B: torch.Tensor | None,
    gu_bias: torch.Tensor | None,
    d_weight: torch.Tensor,
    d_quant: list[torch.Tensor],
    d_lora_A: torch.Tensor | None,
    d_lora_B: torch.Tensor | None,
    d_bias: torch.Tensor | None,
    dims: list[int],
    scales: list[float],
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d routing weights in fp32 [T, k], dA_gu, dB_gu, dA_d, dB_d in fp32; markers for absent adapters)."""
    T, H = x.shape
    tk = rw.shape[0]
    k = tk // T if T else 1
    gu, d, n_experts, n_inter, block_m = _projs(
        x,
        gu_weight,
        gu_quant,
        gu_lora_A,
        gu_lora_B,
        gu_bias,
        d_weight,
        d_quant,
        d_lora_A,
        d_lora_B,
        d_bias,
        dims,
        scales,
    )
    route = Route(tile_expert, tile_row0, start, slot)
    dout = dout.to(x.dtype).contiguous()
    if dims[9]:
        dx, dw_part, deg, h, dob, dhb = _hybrid_backward(
            dout, x, rw, eg, route, gu, d, k, n_experts, n_inter, activation, scales
        )
    else:
        dx, dw_part, deg, h, dob, dhb = _fused_backward(
            dout, x, rw, eg, route, gu, d, k, n_experts, n_inter, activation, scales, block_m
        )
    d_rw = dw_part.view(T, k, -1).sum(-1)
    grads = [None] * 4
    if gu.rank:
        grads[0] = _seg_grad(
            x, dhb, route, rw, rw.new_empty(gu_lora_A.shape), gu.rank, 1.0, n_experts, k, True, False, "A"
        )
        grads[1] = _seg_grad(
            deg, xa, route, rw, rw.new_empty(gu_lora_B.shape), gu.rank, gu.scale, n_experts, k, False, False, "B"
        )
    if d.rank:
        grads[2] = _seg_grad(
            h, dob, route, rw, rw.new_empty(d_lora_A.shape), d.rank, 1.0, n_experts, k, False, False, "A"
        )
        grads[3] = _seg_grad(
            dout, ha, route, rw, rw.new_empty(d_lora_B.shape), d.rank, d.scale, n_experts, k, True, True, "B"
        )
    return (dx, d_rw, *[_custom.mark(g, x) for g in grads])


MOE_LORA_OP = _custom.define("moe_lora_experts", _forward_op)
MOE_LORA_BACKWARD_OP = _custom.define("moe_lora_experts_backward", _backward_op)

# positions of the op's inputs that carry gradients, and of the frozen ones the backward reads again
_X, _INDEX, _WEIGHTS, _GU, _D = 0, 1, 2, 3, 8  # (a projection: weight, quant, lora_A, lora_B, bias)


def _op_setup(ctx, inputs, output):
    x = inputs[_X]
    _, rw, eg, xa, ha, *route = output
    ctx.projections = inputs[_GU : _D + 5]
    ctx.dims, ctx.scales, ctx.activation = inputs[_D + 5 :]
    ctx.weights_dtype = inputs[_WEIGHTS].dtype
    ctx.save_for_backward(x, rw, eg, xa, ha, *route)


def _op_backward(ctx, dout, *_unused):
    refuse_double_backward("moe_lora_experts")
    x, rw, eg, xa, ha, *route = ctx.saved_tensors
    dx, d_rw, *lora_grads = MOE_LORA_BACKWARD_OP(
        dout, x, rw, eg, xa, ha, *route, *ctx.projections, ctx.dims, ctx.scales, ctx.activation
    )
    dA_gu, dB_gu, dA_d, dB_d = (_custom.unmark(g) for g in lora_grads)
    gu, d = ctx.projections[:5], ctx.projections[5:]
    cast = lambda g, like: None if g is None else g.to(like.dtype)
    # one gradient per input, a list for each list input (the NF4 tensors)
    return (
        dx,
        None,
        d_rw.to(ctx.weights_dtype),
        None,
        [None] * len(gu[1]),
        cast(dA_gu, gu[2]),
        cast(dB_gu, gu[3]),
        None,
        None,
        [None] * len(d[1]),
        cast(dA_d, d[2]),
        cast(dB_d, d[3]),
        None,
        None,
        None,
        None,
    )


MOE_LORA_OP.register_autograd(_op_backward, setup_context=_op_setup)


def _stored_shape(p: ExpertProj) -> tuple:
    return tuple(p.quant_state.shape) if p.quant_state is not None else tuple(p.weight.shape)


def _check_proj(
    op: str, name: str, p: ExpertProj, n_out: int | None, n_in: int | None, x: torch.Tensor, dtype: torch.dtype
) -> tuple[int, int, int]:
    """(E, out, in) of a projection, each check's error naming `name`'s field and what was expected."""
    if not isinstance(p, ExpertProj):
        raise TypeError(f"{op}: {name} must be an ExpertProj, got {type(p).__name__}")
    stored = _stored_shape(p)
    if len(stored) != 3:
        raise ValueError(
            f"{op}: {name}.weight must be a 3-D experts stack [E, out, in] ([E, in, out] when "
            f"transposed), got shape {stored}"
        )
    E, n_o, n_i = (stored[0], stored[2], stored[1]) if p.transposed else stored
    if (n_out is not None and n_o != n_out) or (n_in is not None and n_i != n_in):
        want = f"[E, {n_out if n_out is not None else 'out'}, {n_in if n_in is not None else 'in'}] as [E, out, in]"
        raise ValueError(
            f"{op}: {name}.weight has shape {stored}{' (transposed)' if p.transposed else ''}; expected {want}"
        )
    if p.weight.requires_grad and torch.is_grad_enabled():  # (no_grad calls never ask for its gradient)
        raise ValueError(
            f"{op}: {name}.weight requires grad, but the fused path keeps expert weights frozen "
            "(it computes no weight gradient); call requires_grad_(False) on it or train through "
            "PEFT's own path"
        )
    if p.quant_state is not None:
        check_tensor(op, f"{name}.weight", p.weight, dtypes=None, like=x, like_name="x")
        if getattr(p.quant_state, "quant_type", None) not in ("nf4", "fp4"):
            raise ValueError(
                f"{op}: {name}.quant_state must be a bitsandbytes 4-bit state (nf4 or fp4), got "
                f"quant_type {getattr(p.quant_state, 'quant_type', None)!r}"
            )
    else:
        check_tensor(op, f"{name}.weight", p.weight, like=x, like_name="x")
        if not p.weight.is_contiguous():  # (the kernels address W from its shape: a strided stack would be misread)
            raise ValueError(
                f"{op}: {name}.weight must be a contiguous stack, got strides {tuple(p.weight.stride())} for shape "
                f"{tuple(p.weight.shape)}; call .contiguous() on it once (the op never copies the stack)"
            )
        if p.weight.dtype != dtype:
            raise TypeError(
                f"{op}: {name}.weight is {p.weight.dtype} but the compute dtype is {dtype} (x's, or "
                "autocast's); they must match (the stack is never copied)"
            )
    if (p.lora_A is None) != (p.lora_B is None):
        raise ValueError(f"{op}: {name} has lora_A but no lora_B or the reverse; give both or neither")
    if p.lora_A is not None:
        check_tensor(op, f"{name}.lora_A", p.lora_A, like=x, like_name="x")
        check_tensor(op, f"{name}.lora_B", p.lora_B, like=x, like_name="x")
        r = p.lora_A.shape[0] // E if p.lora_A.dim() == 2 else 0
        if p.lora_A.dim() != 2 or p.lora_A.shape != (E * r, n_i) or r == 0:
            raise ValueError(
                f"{op}: {name}.lora_A has shape {tuple(p.lora_A.shape)}; expected PEFT's [E*r, in] = [{E}*r, {n_i}]"
            )
        if tuple(p.lora_B.shape) != (n_o, r * E):
            raise ValueError(
                f"{op}: {name}.lora_B has shape {tuple(p.lora_B.shape)}; expected PEFT's [out, r*E] = "
                f"[{n_o}, {r * E}] (r = {r} from lora_A)"
            )
    if p.bias is not None:
        check_tensor(op, f"{name}.bias", p.bias, like=x, like_name="x")
        if tuple(p.bias.shape) != (E, n_o):
            raise ValueError(f"{op}: {name}.bias has shape {tuple(p.bias.shape)}; expected [E, out] = [{E}, {n_o}]")
        if p.bias.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{op}: {name}.bias requires grad, but the fused path keeps expert biases frozen; call "
                "requires_grad_(False) on it"
            )
    return E, n_o, n_i


def _quant_args(p: ExpertProj, like: torch.Tensor):
    """(weight bytes, [absmax, absmax2, code, code2, offset], blocksize, nested) of a bitsandbytes 4-bit stack
    (dequantised a chunk of experts at a time), else (W, [], 0, 0). The state's tensors are read as they are
    (fp32 absmax, or uint8 with the nested fp32 state2); only the small code tables are cast."""
    qs = p.quant_state
    if qs is None:
        return p.weight, [], 0, 0
    op = "moe_lora_experts"
    packed = p.weight.data if isinstance(p.weight, torch.nn.Parameter) else p.weight
    n = 1
    for size in qs.shape:
        n *= int(size)
    if packed.numel() * packed.element_size() != (n + 1) // 2 or not packed.is_contiguous():
        raise ValueError(
            f"{op}: the 4-bit weight holds {packed.numel() * packed.element_size()} bytes (contiguous: "
            f"{packed.is_contiguous()}); its quant_state's shape {tuple(qs.shape)} needs {(n + 1) // 2} "
            "contiguous bytes"
        )
    blocksize = int(qs.blocksize)
    if blocksize & (blocksize - 1) or blocksize < 16:
        raise ValueError(f"{op}: quant_state.blocksize {blocksize} is not a power of two >= 16")
    code = qs.code.to(like.device, torch.float32)
    if qs.nested:
        s2 = qs.state2
        if qs.absmax.dtype != torch.uint8 or int(s2.blocksize) != 256:
            raise ValueError(
                f"{op}: a nested quant_state needs uint8 absmax and state2.blocksize 256 (bitsandbytes' "
                f"double quantisation), got {qs.absmax.dtype} and {s2.blocksize}"
            )
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=like.device).reshape(1)
        quant = [qs.absmax, s2.absmax.float(), code, s2.code.float(), offset]
    else:
        if qs.absmax.dtype != torch.float32:
            raise ValueError(f"{op}: quant_state.absmax must be float32 when not nested, got {qs.absmax.dtype}")
        quant = [qs.absmax, qs.absmax, code, code, qs.absmax]  # (the nested-only pointers are never read)
    for t in quant:
        if t.device != like.device:
            raise ValueError(f"{op}: the quant_state's tensors are on {t.device} but x is on {like.device}")
    data = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    return data, quant, blocksize, int(bool(qs.nested))


def grouped_mm_refusal(x: torch.Tensor, dtype, gate_up: ExpertProj, down: ExpertProj, activation: str) -> str:
    """Why the hybrid path cannot run this call ("" when it can): torch._grouped_mm takes bf16 on the GPU (its
    CUTLASS kernels are sm_90 / sm_100; elsewhere torch loops over the groups with a host sync) and 16-byte
    row strides; the GLU kernels serve silu without biases."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    if gate_up.quant_state is not None or down.quant_state is not None:
        return "the experts are 4-bit (the fused kernels dequantise them a chunk at a time)"
    if activation != "silu" or gate_up.bias is not None or down.bias is not None:
        return "it serves silu experts without biases (gpt_oss's clamped SwiGLU and biases stay fused)"
    if gate_up.transposed or down.transposed:
        return "it serves [E, out, in] expert stacks"
    if x.shape[0] == 0:
        return "there are no tokens"
    align = 16 // dtype.itemsize
    if x.shape[1] % align or down.weight.shape[2] % align:
        return f"hidden and intermediate sizes must be multiples of {align} (16-byte rows)"
    if x.device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm takes bf16 on the GPU, the compute dtype is {dtype}"
        if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
            return "torch._grouped_mm's grouped kernels are sm_90 / sm_100 (elsewhere it syncs the host per call)"
    elif x.device.type != "cpu":
        return f"it runs on CUDA or the CPU, x is on {x.device.type}"
    return ""


def base_gemm_of(base_gemm: str, x, dtype, gate_up: ExpertProj, down: ExpertProj, activation: str) -> str:
    """The path a call runs: base_gemm as asked ("grouped_mm" where it cannot run raises, saying why); "auto" is
    the hybrid path on a GPU where it serves (its GEMMs are CUTLASS's: BENCHMARKS.md, fifth session), else the
    fused kernels (always on the CPU and in Triton's interpreter)."""
    if base_gemm not in MOE_BASE_GEMMS:
        raise ValueError(f"moe_lora_experts: base_gemm must be one of {MOE_BASE_GEMMS}, got {base_gemm!r}")
    if base_gemm == "triton" or (base_gemm == "auto" and (x.device.type != "cuda" or interpreting())):
        return "triton"
    why = grouped_mm_refusal(x, dtype, gate_up, down, activation)
    if why and base_gemm == "grouped_mm":
        raise ValueError(f"moe_lora_experts: base_gemm='grouped_mm' cannot run this call: {why}; use 'auto'")
    return "triton" if why else "grouped_mm"


def moe_lora_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertProj,
    down: ExpertProj,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    *,
    block_m: int | None = None,
    base_gemm: str = "auto",
) -> torch.Tensor:
    """The routed experts of one MoE layer with their LoRA: x [T, H], top_k_index [T, k] (int), top_k_weights
    [T, k] -> [T, H] in the compute dtype (x's, or autocast's). Gradients flow to x, top_k_weights and each
    LoRA factor (in their own dtypes); expert weights and biases are frozen (refused if they require grad).

    Grouped GEMMs over the rows sorted by expert with the LoRA terms inside the tiles (csrc_triton/moe_lora);
    no host sync, no [E, out, in] tensor formed. block_m: rows per M-tile (default 64; 16 in Triton's
    interpreter). An index outside [0, E) fails a device-side assertion. base_gemm: "triton" (the fused
    kernels), "grouped_mm" (the hybrid path: torch._grouped_mm for the GEMMs, the GLU and the LoRA gradients in
    Triton; bf16 experts without biases, silu, on sm_90 / sm_100 or the CPU) or "auto" (see `base_gemm_of`)."""
    op = "moe_lora_experts"
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {MOE_ACTIVATIONS}, got {activation!r}")
    check_tensor(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    check_tensor(op, "top_k_index", top_k_index, dtypes=(torch.int32, torch.int64), like=x, like_name="x")
    check_tensor(op, "top_k_weights", top_k_weights, like=x, like_name="x")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0] or top_k_index.shape[1] < 1:
        raise ValueError(
            f"{op}: top_k_index must be [tokens, k] with {x.shape[0]} tokens (x's), got shape "
            f"{tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"{op}: top_k_weights has shape {tuple(top_k_weights.shape)} but top_k_index has "
            f"{tuple(top_k_index.shape)}; they must match"
        )
    dtype = autocast_dtype(x) or x.dtype
    H = x.shape[1]
    E, n_d_out, n_inter = _check_proj(op, "down", down, H, None, x, dtype)
    E_gu, _, _ = _check_proj(op, "gate_up", gate_up, 2 * n_inter, H, x, dtype)
    if E_gu != E:
        raise ValueError(f"{op}: gate_up has {E_gu} experts but down has {E}")
    if block_m is None:
        block_m = 16 if interpreting() else MOE_BLOCK_M
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"{op}: block_m must be 16, 32, 64 or 128, got {block_m!r}")
    gu_w, gu_q, gu_bs, gu_nested = _quant_args(gate_up, x)
    d_w, d_q, d_bs, d_nested = _quant_args(down, x)
    grouped = base_gemm_of(base_gemm, x, dtype, gate_up, down, activation) == "grouped_mm"
    dims = [E, n_inter, int(gate_up.transposed), int(down.transposed), gu_bs, gu_nested, d_bs, d_nested, block_m]
    dims.append(int(grouped))
    scales = [
        float(gate_up.scale if gate_up.lora_A is not None else 0.0),
        float(down.scale if down.lora_A is not None else 0.0),
        float(alpha),
        float(limit),
    ]
    outputs = MOE_LORA_OP(
        x.to(dtype).contiguous(),
        top_k_index,
        top_k_weights,
        gu_w,
        gu_q,
        gate_up.lora_A,
        gate_up.lora_B,
        gate_up.bias,
        d_w,
        d_q,
        down.lora_A,
        down.lora_B,
        down.bias,
        dims,
        scales,
        activation,
    )
    return outputs[0]


# ---------------------------------------------------------------- self-check (python -m fusedlora.selfcheck)
def selfcheck(device, dtype):
    """The fused op against the float64 reference: forward (the two forward GEMMs), dx and the routing weights'
    gradient (the backward GEMMs), the four LoRA factors' gradients (the segment kernel)."""
    T, k, E, H, I, r = (257, 8, 16, 512, 256, 16) if device == "cuda" else (9, 2, 4, 64, 32, 4)
    tol = 3e-2 if dtype != torch.float32 else 1e-5
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, s=1.0: torch.randn(*shape, generator=gen, device=device) * s

    def proj(n_out, n_in):
        return ExpertProj(
            randn(E, n_out, n_in, s=n_in**-0.5).to(dtype),
            randn(E * r, n_in, s=n_in**-0.5),
            randn(n_out, r * E, s=0.5),
            2.0,
        )

    gu, d = proj(2 * I, H), proj(H, I)
    x = randn(T, H).to(dtype)
    index = torch.rand(T, E, generator=gen, device=device).topk(k, -1).indices
    w = torch.rand(T, k, generator=gen, device=device).to(dtype)
    dout = randn(T, H).to(dtype)
    factors = [gu.lora_A, gu.lora_B, d.lora_A, d.lora_B]
    leaves = [x.requires_grad_(), w.requires_grad_()] + [f.requires_grad_() for f in factors]
    out = moe_lora_experts(x, index, w, gu, d)
    grads = torch.autograd.grad(out, leaves, dout)
    as64 = lambda t: t.detach().double().requires_grad_()
    ref_leaves = [as64(t) for t in leaves]
    gu64 = ExpertProj(gu.weight.double(), ref_leaves[2], ref_leaves[3], gu.scale)
    d64 = ExpertProj(d.weight.double(), ref_leaves[4], ref_leaves[5], d.scale)
    ref = naive_moe_lora(ref_leaves[0], index, ref_leaves[1], gu64, d64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    errs = [rel_err(a, b) for a, b in zip((out,) + grads, (ref,) + ref_grads)]
    fwd, bwd, lora = errs[0], max(errs[1:3]), max(errs[3:])
    glu_fwd, glu_bwd = _glu_rows_errors(randn, T * k, I, dtype)
    combine = _combine_rows_error(randn, T, k, H, dtype)
    return {
        "moe_gate_up_fwd": (fwd, tol),
        "moe_down_fwd": (fwd, tol),
        "moe_down_bwd": (bwd, tol),
        "moe_gate_up_bwd_dx": (bwd, tol),
        "moe_lora_seg_grad": (lora, tol),
        "moe_glu_rows_fwd": (glu_fwd, tol),
        "moe_glu_rows_bwd": (glu_bwd, tol),
        "moe_combine_rows": (combine, tol),
    }


def _combine_rows_error(randn, n_tokens, k, n_cols, dtype, extra_scale=0.5):
    """combine_rows, weighted or not, with a LoRA term's rows or not, against its float64 definition (rows in a
    shuffled slot order)."""
    rows, extra = randn(n_tokens * k, n_cols).to(dtype), randn(n_tokens * k, n_cols).to(dtype)
    rw = randn(n_tokens * k).float()
    slot = torch.randperm(n_tokens * k, device=rows.device).to(torch.int32)
    errs = []
    for weighted in (True, False):
        for with_extra in (True, False):
            summed = rows.double() + (extra_scale * extra.double() if with_extra else 0.0)
            ref = torch.empty_like(summed).index_copy_(0, slot.long(), summed)
            ref = (ref * (rw.double()[:, None] if weighted else 1.0)).view(n_tokens, k, n_cols).sum(1)
            got = combine_rows(rows, slot, rw, k, weighted, extra if with_extra else None, extra_scale)
            errs.append(rel_err(got, ref))
    return max(errs)


def _glu_rows_errors(randn, n_rows, n_inter, dtype, n_experts=3, rank_pad=16, scale=0.5):
    """The hybrid path's GLU kernels, each with a folded LoRA term (rows sorted over n_experts), against
    naive_glu and its autograd in float64 (rows in a shuffled slot order, fp32 routing weights): (forward error
    over h and the written-back eg, backward error over d eg, the weight partials and h)."""
    eg, g = randn(n_rows, 2 * n_inter, s=2.0).to(dtype), randn(n_rows, n_inter).to(dtype)
    rw = randn(n_rows).float()
    slot = torch.randperm(n_rows, device=eg.device).to(torch.int32)
    row_e = torch.randint(n_experts, (n_rows,), device=eg.device).sort().values.to(torch.int32)
    xa, ob = randn(n_rows, rank_pad).to(dtype), randn(n_rows, rank_pad).to(dtype)
    fb = randn(n_experts, rank_pad, 2 * n_inter, s=0.25).to(dtype)
    fa = randn(n_experts, rank_pad, n_inter, s=0.25).to(dtype)
    term = lambda small, f: scale * torch.einsum("rj,rjc->rc", small.double(), f.double()[row_e.long()])
    full64 = eg.double() + term(xa, fb)
    h = glu_rows(eg, "silu", 1.702, 7.0, RowsLoRA(row_e, xa, fb, scale, rank_pad))  # (eg now holds the sum)
    fwd = max(rel_err(h, naive_glu(full64, "silu")), rel_err(eg, full64))
    deg, dw_part, h_again = glu_rows_backward(
        g, eg, rw, slot, "silu", 1.702, 7.0, RowsLoRA(row_e, ob, fa, scale, rank_pad)
    )
    g64 = g.double() + term(ob, fa)
    eg64 = eg.double().requires_grad_()
    h64 = naive_glu(eg64, "silu")
    (deg64,) = torch.autograd.grad(h64, eg64, g64 * rw[slot.long()].double()[:, None])
    dw64 = torch.zeros(n_rows, dtype=torch.float64, device=eg.device)
    dw64[slot.long()] = (g64 * h64.detach()).sum(1)
    bwd = max(rel_err(deg, deg64), rel_err(dw_part.sum(1), dw64), rel_err(h_again, h64))
    return fwd, bwd
