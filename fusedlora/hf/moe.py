"""MoE blocks (issue 36): the routed experts of a `*SparseMoeBlock` / `GptOssMLP` through
`fusedlora.ops.moe_lora_experts`, with PEFT's `target_parameters` LoRA read from the experts chain at every call.

The fused forward is bound to the block, not to its experts: the block still calls HF's router module (so
router logits, top-k, `norm_topk_prob` and the `router_logits` that the load-balancing loss records stay HF's,
and a LoRA'd router keeps PEFT's path), then hands (x, top-k indices, top-k weights) and the experts' weights
and adapters to the op. PEFT wraps `block.experts` in one `ParamWrapper` per targeted parameter whenever it is
applied, before or after patching, so the chain is walked at each call (docs/moe-design.md sections 2, 5.5).
A call the op cannot serve runs the block's own forward (HF's router, then PEFT's experts path), counted as a
run-time fallback, except for NF4 experts (`fusedlora.quantize_experts`), which no other path runs: that call
raises, saying why.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ops.moe_lora import MOE_ACTIVATIONS, ExpertProj, moe_lora_experts, naive_glu
from .families import Family
from .forwards import PATCH_ATTR, tensor_problem
from .report import KindCount

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
SHARED_EXPERT = ("shared_expert", "shared_expert_gate")  # Qwen2-MoE: out += sigmoid(gate(x)) * shared_expert(x)


@dataclasses.dataclass(frozen=True)
class MoEFacts:
    """What moe_forward reads about a MoE block, found when patching."""

    activation: str  # a key of ops.moe_lora.MOE_ACTIVATIONS
    shared_expert: bool  # Qwen2-MoE's gated shared expert
    base_gemm: str = "auto"  # patch's moe_base_gemm (ops.moe_lora.MOE_BASE_GEMMS)

    def configured(self, options) -> MoEFacts:
        return dataclasses.replace(self, base_gemm=options.moe_base_gemm)


# ------------------------------------------------------------------------------- reading the chain
def _is_param_wrapper(m) -> bool:
    """A PEFT LoRA `ParamWrapper` (target_parameters): it adapts one parameter of the module it wraps."""
    return isinstance(getattr(m, "parameter_name", None), str) and "lora_A" in m._modules and hasattr(m, "base_layer")


def experts_chain(block):
    """({parameter name: PEFT ParamWrapper}, the experts module under them) of a MoE block, or raises
    UnsupportedExperts when a wrapper adapts a parameter the fused op does not read, or one twice."""
    wrappers, m = {}, block.experts
    while _is_param_wrapper(m):
        name = m.parameter_name
        if name not in EXPERT_PARAMS:
            raise UnsupportedExperts(f"a LoRA adapter on the experts' {name} (fused: {', '.join(EXPERT_PARAMS)})")
        if name in wrappers:
            raise UnsupportedExperts(f"two LoRA wrappers on the experts' {name}")
        wrappers[name] = m
        m = m.base_layer
    return wrappers, m


class UnsupportedExperts(ValueError):
    """Why the fused op cannot serve a MoE block's experts (as they are now)."""


def expert_weight(experts, name):
    """(weight, NF4 quant state or None, its [E, a, b] shape as stored) of an experts parameter."""
    W = getattr(experts, name, None)
    if not isinstance(W, torch.Tensor):
        raise UnsupportedExperts(f"the experts module has no {name} tensor")
    quant = getattr(W, "quant_state", None)
    if quant is not None and getattr(quant, "quant_type", None) != "nf4":
        raise UnsupportedExperts(
            f"{name} is quantised as {getattr(quant, 'quant_type', type(quant).__name__)!r} (fused: bitsandbytes nf4)"
        )
    shape = tuple(quant.shape) if quant is not None else tuple(W.shape)
    if len(shape) != 3:
        raise UnsupportedExperts(f"{name} is {len(shape)}-d, not a [experts, out, in] stack")
    return W, quant, shape


def _lora(wrapper, num_experts, in_features, out_features):
    """(lora_A, lora_B, scale) of the wrapper's active adapter as PEFT's forward would apply it now, or
    (None, None, 1.0) where PEFT's forward adds no LoRA term (adapters disabled, merged into the weight, or no
    adapter of that name on this parameter)."""
    if wrapper is None:
        return None, None, 1.0
    active = list(getattr(wrapper, "active_adapters", None) or [])
    if getattr(wrapper, "disable_adapters", False):
        if getattr(wrapper, "merged", False):  # (PEFT's forward unmerges the weight first)
            raise UnsupportedExperts(f"adapters disabled while merged into {wrapper.parameter_name}")
        return None, None, 1.0
    if getattr(wrapper, "merged", False):
        return None, None, 1.0
    if len(active) > 1:
        raise UnsupportedExperts(
            f"{len(active)} active adapters at once on {wrapper.parameter_name}; fusedlora fuses a single adapter"
        )
    if not active or active[0] not in wrapper.lora_A:
        return None, None, 1.0
    A, B = wrapper.lora_A[active[0]].weight, wrapper.lora_B[active[0]].weight
    r = A.shape[0] // num_experts if A.dim() == 2 else 0
    if (
        getattr(wrapper, "num_experts", num_experts) != num_experts
        or r == 0
        or A.shape != (num_experts * r, in_features)
        or B.shape != (out_features, num_experts * r)
    ):
        raise UnsupportedExperts(
            f"{wrapper.parameter_name}'s LoRA factors (A {tuple(A.shape)}, B {tuple(B.shape)}) do not fit {num_experts} "
            f"experts of {in_features} -> {out_features} (LoRA added after the experts changed, e.g. after "
            "quantize_experts?)"
        )
    return A, B, float(wrapper.scaling[active[0]])


def _projection(experts, wrappers, name, transposed, has_bias, training):
    W, quant, shape = expert_weight(experts, name)
    E = shape[0]
    in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    bias = getattr(experts, f"{name}_bias", None) if has_bias else None
    frozen = [t for t in (W, bias) if t is not None]
    if training and any(t.requires_grad for t in frozen):
        raise UnsupportedExperts(
            "expert weights require grad (full fine-tuning of the experts, or PEFT not applied "
            "yet): the fused path trains only the adapters"
        )
    if quant is None and not W.is_contiguous():  # (a strided view of the stack: the op refuses it)
        raise UnsupportedExperts(f"experts.{name} is not a contiguous stack (strides {tuple(W.stride())})")
    A, B, scale = _lora(wrappers.get(name), E, in_f, out_f)
    return ExpertProj(W, A, B, scale, bias, quant, transposed)


def read_experts(block, act: str):
    """(gate_up, down) ExpertProj of the block's experts as PEFT's forward would run them at this call; raises
    UnsupportedExperts with the reason the op cannot serve them."""
    wrappers, experts = experts_chain(block)
    if getattr(experts, "_is_expert_parallel", False):
        raise UnsupportedExperts("expert parallelism (the experts hold a shard of the experts)")
    transposed, has_bias = act == "gptoss", act == "gptoss"
    training = torch.is_grad_enabled()
    gate_up = _projection(experts, wrappers, "gate_up_proj", transposed, has_bias, training)
    down = _projection(experts, wrappers, "down_proj", transposed, has_bias, training)
    return gate_up, down


def base_experts(block):
    """The experts module under the block's PEFT wrappers (whatever they adapt)."""
    m = block.experts
    while _is_param_wrapper(m):
        m = m.base_layer
    return m


def is_quantised(block) -> bool:
    """Whether the block's expert weights are NF4 (fusedlora.quantize_experts): no HF / PEFT path runs them."""
    experts = base_experts(block)
    return any(getattr(getattr(experts, n, None), "quant_state", None) is not None for n in EXPERT_PARAMS)


# --------------------------------------------------------------------------------- patch time
def start_report(report, family: Family):
    """The report's row for MoE blocks (only for a family that has them)."""
    if family.moe_block:
        report.kinds["moe"] = KindCount()


def _probe_problem(experts, act: str) -> str | None:
    """Why the experts' activation is not the one the op computes for this family, checked numerically (a
    custom act_fn or _apply_gate keeps HF's path), or None."""
    x = torch.linspace(-12, 12, 388).view(2, 194)  # (crosses gpt_oss's clamp limit of 7)
    try:
        with torch.no_grad():
            if act == "silu":
                got, want, what = experts.act_fn(x), F.silu(x), "act_fn"
            else:
                alpha, limit = float(experts.alpha), float(experts.limit)
                got, want, what = experts._apply_gate(x), naive_glu(x, act, alpha, limit), "_apply_gate"
    except Exception as e:  # noqa: BLE001 - any failure means we do not understand this experts class
        return f"its experts' activation failed on a probe input ({type(e).__name__})"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        return (
            f"the experts' {what} is not the {'silu GLU' if act == 'silu' else 'clamped SwiGLU'} the fused op computes"
        )
    return None


def _layout_problem(experts, act: str) -> str | None:
    """Why the experts' parameters are not the layout of docs/moe-design.md section 1.1, or None."""
    gptoss = act == "gptoss"
    flags = {
        "is_transposed": gptoss,
        "is_concatenated": not gptoss,
        "has_bias": gptoss,
        "has_gate": True,
        "has_post_expert_norm": False,
    }
    wrong = [f for f, want in flags.items() if hasattr(experts, f) and bool(getattr(experts, f)) != want]
    if wrong:
        return f"the experts' {', '.join(wrong)} differ from the family's layout"
    (E, a, b), (E2, c, d) = (expert_weight(experts, n)[2] for n in EXPERT_PARAMS)
    gu_out, gu_in, d_out, d_in = (b, a, d, c) if gptoss else (a, b, c, d)
    if E2 != E or gu_out % 2 or d_in != gu_out // 2 or d_out != gu_in:
        return f"the experts' shapes ({E}, {a}, {b}) and ({E2}, {c}, {d}) are not a GLU's gate_up and down"
    if gptoss:
        biases = [getattr(experts, f"{n}_bias", None) for n in EXPERT_PARAMS]
        if any(not isinstance(t, torch.Tensor) or t.shape != (E, n) for t, n in zip(biases, (gu_out, d_out))):
            return "the experts' gate_up_proj_bias / down_proj_bias are not [experts, out]"
    return None


def check_block(m, family: Family, known, checked):
    """patch's check for a MoE block: (MoEFacts, None), or (None, why it keeps HF's path)."""
    if family.moe_act not in MOE_ACTIVATIONS:
        return None, f"the family's expert activation {family.moe_act!r} has no fused op"
    children = set(m._modules)
    allowed = {family.moe_router, "experts"} | (set(SHARED_EXPERT) if children & set(SHARED_EXPERT) else set())
    if not {family.moe_router, "experts"} <= children or children != allowed:
        return None, (
            f"its submodules ({', '.join(sorted(children))}) are not a router ({family.moe_router}), experts"
            " and optionally a shared expert with its gate"
        )
    try:
        experts = experts_chain(m)[1]
        why = _layout_problem(experts, family.moe_act) or _probe_problem(experts, family.moe_act)
    except UnsupportedExperts as e:
        why = str(e)
    if why:
        return None, why
    return MoEFacts(family.moe_act, "shared_expert" in children), None


def trains_on_original(m, family: Family) -> str | None:
    """What of a just-patched block runs on HF / PEFT's path as the model stands now, or None: its router when
    it carries a LoRA adapter (by design), or every training call while the expert weights require grad."""
    router = getattr(m, family.moe_router)
    reasons = []
    if any("lora_A" in r._modules for r in router.modules()):
        reasons.append("the router carries a LoRA adapter: it runs PEFT's path (the routed experts are fused)")
    experts = base_experts(m)
    if any(getattr(experts, n).requires_grad for n in EXPERT_PARAMS):
        reasons.append(
            "expert weights require grad (no LoRA adapter yet, or full fine-tuning): training calls run "
            "HF's experts path (run-time fallbacks); no_grad calls are fused"
        )
    return "; ".join(reasons) or None


# ----------------------------------------------------------------------------------- the forward
def moe_forward(self, hidden_states, *args, **kwargs):
    """HF's MoE block forward with the routed experts through `moe_lora_experts` (the router, Mixtral's jitter
    and Qwen2-MoE's shared expert as HF computes them)."""
    rec = getattr(self, PATCH_ATTR)
    fam, facts = rec.family, rec.facts
    why = "unexpected arguments" if (args or kwargs) else tensor_problem(hidden_states)
    try:
        gate_up, down = read_experts(self, facts.activation)
    except UnsupportedExperts as e:
        why = why or str(e)
    jitter = getattr(self, "jitter_noise", 0) if self.training else 0
    if why:
        if is_quantised(self):
            raise RuntimeError(
                f"fusedlora: {type(self).__name__} holds NF4 experts (fusedlora.quantize_experts), which "
                f"only fusedlora's MoE path runs, and it cannot serve this call: {why}"
            )
        rec.fallbacks.note(rec.kind, why)
        # HF's router, then PEFT's experts path (a copy for Mixtral's in-place jitter: the input may be a view)
        return type(self).forward(self, hidden_states.clone() if jitter > 0 else hidden_states, *args, **kwargs)
    shape = hidden_states.shape
    if jitter > 0:  # Mixtral: HF's draw, applied out of place (in place fails on the fused RMSNorm's output, a view)
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    x = hidden_states.reshape(-1, shape[-1])
    shared = self.shared_expert(x) if facts.shared_expert else None
    _, top_k_weights, top_k_index = getattr(self, fam.moe_router)(x)
    experts = base_experts(self)
    alpha, limit = (float(experts.alpha), float(experts.limit)) if facts.activation == "gptoss" else (1.702, 7.0)
    out = moe_lora_experts(
        x, top_k_index, top_k_weights, gate_up, down, facts.activation, alpha, limit, base_gemm=facts.base_gemm
    )
    if shared is not None:
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
    out = out.reshape(shape)
    return (out, top_k_weights) if fam.moe_returns_scores else out


# ------------------------------------------------------------------------- NF4 experts, unpatched
class NF4ExpertsGuard:
    """The forward `quantize_experts` gives the top of a block's experts chain: HF's and PEFT's experts paths
    cannot run NF4 stacks, so a call that reaches them (the block unpatched) says what to do instead of failing
    inside PEFT's parametrization. A callable object so that pickling and deepcopy keep it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            "fusedlora: these experts hold NF4 weights (fusedlora.quantize_experts), which only "
            "fusedlora's MoE path runs: call fusedlora.patch(model) (with mlp=True) before running "
            "the model"
        )

    def __reduce__(self):
        return NF4ExpertsGuard, (self.module,)
