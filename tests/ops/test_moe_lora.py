"""The routed-experts op (fusedlora.ops.moe_lora, kernels csrc_triton/moe_lora) against the plain-torch reference
`naive_moe_lora` in float64: the output and every gradient (x, routing weights, PEFT's lora_A / lora_B of both
projections), on hand-made routings that hit the edge cases of the grouped GEMMs, both GLU layouts, and bad
input. Shapes are tiny: the kernels run in Triton's CPU interpreter here."""

import pytest
import torch

from build_tools.shapes import COMMON, MOE_LAYERS
from fusedlora.ops.moe_lora import (
    ExpertProj,
    base_gemm_of,
    combine_rows,
    moe_lora_experts,
    moe_route,
    naive_moe_lora,
)
from fusedlora.testing import DEVICE, HAS_CUDA, assert_device_assert

FP32_TOL = 2e-5  # max |error| / max |reference|: fp32 products summed over <= 64 terms (fp32 accumulation)


def _proj(E, n_out, n_in, rank, scale, gen, transposed=False, bias=False, w_scale=None):
    w_scale = w_scale or n_in**-0.5
    W = torch.randn(E, n_out, n_in, generator=gen) * w_scale
    if transposed:
        W = W.transpose(1, 2).contiguous()
    A = B = None
    if rank:
        A = _leaf(torch.randn(E * rank, n_in, generator=gen) * n_in**-0.5)
        B = _leaf(torch.randn(n_out, rank * E, generator=gen) * 0.5)
    b = torch.randn(E, n_out, generator=gen).to(DEVICE) if bias else None
    return ExpertProj(W.to(DEVICE), A, B, scale, b, transposed=transposed)


def _leaf(t):
    return t.to(DEVICE).requires_grad_()


def _case(T=13, k=2, E=4, H=64, I=32, r_gu=4, r_d=4, act="silu", index=None, seed=0, w_scale_gu=None):
    gen = torch.Generator().manual_seed(seed)
    gptoss = act == "gptoss"
    x = _leaf(torch.randn(T, H, generator=gen))
    if index is None:
        index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    index = index.to(DEVICE)
    w = _leaf(torch.rand(T, k, generator=gen))
    gu = _proj(E, 2 * I, H, r_gu, 1.5, gen, transposed=gptoss, bias=gptoss, w_scale=w_scale_gu)
    d = _proj(E, H, I, r_d, 0.5, gen, transposed=gptoss, bias=gptoss)
    return x, index, w, gu, d


def _as_double(p: ExpertProj) -> ExpertProj:
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()
    weight = p.weight if p.quant_state is not None else p.weight.double()  # (the reference decodes 4-bit bytes)
    return ExpertProj(
        weight,
        leaf(p.lora_A),
        leaf(p.lora_B),
        p.scale,
        None if p.bias is None else p.bias.double(),
        p.quant_state,
        p.transposed,
    )


def _lora_leaves(gu, d):
    return [t for t in (gu.lora_A, gu.lora_B, d.lora_A, d.lora_B) if t is not None]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(case, act="silu", block_m=16, tol=FP32_TOL, ref_proj=None, **kw):
    """Fused vs reference: out and the gradients of x, w and each LoRA factor; returns the errors by name."""
    x, index, w, gu, d = case
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(x.shape, generator=gen).to(DEVICE)
    out = moe_lora_experts(x, index, w, gu, d, act, block_m=block_m, **kw)
    leaves = [x, w] + _lora_leaves(gu, d)
    grads = torch.autograd.grad(out, leaves, dout)
    gu64, d64 = ref_proj or (_as_double(gu), _as_double(d))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_moe_lora(x64, index, w64, gu64, d64, act)
    leaves64 = [x64, w64] + _lora_leaves(gu64, d64)
    grads64 = torch.autograd.grad(ref, leaves64, dout.double())
    names = ["out", "dx", "dw"] + [
        n
        for n, p in (("dA_gu", gu.lora_A), ("dB_gu", gu.lora_B), ("dA_d", d.lora_A), ("dB_d", d.lora_B))
        if p is not None
    ]
    errs = {n: _rel(a, b) for n, a, b in zip(names, (out,) + grads, (ref,) + grads64)}
    assert out.dtype == x.dtype and all(g.dtype == leaf.dtype for g, leaf in zip(grads, leaves))
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"errors past {tol}: {bad} (all: {errs})"
    return errs


# One expert (1) gets no token; expert 2 gets 13 rows (with block_m 4: four M-tiles, the last partial); each
# token sends its two slots to experts with different counts.
SKEWED = torch.tensor(
    [[0, 2], [2, 3], [2, 0], [3, 2], [2, 3], [0, 2], [2, 3], [3, 2], [2, 0], [0, 2], [2, 3], [2, 0], [3, 2]]
)


def test_route_metadata_tiles_and_bound():
    route = moe_route(SKEWED.to(DEVICE), 4, 16)
    counts = torch.bincount(SKEWED.flatten(), minlength=4)  # (the test may sync; the op never does)
    assert route.start.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert route.tile_expert.shape[0] == -(-26 // 16) + 4
    tiles = [e for e in route.tile_expert.tolist() if e < 4]
    assert tiles == [0, 2, 3]  # 6, 13 and 7 rows: one tile each; expert 1 none
    route = moe_route(SKEWED.to(DEVICE), 4, 4)
    assert route.tile_expert.tolist()[:8] == [0, 0, 2, 2, 2, 2, 3, 3]
    assert route.tile_row0.tolist()[:8] == [0, 4, 6, 10, 14, 18, 19, 23]
    assert (route.tile_expert[8:] == 4).all()  # past the real count: the kernels' programs exit
    slot = route.slot.long().cpu()
    assert (SKEWED.flatten()[slot].diff() >= 0).all()


@pytest.mark.parametrize("act", ["silu", "gptoss"])
def test_matches_reference_skewed_routing(act):
    _check(_case(index=SKEWED, act=act, w_scale_gu=3 * 64**-0.5 if act == "gptoss" else None), act)


def test_rows_spanning_several_tiles_and_an_empty_expert():
    index = torch.zeros(16, 2, dtype=torch.long)
    index[:, 1] = 3  # experts 1 and 2 get nothing; 0 and 3 get 16 rows each: BM 8 → two tiles per expert
    _check(_case(T=16, index=index), block_m=16)
    index[:, 0] = 4
    index[:, 1] = 4  # every token to one expert, 32 rows: two M-tiles of 16
    _check(_case(T=16, E=5, index=index))


@pytest.mark.parametrize("k", [1, 8])
def test_top_k_one_and_eight(k):
    _check(_case(T=5, k=k, E=8, H=32, I=16))


def test_odd_expert_count_and_block_m_64():
    _check(_case(T=11, k=2, E=5, H=48, I=24), block_m=64)


def test_projection_without_adapter_and_different_ranks():
    _check(_case(r_gu=0, r_d=5))
    _check(_case(r_gu=3, r_d=0))
    _check(_case(r_gu=0, r_d=0))
    _check(_case(r_gu=20, r_d=2, T=6))  # RP 32 and 16


def test_gptoss_clamps_including_a_value_exactly_at_the_limit():
    """gpt_oss: interleaved gate/up columns, biases, values far past the clamp (W scaled up), and one gate
    exactly at the limit (its W row and B row zero, its bias 7.0): torch's clamp passes the gradient there,
    which dB_gu sees through d_gate."""
    case = _case(act="gptoss", w_scale_gu=4 * 64**-0.5, index=SKEWED)
    x, index, w, gu, d = case
    with torch.no_grad():
        gu.weight[2, :, 0] = 0.0  # transposed [E, H, 2I]: column 0 is expert 2's gate of channel 0
        gu.lora_B[0, 2::4] = 0.0  # B_e[o, j] = B[o, j*E + e]
        gu.bias[2, 0] = 7.0
    gu64, d64 = _as_double(gu), _as_double(d)
    h = x.detach().double() @ gu64.weight[2] + gu64.bias[2]
    assert (h[:, 0::2] > 7).any() and (h[:, 1::2].abs() > 7).any() and (h[:, 0] == 7.0).all()
    _check(case, act="gptoss", ref_proj=(gu64, d64))


def test_second_backward_through_a_retained_graph():
    x, index, w, gu, d = _case(T=6)
    out = moe_lora_experts(x, index, w, gu, d, block_m=16)
    dout = torch.randn_like(out)
    leaves = [x, w] + _lora_leaves(gu, d)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    second = torch.autograd.grad(out, leaves, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    x, index, w, gu, d = _case(T=4)
    out = moe_lora_experts(x, index, w, gu, d)
    with pytest.raises(RuntimeError, match="moe_lora_experts: its gradients come from kernels"):
        torch.autograd.grad(out.sum(), [x], create_graph=True)


def test_fp16_under_a_loss_scale():
    """fp16 activations and weights, fp32 LoRA factors (PEFT's), the gradient scaled by 1024 as a GradScaler
    does: the unscaled gradients match the fp64 reference to fp16's precision."""
    x, index, w, gu, d = _case(T=9)
    half = lambda p: ExpertProj(p.weight.half(), p.lora_A, p.lora_B, p.scale, p.bias, transposed=p.transposed)
    gu16, d16 = half(gu), half(d)
    x16 = x.detach().half().requires_grad_()
    dout = torch.randn(x.shape).to(DEVICE)
    out = moe_lora_experts(x16, index, w, gu16, d16)
    assert out.dtype == torch.float16
    leaves = [x16, w] + _lora_leaves(gu, d)
    grads = torch.autograd.grad(out, leaves, (dout * 1024).half())
    gu64 = ExpertProj(
        gu16.weight.double(), *[t.detach().double().requires_grad_() for t in (gu.lora_A, gu.lora_B)], gu.scale
    )
    d64 = ExpertProj(
        d16.weight.double(), *[t.detach().double().requires_grad_() for t in (d.lora_A, d.lora_B)], d.scale
    )
    x64, w64 = x16.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_moe_lora(x64, index, w64, gu64, d64)
    grads64 = torch.autograd.grad(ref, [x64, w64] + _lora_leaves(gu64, d64), dout.double())
    assert _rel(out, ref) < 3e-3
    for g, g64 in zip(grads, grads64):
        assert torch.isfinite(g).all() and _rel(g.double() / 1024, g64) < 5e-3


def test_routing_weights_in_the_models_dtype_get_their_gradient_in_it():
    x, index, w, gu, d = _case(T=5)
    w16 = w.detach().half().requires_grad_()
    out = moe_lora_experts(x, index, w16, gu, d)
    (dw,) = torch.autograd.grad(out.sum(), [w16])
    assert dw.dtype == torch.float16 and torch.isfinite(dw).all()


def _bad(case, match, exc=ValueError, **changes):
    x, index, w, gu, d = case
    args = dict(x=x, top_k_index=index, top_k_weights=w, gate_up=gu, down=d)
    args.update(changes)
    with pytest.raises(exc, match=match):
        moe_lora_experts(**args)


def test_bad_input_is_named():
    case = _case(T=5)
    x, index, w, gu, d = case
    _bad(case, "activation must be one of", activation="relu")
    _bad(case, r"x must be \[tokens, hidden\]", x=x[None])
    _bad(case, "top_k_index has dtype float32", TypeError, top_k_index=index.float())
    _bad(case, r"top_k_index must be \[tokens, k\] with 5 tokens", top_k_index=index[:3])
    _bad(case, "top_k_weights has shape", top_k_weights=w[:, :1])
    _bad(
        case,
        r"down.weight has shape \(4, 32, 32\); expected \[E, 64, in\]",
        down=ExpertProj(d.weight[:, :32], scale=1.0),
    )
    _bad(case, r"gate_up.weight has shape .*; expected \[E, 64, 64\]", gate_up=ExpertProj(gu.weight[:, :32]))
    _bad(
        case,
        "gate_up.weight requires grad, but the fused path keeps expert weights frozen",
        gate_up=ExpertProj(gu.weight.clone().requires_grad_(), gu.lora_A, gu.lora_B),
    )
    _bad(
        case,
        "gate_up.weight is torch.float16 but the compute dtype is torch.float32",
        TypeError,
        gate_up=ExpertProj(gu.weight.half(), gu.lora_A, gu.lora_B),
    )
    _bad(
        case,
        r"down.lora_A has shape \(10, 32\); expected PEFT's \[E\*r, in\]",
        down=ExpertProj(d.weight, d.lora_A[:10], d.lora_B),
    )
    _bad(
        case,
        r"down.lora_B has shape .*expected PEFT's \[out, r\*E\] = \[64, 16\]",
        down=ExpertProj(d.weight, d.lora_A, d.lora_B[:, :8]),
    )
    _bad(case, "has lora_A but no lora_B", down=ExpertProj(d.weight, d.lora_A))
    _bad(
        case,
        r"down.bias has shape \(4, 3\); expected \[E, out\] = \[4, 64\]",
        down=ExpertProj(d.weight, bias=torch.zeros(4, 3, device=DEVICE)),
    )
    _bad(case, "gate_up has 3 experts but down has 4", gate_up=ExpertProj(gu.weight[:3]))
    strided = gu.weight.transpose(1, 2).contiguous().transpose(1, 2)  # (the kernels would misread it: refused)
    _bad(case, r"gate_up.weight must be a contiguous stack, got strides \(4096, 1, 64\)", gate_up=ExpertProj(strided))
    _bad(case, "block_m must be", block_m=24)


# ---------------------------------------------------------------- the hybrid path (base_gemm="grouped_mm")
# torch._grouped_mm for the GEMMs, Triton for the GLU and the LoRA gradients. On the CPU it runs in fp32 / fp16
# beside the interpreted kernels; on a GPU in bf16 (test_gpu_hybrid_*).
CPU_ONLY = pytest.mark.skipif(HAS_CUDA, reason="the hybrid path in fp32 is a CPU case; the GPU's is bf16 (below)")


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Counts torch._grouped_mm calls: a hybrid test that did not run the hybrid path fails."""
    calls = []
    real = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return calls


HYBRID_CASES = {
    "skewed": dict(index=SKEWED),
    "one_expert_all_tokens": dict(T=16, E=5, index=torch.full((16, 2), 4)),
    "top_k_8": dict(T=5, k=8, E=8, H=32, I=16),
    "odd_experts": dict(T=11, k=2, E=5, H=48, I=24),
    "several_glu_column_tiles": dict(T=7, E=4, H=32, I=160, r_gu=7, r_d=33),  # (the row kernels' BN is 128)
    "rank_padded": dict(r_gu=20, r_d=2, T=6),
    "no_gate_up_adapter": dict(r_gu=0, r_d=5),
    "no_down_adapter": dict(r_gu=3, r_d=0),
    "no_adapter": dict(r_gu=0, r_d=0),
}


@CPU_ONLY
@pytest.mark.parametrize("name", sorted(HYBRID_CASES))
def test_hybrid_path_matches_reference(name, grouped_mm_calls):
    """The output and every gradient against the float64 reference, as the fused path's: an expert without a
    token, every token to one expert, top-k 8, an odd expert count, a rank padded to 32, absent adapters.
    Forward and backward: 2 frozen GEMMs each, and 3 per adapter (the rank-r product in both, the second
    factor's GEMM where the combine adds the term: the down projection forward, gate/up backward)."""
    case = _case(**HYBRID_CASES[name])
    _check(case, base_gemm="grouped_mm")
    _, _, _, gu, d = case
    assert len(grouped_mm_calls) == 4 + 3 * (gu.rank > 0) + 3 * (d.rank > 0)


@CPU_ONLY
def test_hybrid_path_second_backward_fp16_loss_scale_and_compile(grouped_mm_calls):
    x, index, w, gu, d = _case(T=6)
    leaves = [x, w] + _lora_leaves(gu, d)
    out = moe_lora_experts(x, index, w, gu, d, base_gemm="grouped_mm")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(out, leaves, dout)):
        assert torch.equal(a, b)
    fused = torch.autograd.grad(moe_lora_experts(x, index, w, gu, d, base_gemm="triton"), leaves, dout)
    for a, b in zip(first, fused):
        assert _rel(a, b) < FP32_TOL

    def layer(x, index, w):
        return moe_lora_experts(x, index, w, gu, d, base_gemm="grouped_mm")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, index, w), out)
    half = lambda p: ExpertProj(p.weight.half(), p.lora_A, p.lora_B, p.scale)
    x16 = x.detach().half().requires_grad_()
    out16 = moe_lora_experts(x16, index, w, half(gu), half(d), base_gemm="grouped_mm")
    grads16 = torch.autograd.grad(out16, [x16, w] + _lora_leaves(gu, d), (dout * 1024).half())
    for g16, g in zip(grads16, first):
        assert torch.isfinite(g16).all() and _rel(g16.double() / 1024, g) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,k,n_cols", [(0, 2, 64), (1, 1, 3), (37, 3, 300), (5, 8, 257)])
def test_combine_rows_gathers_weights_and_sums_each_tokens_rows(n_tokens, k, n_cols, dtype):
    """The hybrid path's unsort: out[t] = sum_j (rw[t k + j]) (rows + s extra)[row of slot t k + j], against
    float64 on odd widths (several column tiles, a masked tail), k 1 to 8, no token, with and without a LoRA
    term's rows. Bound: one rounding of the result to dtype (a whole ulp: Triton's interpreter truncates to
    bf16) and fp32 arithmetic over the k terms and their adds."""
    gen = torch.Generator().manual_seed(n_tokens * 31 + k)
    rows = torch.randn(n_tokens * k, n_cols, generator=gen).to(dtype).to(DEVICE)
    extra = torch.randn(n_tokens * k, n_cols, generator=gen).to(dtype).to(DEVICE)
    rw = torch.rand(n_tokens * k, generator=gen).to(DEVICE)
    slot = torch.randperm(n_tokens * k, generator=gen).to(torch.int32).to(DEVICE)
    eps = torch.finfo(dtype).eps
    for weighted in (True, False):
        for with_extra in (True, False):
            summed = rows.double() + (0.75 * extra.double() if with_extra else 0.0)
            terms = torch.empty_like(summed).index_copy_(0, slot.long(), summed)
            terms = (terms * (rw.double()[:, None] if weighted else 1.0)).view(n_tokens, k, n_cols)
            ref = terms.sum(1)
            out = combine_rows(rows, slot, rw, k, weighted, extra if with_extra else None, 0.75)
            assert out.dtype == dtype and out.shape == (n_tokens, n_cols)
            bound = eps * ref.abs() + 4 * k * torch.finfo(torch.float32).eps * terms.abs().sum(1) + 1e-30
            assert ((out.double() - ref).abs() <= bound).all(), (weighted, with_extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_glu_rows_forward_h_is_the_h_its_backward_recomputes(dtype):
    """With a LoRA term folded in, the GLU forward takes the GLU of the rounded pre-activations it writes back
    to eg, so the h the down projection (and HA) consumed is bit for bit the h the backward recomputes from eg
    for the routing weight's gradient and dA_down (rows sorted over 4 experts, several per row tile, one of them
    without a row between two that have some)."""
    from fusedlora.ops.moe_lora import RowsLoRA, glu_rows, glu_rows_backward, row_experts

    gen = torch.Generator().manual_seed(3)
    n_rows, n_inter, rp = 70, 96, 16
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dtype).to(DEVICE)
    start = torch.tensor([0, 30, 30, 31, 70], dtype=torch.int32, device=DEVICE)
    row_e = row_experts(start, n_rows)
    eg = rnd(n_rows, 2 * n_inter, s=2.0)
    h = glu_rows(eg, "silu", 1.702, 7.0, RowsLoRA(row_e, rnd(n_rows, rp), rnd(4, rp, 2 * n_inter, s=0.25), 0.5, rp))
    rw = torch.rand(n_rows, generator=gen).to(DEVICE)
    slot = torch.randperm(n_rows, generator=gen).to(torch.int32).to(DEVICE)
    fold = RowsLoRA(row_e, rnd(n_rows, rp), rnd(4, rp, n_inter, s=0.25), 0.5, rp)
    _, _, h_again = glu_rows_backward(rnd(n_rows, n_inter), eg, rw, slot, "silu", 1.702, 7.0, fold)
    assert torch.equal(h, h_again)


def test_base_gemm_choice_and_refusals():
    case = _case(T=5)
    x, index, w, gu, d = case
    cpu = torch.zeros(1, 64)
    assert base_gemm_of("auto", cpu, torch.float32, gu, d, "silu") == "triton"  # the CPU runs the fused kernels
    assert base_gemm_of("triton", cpu, torch.float32, gu, d, "silu") == "triton"
    if not HAS_CUDA:
        assert base_gemm_of("grouped_mm", cpu, torch.float32, gu, d, "silu") == "grouped_mm"
    _bad(case, "base_gemm must be one of", base_gemm="cublas")
    g_case = _case(T=5, act="gptoss")
    _bad(
        g_case,
        "base_gemm='grouped_mm' cannot run this call: it serves silu experts without biases",
        activation="gptoss",
        base_gemm="grouped_mm",
    )
    if HAS_CUDA:
        _bad(case, "torch._grouped_mm takes bf16 on the GPU", base_gemm="grouped_mm")
    odd = _case(T=5, H=36, I=18)
    if not HAS_CUDA:  # (fp32: 4-element rows)
        _bad(odd, "multiples of 4", base_gemm="grouped_mm")


ROUTE_BAD = """
import torch
from fusedlora.ops.moe_lora import moe_route
index = torch.randint(0, 4, (5, 2), device="cuda")
index[2, 1] = {bad}
moe_route(index, 4, 64)
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("bad", [4, -1])
def test_index_out_of_range_fails_on_the_device_check(bad):
    """An expert index outside [0, E) is caught without a host sync: a device-side assertion (its own process
    on a GPU, where it ends the CUDA context), naming the argument and the range."""
    if HAS_CUDA:
        assert_device_assert(ROUTE_BAD.format(bad=bad), "top_k_index has values outside [0, 4)")
        return
    x, index, w, gu, d = _case(T=5)
    wrong = index.clone()
    wrong[2, 1] = bad
    with pytest.raises(RuntimeError, match=r"top_k_index has values outside \[0, 4\)"):
        moe_lora_experts(x, wrong, w, gu, d)


# ---------------------------------------------------------------- NF4 experts (bitsandbytes quantize_4bit)
def _bnb():
    """bitsandbytes.functional, or a skip of the NF4 test that asks (the rest of the file needs no bitsandbytes)."""
    return pytest.importorskip("bitsandbytes.functional")


def _nf4(W, nested):
    packed, qs = _bnb().quantize_4bit(W.contiguous(), blocksize=64, compress_statistics=nested, quant_type="nf4")
    return packed, qs


def _quantised_proj(n_out, n_in, E, nested, transposed, dtype):
    W = (torch.randn(E, n_out, n_in) * 0.3).to(DEVICE, dtype)
    stored = W.transpose(1, 2).contiguous() if transposed else W
    packed, qs = _nf4(stored, nested)
    return ExpertProj(packed, quant_state=qs, transposed=transposed), _bnb().dequantize_4bit(packed, qs)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_chunks_are_bit_identical_to_bitsandbytes(nested, transposed, dtype, monkeypatch):
    """Each chunk of experts the GEMMs read, dequantised from a slice of the packed stack, against bnb's
    dequantize_4bit of the whole stack, every element: chunks of 4 experts of 720 elements (a 64-element block
    spans experts' rows, and chunks start on whole blocks), or, nested, of one expert of 16,384 (whole
    second-level blocks of 256 x 64)."""
    from fusedlora.ops import moe_lora as ops

    n_out, n_in, E = (20, 36, 9) if not nested else (64, 256, 3)
    p, ref = _quantised_proj(n_out, n_in, E, nested, transposed, dtype)
    data, quant, blocksize, nested_flag = ops._quant_args(p, p.weight)
    proj = ops._proj(data, quant, None, None, None, transposed, blocksize, nested_flag, 1.0, E, n_out * n_in, ref)
    monkeypatch.setattr(ops, "MOE_NF4_CHUNK_BYTES", 1)  # the smallest chunks the blocks allow
    ranges = ops.expert_ranges(proj, proj, E, ref.element_size())
    assert ranges == ([(0, 4), (4, 8), (8, 9)] if not nested else [(0, 1), (1, 2), (2, 3)])
    ref = ref.reshape(E, -1)

    def chunk(first, end, out_dtype):
        scratch = ops._scratch(proj, ranges, torch.empty(0, dtype=out_dtype, device=DEVICE)).fill_(float("nan"))
        return ops._stack(proj, first, end, scratch).view(end - first, -1)

    for first, end in ranges:
        if dtype != torch.bfloat16 or HAS_CUDA:
            assert torch.equal(chunk(first, end, dtype), ref[first:end]), (first, end)
        else:  # the interpreter truncates fp32 -> bf16 (tests/test_quant.py): the fp32 values, rounded both ways
            exact = chunk(first, end, torch.float32)
            truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
            assert torch.equal(exact.to(torch.bfloat16), ref[first:end]), (first, end)
            assert torch.equal(chunk(first, end, torch.bfloat16), truncated), (first, end)


def test_expert_ranges_cover_the_stack_in_aligned_chunks_under_the_budget(monkeypatch):
    from fusedlora.ops import moe_lora as ops

    def proj(numel, blocksize, nested):
        return ops._proj(
            torch.empty(0), [torch.empty(0)], None, None, None, False, blocksize, nested, 1.0, 1, numel, torch.empty(0)
        )

    plain = ops._proj(torch.empty(0), [], None, None, None, False, 0, False, 1.0, 1, 100, torch.empty(0))
    assert ops.expert_ranges(plain, plain, 128, 2) == [(0, 128)]  # bf16 stacks: one launch
    qwen_gu, qwen_d = proj(1536 * 2048, 64, True), proj(2048 * 768, 64, True)
    ranges = ops.expert_ranges(qwen_gu, qwen_d, 128, 2)
    per_expert = (1536 * 2048 + 2048 * 768) * 2
    assert len(ranges) == 5 and all((e - f) * per_expert <= ops.MOE_NF4_CHUNK_BYTES for f, e in ranges)
    for gu, d, align in (
        (proj(720, 64, False), proj(360, 64, False), 64),
        (proj(3 * 5 * 64, 64, True), plain, 64 * 256),
    ):
        monkeypatch.setattr(ops, "MOE_NF4_CHUNK_BYTES", 1)
        ranges = ops.expert_ranges(gu, d, 1000, 2)
        assert ranges[0][0] == 0 and ranges[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for q in (p for p in (gu, d) if p.quant):
            assert all(first * q.expert_numel % align == 0 for first, _ in ranges)
        monkeypatch.setattr(ops, "MOE_NF4_CHUNK_BYTES", 256 << 20)
    big = proj(14336 * 4096, 64, True)  # a Mixtral expert is past the budget alone: one expert a chunk
    assert ops.expert_ranges(big, big, 8, 2) == [(e, e + 1) for e in range(8)]


@pytest.mark.parametrize(
    "act,nested,chunk_bytes,quantised",
    [
        ("silu", True, None, ("gu", "d")),
        ("silu", False, 1, ("gu", "d")),
        ("silu", False, 1, ("gu",)),
        ("gptoss", True, None, ("gu", "d")),
    ],
)
def test_nf4_experts_match_the_reference_on_the_dequantised_stack(act, nested, chunk_bytes, quantised, monkeypatch):
    """chunk_bytes 1: one launch per expert (each chunk dequantised into the scratch the last one used), the
    bf16 stack beside an NF4 one read from the chunk's first expert."""
    from fusedlora.ops import moe_lora as ops

    if chunk_bytes is not None:
        monkeypatch.setattr(ops, "MOE_NF4_CHUNK_BYTES", chunk_bytes)
    # (H 64, I 20: bitsandbytes 0.50's CPU quantize_4bit mangles some layouts, e.g. a last dimension of 48:
    # its own dequantize_4bit is then 2.0 off the input, so those shapes test nothing here)
    x, index, w, gu, d = _case(T=9, H=64, I=20, act=act, index=SKEWED[:9])
    q = {}
    for name, p in (("gu", gu), ("d", d)):
        if name not in quantised:
            q[name] = p
            continue
        packed, qs = _nf4(p.weight, nested)
        q[name] = ExpertProj(packed, p.lora_A, p.lora_B, p.scale, p.bias, qs, p.transposed)
    errs = _check((x, index, w, q["gu"], q["d"]), act)  # the reference decodes with bnb's dequantize_4bit
    assert set(errs) == {"out", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d"}


# ---------------------------------------------------------------- against transformers' experts modules
def _merged(W, A, B, scale, transposed):
    """PEFT 0.21's merged weight for one forward (B_e[o, j] = B[o, j*E + e]), in the stored layout."""
    E = W.shape[0]
    r = A.shape[0] // E
    delta = scale * B.view(B.shape[0], r, E).permute(2, 0, 1) @ A.view(E, r, -1)  # [E, out, in]
    return W + (delta.transpose(1, 2) if transposed else delta)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_matches_transformers_experts_with_merged_lora(family):
    """The layout contract: transformers' own experts module (its default grouped_mm implementation; eager for
    gpt_oss's clamped GLU), its weights merged with the LoRA factors as PEFT does, gives the fused op's output
    and gradients (fp32)."""
    import transformers

    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, hidden_act="silu"
        )
        config._experts_implementation = "grouped_mm"
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        act = "silu"
    else:
        config = transformers.GptOssConfig(
            hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2
        )
        config._experts_implementation = "eager"
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        act = "gptoss"
    experts = Experts(config).to(DEVICE).requires_grad_(False)
    x, index, w, gu, d = _case(T=7, act=act, w_scale_gu=3 * 64**-0.5 if act == "gptoss" else None)
    params = {"gate_up_proj": gu.weight, "down_proj": d.weight}
    if act == "gptoss":
        params.update(gate_up_proj_bias=gu.bias, down_proj_bias=d.bias)
    for name, value in params.items():
        getattr(experts, name).copy_(value)
    merged = {
        "gate_up_proj": _merged(gu.weight, gu.lora_A, gu.lora_B, gu.scale, gu.transposed),
        "down_proj": _merged(d.weight, d.lora_A, d.lora_B, d.scale, d.transposed),
    }
    ref = torch.func.functional_call(experts, merged, (x, index, w))
    out = moe_lora_experts(
        x,
        index,
        w,
        gu,
        d,
        act,
        alpha=experts.alpha if act == "gptoss" else 1.702,
        limit=experts.limit if act == "gptoss" else 7.0,
    )
    leaves = [x, w] + _lora_leaves(gu, d)
    dout = torch.randn_like(out)
    for a, b in zip((out,) + torch.autograd.grad(out, leaves, dout), (ref,) + torch.autograd.grad(ref, leaves, dout)):
        assert _rel(a, b) < 1e-5


def test_torch_compile_fullgraph_matches_eager():
    """One custom op (fusedlora::moe_lora_experts, with its backward op) for eager and torch.compile: no graph
    break, the same output and gradients."""
    x, index, w, gu, d = _case(T=6)

    def layer(x, index, w):
        return moe_lora_experts(x, index, w, gu, d)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = [x, w] + _lora_leaves(gu, d)
    eager_out, compiled_out = layer(x, index, w), compiled(x, index, w)
    assert torch.equal(eager_out, compiled_out)
    for a, b in zip(torch.autograd.grad(eager_out.sum(), leaves), torch.autograd.grad(compiled_out.sum(), leaves)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GPU: a real layer shape, bf16, no host sync
def _real_layer(T, nf4=False, seed=0):
    """Qwen3-30B-A3B's experts (H 2048, I 768, E 128, k 8), r 16, bf16 activations and weights, fp32 LoRA."""
    H, I, E, k, r = 2048, 768, 128, 8, 16
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *shape, s=1.0: torch.randn(*shape, generator=gen, device="cuda") * s

    def proj(n_out, n_in):
        W = randn(E, n_out, n_in, s=n_in**-0.5).to(torch.bfloat16)
        A = randn(E * r, n_in, s=n_in**-0.5).requires_grad_()
        B = randn(n_out, r * E, s=0.05).requires_grad_()
        if nf4:
            packed, qs = _bnb().quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            return ExpertProj(packed, A, B, 2.0, quant_state=qs)
        return ExpertProj(W, A, B, 2.0)

    x = randn(T, H).to(torch.bfloat16).requires_grad_()
    weights, index = torch.softmax(randn(T, E), -1).topk(k, -1)
    return x, index, weights.to(torch.bfloat16).requires_grad_(), proj(2 * I, H), proj(H, I)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True])
def test_gpu_real_layer_bf16_against_fp32_reference(nf4):
    x, index, w, gu, d = _real_layer(4096, nf4)
    dout = torch.randn_like(x)
    out = moe_lora_experts(x, index, w, gu, d)
    leaves = [x, w] + _lora_leaves(gu, d)
    grads = torch.autograd.grad(out, leaves, dout)
    as32 = lambda t: t.detach().float().requires_grad_()
    ref_leaves = [as32(t) for t in leaves]
    dense = lambda p: p.weight if p.quant_state is None else _bnb().dequantize_4bit(p.weight, p.quant_state)
    gu32 = ExpertProj(dense(gu).float(), ref_leaves[2], ref_leaves[3], gu.scale)
    d32 = ExpertProj(dense(d).float(), ref_leaves[4], ref_leaves[5], d.scale)
    ref = naive_moe_lora(ref_leaves[0], index, ref_leaves[1], gu32, d32)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    from fusedlora.ops._common import rel_err

    for name, a, b in zip(["out", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d"], (out,) + grads, (ref,) + ref_grads):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


@pytest.mark.gpu
def test_gpu_step_makes_no_host_sync():
    """Forward and backward under torch.cuda.set_sync_debug_mode("error"): routing metadata, grids and every
    launch from shapes alone (after a first call has compiled or loaded the kernels)."""
    x, index, w, gu, d = _real_layer(1024)
    leaves = [x, w] + _lora_leaves(gu, d)
    torch.autograd.grad(moe_lora_experts(x, index, w, gu, d), leaves, torch.ones_like(x))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_lora_experts(x, index, w, gu, d)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_hybrid_matches_fused_and_reference_without_host_sync(grouped_mm_calls):
    """The hybrid path on the GPU (bf16, sm_90): the same output and gradients as the fused kernels within bf16
    rounding, both against the fp32 reference; no host sync."""
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's grouped kernels are sm_90 / sm_100")
    x, index, w, gu, d = _real_layer(4096)
    assert base_gemm_of("auto", x, x.dtype, gu, d, "silu") == "grouped_mm"
    dout = torch.randn_like(x)
    leaves = [x, w] + _lora_leaves(gu, d)
    runs = {}
    for base in ("grouped_mm", "triton"):
        out = moe_lora_experts(x, index, w, gu, d, base_gemm=base)
        runs[base] = (out,) + torch.autograd.grad(out, leaves, dout)
    assert len(grouped_mm_calls) == 10  # (forward and backward: 2 frozen GEMMs, 3 per adapter)
    as32 = lambda t: t.detach().float().requires_grad_()
    ref_leaves = [as32(t) for t in leaves]
    gu32 = ExpertProj(gu.weight.float(), ref_leaves[2], ref_leaves[3], gu.scale)
    d32 = ExpertProj(d.weight.float(), ref_leaves[4], ref_leaves[5], d.scale)
    ref = naive_moe_lora(ref_leaves[0], index, ref_leaves[1], gu32, d32)
    ref_all = (ref,) + torch.autograd.grad(ref, ref_leaves, dout.float())
    names = ["out", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d"]
    for name, a, b, r in zip(names, runs["grouped_mm"], runs["triton"], ref_all):
        assert _rel(a, r) < 2e-2 and _rel(a, b) < 2e-2, (name, _rel(a, r), _rel(a, b))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_lora_experts(x, index, w, gu, d, base_gemm="grouped_mm")
        torch.autograd.grad(out, leaves, dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("base_gemm", ["triton", "grouped_mm"])
def test_gpu_autocast_keeps_the_compute_dtype(base_gemm):
    """Under CUDA autocast (bf16) the output and dx stay bf16: autocast runs a sum without a dtype in fp32, which
    once made the MoE block's output fp32 (and the residual stream after it, its norms JIT-compiled in fp32)."""
    if base_gemm == "grouped_mm" and torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's grouped kernels are sm_90 / sm_100")
    x, index, w, gu, d = _real_layer(256)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe_lora_experts(x, index, w, gu, d, base_gemm=base_gemm)
        assert out.dtype == torch.bfloat16
        (dx,) = torch.autograd.grad(out.float().sum(), [x])
    assert dx.dtype == torch.bfloat16


@pytest.mark.parametrize("layer", [m for m in MOE_LAYERS if m["act"] == "silu"], ids=lambda m: m["name"])
def test_hybrid_row_kernels_bind_to_the_prebuilt_variants(layer, monkeypatch):
    """Each row kernel of the hybrid path, launched as the op launches it at a family layer's real dims (bf16,
    ranks 0 / 16 / 64), binds to a variant the AOT build makes for the common family: on a GPU none of them
    falls to triton.jit (an int argument that Triton specialises, a stride equal to 1 or a top-k that is not a
    multiple of 16, would key a variant the build never made). The launches record their key and run nothing."""
    from fusedlora import loader, registry
    from fusedlora.ops.moe_lora import RowsLoRA, glu_rows, glu_rows_backward, row_experts

    names = ("moe_glu_rows_fwd", "moe_glu_rows_bwd", "moe_combine_rows")
    wanted = {v.key for v in registry.family_variants(COMMON, [90], names)}
    launched = []
    monkeypatch.setattr(
        loader.KernelLauncher,
        "_cpu",
        lambda self, grid, args, constexprs: launched.append((self.spec.name, self.bind(*args)[0], constexprs)),
    )
    H, I, E, k = layer["hidden"], layer["intermediate"], layer["experts"], layer["top_k"]
    T = 3
    bf = torch.bfloat16
    route = moe_route(torch.stack([torch.randperm(E)[:k] for _ in range(T)]), E, 64)
    rw = torch.rand(T * k)
    rows = torch.zeros(T * k, H, dtype=bf)
    for weighted in (True, False):
        combine_rows(rows, route.slot, rw, k, weighted)
        combine_rows(rows, route.slot, rw, k, weighted, torch.zeros_like(rows), 2.0)
    for rank in COMMON["moe_ranks"]:
        rp = max(16, rank)
        eg, g = torch.zeros(T * k, 2 * I, dtype=bf), torch.zeros(T * k, I, dtype=bf)
        fold_fwd = fold_bwd = None
        if rank:  # the factor stacks as _grouped_proj hands them over: B^T [E, RP, 2I] (a view), A [E, RP, I]
            row_e, small = row_experts(route.start, T * k), torch.zeros(T * k, rp, dtype=bf)
            fold_fwd = RowsLoRA(row_e, small, torch.zeros(E, 2 * I, rp, dtype=bf).transpose(1, 2), 2.0, rank)
            fold_bwd = RowsLoRA(row_e, small, torch.zeros(E, rp, I, dtype=bf), 2.0, rank)
        glu_rows(eg, "silu", 1.702, 7.0, fold_fwd)
        glu_rows_backward(g, eg, rw, route.slot, "silu", 1.702, 7.0, fold_bwd)
    assert {name for name, _, _ in launched} == set(names)
    for key in launched:
        assert key in wanted, f"no prebuilt variant for the launch {key}"
