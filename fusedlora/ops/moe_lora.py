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

from dataclasses import dataclass

import torch

MOE_ACTIVATIONS = ("silu", "gptoss")  # silu: concatenated [gate; up] rows; gptoss: interleaved, clamped SwiGLU


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
    if p.quant_state is not None:
        from ..quant import dequantize_nf4
        W = dequantize_nf4(W, p.quant_state)
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


def naive_moe_lora(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: ExpertProj,
                   down: ExpertProj, activation: str = "silu", alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
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


def moe_lora_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: ExpertProj,
                     down: ExpertProj, activation: str = "silu", alpha: float = 1.702, limit: float = 7.0
                     ) -> torch.Tensor:
    """The routed experts of one MoE layer with their LoRA: x [T, H], top_k_index [T, k] (int), top_k_weights
    [T, k] -> [T, H]. Gradients flow to x, top_k_weights and each LoRA factor; expert weights are frozen.

    Scaffold: runs the reference until the grouped-GEMM kernels land (issue 36)."""
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"moe_lora_experts: activation must be one of {MOE_ACTIVATIONS}, got {activation!r}")
    return naive_moe_lora(x, top_k_index, top_k_weights, gate_up, down, activation, alpha, limit)
