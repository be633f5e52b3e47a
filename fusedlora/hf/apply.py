"""`patch(model)` / `unpatch(model)`: one generic applier over the family table.

Patching binds a forward of `fusedlora.hf.forwards` to each matching module instance (never edits HF's
source or classes) and records the class's own forward as the way back. A module the fused path cannot
serve is left alone and the report says why; a call the fused path cannot serve at run time (an adapter
added after patching, full fine-tuning, a CPU tensor without the interpreter) runs the class's forward.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

import torch
import torch.nn.functional as F

from .. import peft_layers
from ..ops import naive_rms_norm
from ..ops._common import FLOAT_DTYPES, interpreting
from ..quant import weight_shape
from . import forwards, moe
from .families import FAMILIES, GENERIC, LOGIT_CHANGING_CONFIG, Family, for_config
from .forwards import PATCH_ATTR, AttentionFacts, MLPFacts, NormFacts, PatchRecord
from .options import PatchOptions
from .report import PatchReport

ACTIVATIONS = {  # fused activation name -> reference the module's act_fn must match
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def find_hf_model(model):
    """The outermost module with a HF config (`.config.model_type`): the model itself, or the HF model
    inside a PEFT wrapper."""
    for m in model.modules():
        if isinstance(getattr(getattr(m, "config", None), "model_type", None), str):
            return m
    return None


GC_ATTR = "_fusedlora_checkpointing"  # a layer's HF checkpointing settings before offload_checkpoints


def unpatch(model) -> int:
    """Restore every forward `patch` replaced, the layers' checkpointing settings and the layers'
    `cuda_graph_layers` wrappers; returns how many modules it restored."""
    _require_module("unpatch", model)
    from ..cuda_graphs import ungraph_modules

    n = ungraph_modules(model.modules())
    for m in model.modules():
        if PATCH_ATTR in m.__dict__:
            _remove_patched_forward(m)
            n += 1
        if GC_ATTR in m.__dict__:
            flag, func = m.__dict__.pop(GC_ATTR)
            m.gradient_checkpointing = flag
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func
            n += 1
    return n


def _remove_patched_forward(m):
    """Undo `_bind` on `m`, leaving any forward installed after patching in place. Patch binds only modules
    without an instance-level forward, so the class's forward is what was there before. A hook added on top
    (accelerate's add_hook_to_module keeps the forward it wraps as `_old_forward`) gets the class's forward
    to wrap instead of the patched one; a wrapper fusedlora cannot see still works: a PatchedForward whose
    record is gone runs the class's forward."""
    del m.__dict__[PATCH_ATTR]
    if _installed_by_patch(m, m.__dict__.get("forward")):
        del m.__dict__["forward"]
    elif _installed_by_patch(m, m.__dict__.get("_old_forward")):
        m._old_forward = types.MethodType(type(m).forward, m)


def _installed_by_patch(m, forward) -> bool:
    """Whether `forward` is the forward `_bind` (or `compile_layers`' rebinding of it) gave module `m`."""
    if isinstance(forward, PatchedForward):
        return forward.module is m
    return isinstance(forward, types.MethodType) and forward.__self__ is m and forward.__func__ in FORWARDS.values()


def _offload_checkpoints(model, report, host_limit_gib=None):
    """HF's activation checkpointing on every decoder layer (GradientCheckpointingLayer) with
    fusedlora.checkpoint.offloaded_checkpoint, one Offloader for the model."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ..checkpoint import Offloader, offloaded_checkpoint

    limit = None if host_limit_gib is None else int(host_limit_gib * 2**30)
    fn = functools.partial(offloaded_checkpoint, offloader=Offloader(limit))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m.__dict__[GC_ATTR] = (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = fn
    report.notes.append(
        f"offloaded activation checkpointing on {len(layers)} decoder layers (inputs in pinned host memory)"
        if layers
        else "offload_checkpoints: no GradientCheckpointingLayer in this model"
    )


def _require_module(caller: str, model):
    """A clear error for what is not a model (a checkpoint name, a path...), before any attribute lookup fails."""
    if isinstance(model, torch.nn.Module):
        return
    hint = (
        f"; load it first, e.g. model = AutoModelForCausalLM.from_pretrained({model!r})"
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")
        else ""
    )
    raise TypeError(
        f"fusedlora.{caller}: expected the model (a torch.nn.Module: a Hugging Face or PEFT model), "
        f"got {type(model).__name__}{hint}"
    )


def _decoder_layers(model, caller: str, instead: str):
    _require_module(caller, model)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise TypeError(
            f"fusedlora.{caller}: {type(model).__name__} has no decoder layers "
            f"(transformers' GradientCheckpointingLayer); {instead}"
        )
    return layers


def cuda_graph_layers(model, *, warmup: int = 2, max_shapes: int = 1) -> int:
    """Replay each decoder layer's training forward and backward as CUDA graphs (fusedlora.cuda_graphs): a
    layer costs a few launches of host time instead of hundreds. For single-GPU (or DDP) training with
    static shapes (padded or fixed-length packed batches); calls it cannot serve (eval, no_grad, a KV cache,
    a new shape past `max_shapes`, a packed batch's varying lengths) run eagerly. Layers under gradient
    checkpointing (HF's, or patch(offload_checkpoints=True)) replay as checkpoint graphs: a forward that
    saves nothing and a recompute-and-backward, sharing one layer's working memory across the model.
    A shape is captured at its (warmup + 1)-th training call; each captured shape keeps its own activation
    memory. Not with FSDP (it swaps the parameters a graph reads). `fusedlora.unpatch(model)` removes it.
    Returns how many layers were wrapped."""
    from ..cuda_graphs import graph_modules

    _require_module("cuda_graph_layers", model)
    if not torch.cuda.is_available():
        raise RuntimeError("fusedlora.cuda_graph_layers: CUDA graphs need a CUDA GPU")
    if max_shapes < 1 or warmup < 0:
        raise ValueError(
            f"fusedlora.cuda_graph_layers: expected warmup >= 0 and max_shapes >= 1, got warmup={warmup}, "
            f"max_shapes={max_shapes}"
        )
    layers = _decoder_layers(model, "cuda_graph_layers", "wrap the step yourself with torch.cuda.graphs")
    busy = [
        type(m).__name__
        for m in layers
        if ("forward" in m.__dict__ and not _is_graphed(m)) or getattr(m, "_compiled_call_impl", None) is not None
    ]
    if busy:
        raise RuntimeError(
            f"fusedlora.cuda_graph_layers: decoder layers ({busy[0]}) are compiled "
            "(fusedlora.compile_layers) or have an instance-level forward (an accelerate hook); "
            "CUDA graphs wrap plain eager layers (under torch.compile use mode='reduce-overhead')"
        )
    graph_modules(layers, warmup=warmup, max_shapes=max_shapes)
    return len(layers)


def _cuda_graphs(model, report):
    """patch(cuda_graphs=True): the decoder layers under cuda_graph_layers, or a note saying why not."""
    try:
        n = cuda_graph_layers(model)
    except (RuntimeError, TypeError) as e:
        report.notes.append(f"cuda_graphs: not applied ({e})")
        return
    report.notes.append(
        f"CUDA graphs on {n} decoder layers (captured at a shape's third training call, "
        "checkpointed layers as checkpoint graphs; eval and new shapes run eagerly)"
    )


def _is_graphed(m) -> bool:
    from ..cuda_graphs import GraphedModule

    return isinstance(m.__dict__.get("forward"), GraphedModule)


def compile_layers(model, **compile_kwargs) -> int:
    """torch.compile each decoder layer (HF's GradientCheckpointingLayer) in place, `nn.Module.compile` with
    `compile_kwargs`: the layers share their code, so one compiled graph serves them all, and the first step
    compiles one layer instead of the whole model. The embedding, the final norm and the fused LM-head loss
    stay eager (they run once per step). Returns how many layers were compiled."""
    layers = _decoder_layers(model, "compile_layers", "use torch.compile(model) instead")
    for layer in layers:
        for m in layer.modules():
            if isinstance(m.__dict__.get("forward"), PatchedForward):
                # a bound method: Dynamo guards on its function, shared by all layers, where it guards on the
                # identity of each module's PatchedForward (a recompile per layer). (PatchedForward exists for
                # pickling, which a compiled module does not support anyway.)
                m.__dict__["forward"] = types.MethodType(FORWARDS[m.__dict__["forward"].kind], m)
        layer.compile(**compile_kwargs)
    return len(layers)


def patch(model, *, options: PatchOptions | None = None, **option_values) -> PatchReport:
    """Route a HF (or PEFT-wrapped HF) decoder model's RMSNorms, attention projections + RoPE, GLU MLPs and
    LM-head loss through fusedlora's kernels. Returns a report (print it). Patching again first restores
    HF's forwards, so patch twice = patch once; `unpatch(model)` restores them all.

    The options: keyword arguments, or `options=fusedlora.PatchOptions(...)` (keyword arguments given as well
    replace its fields). rms_norm, rope, mlp, qkv, o, loss (all True): False keeps that part on HF's path.

    offload_checkpoints: activation checkpointing of every decoder layer with its input kept in pinned host
    memory (fusedlora.checkpoint), in place of HF's gradient checkpointing; at most offload_host_limit_gib of
    it (None: 80 % of what the host leaves the process, cgroup limits included), inputs past that (or past what
    pinning gets) stay on the GPU, warned once. cuda_graphs: then `cuda_graph_layers(model)` (each decoder
    layer's training call replayed as CUDA graphs; static shapes, one GPU or DDP; the report says when it
    cannot apply). mlp_chunk_bytes: a training MLP
    call whose gate/up activations would exceed this many bytes runs in row chunks, each recomputed in the
    backward (long sequences: the [tokens, intermediate] buffers never exist whole). recompute_norms: the
    fused q/k/v and MLP projections after an RMSNorm keep the norm's input (which the norm's backward keeps
    anyway) rather than its output for their backward and recompute the output there: one activation of
    [tokens, hidden] less per norm (two per decoder layer) for one extra norm forward each. moe_base_gemm: how
    the routed experts' frozen GEMMs run ("auto", "triton" or "grouped_mm"; `fusedlora.ops.moe_lora_experts`'s
    base_gemm): "auto" takes torch._grouped_mm (CUTLASS) with the LoRA terms beside it for bf16 experts on
    sm_90 / sm_100, and fusedlora's fused grouped GEMMs elsewhere (NF4 experts, gpt_oss, other GPUs)."""
    _require_module("patch", model)
    options = PatchOptions.merged(options, option_values)
    hf = find_hf_model(model)
    if hf is None:
        raise TypeError(
            f"fusedlora.patch: found no Hugging Face model (a module with .config.model_type) in {type(model).__name__}"
        )
    graphed = sum(_is_graphed(m) for m in model.modules())
    unpatch(model)
    model_type = hf.config.model_type
    family = FAMILIES.get(model_type)
    text_type = getattr(getattr(hf.config, "text_config", None), "model_type", None)
    multimodal = family is None and text_type in FAMILIES
    if multimodal:  # (Gemma-3 4B+ and other image-text checkpoints: AutoModelForCausalLM gives the multimodal class)
        family = FAMILIES[text_type]
    report = PatchReport(model_type, family is not None)
    if multimodal:
        report.notes.append(
            f"{type(hf).__name__} is multimodal: its text decoder is patched as {text_type!r}; "
            "the vision tower and the model's own LM head and loss stay HF's"
        )
        report.kept("loss", f"{type(hf).__name__} computes its own (multimodal) loss")
    if graphed:
        report.notes.append(
            f"patching removed the CUDA-graph wrappers of {graphed} decoder layers: call "
            "fusedlora.cuda_graph_layers(model) again after patch"
        )
    if family is None:
        family = GENERIC
        report.notes.append(
            f"model_type {model_type!r} is not in fusedlora's family table ({', '.join(FAMILIES)}): only RMSNorm "
            "modules that match a reference numerically and the loss (when no config attribute changes the "
            "logits) are patched"
        )
    family, notes = for_config(family, hf.config.text_config if multimodal else hf.config)
    report.notes += notes
    moe.start_report(report, family)
    param = next(model.parameters(), None)
    if param is not None and not param.is_cuda and not (param.device.type == "cpu" and interpreting()):
        report.notes.append(
            f"the model is on {param.device} and TRITON_INTERPRET is not set: patched modules run "
            "HF's forward until the model is on a CUDA device"
        )
    unserved = sorted(
        {
            str(p.dtype).replace("torch.", "")
            for p in model.parameters()
            if p.is_floating_point() and p.dtype not in FLOAT_DTYPES
        }
    )
    if unserved:
        report.notes.append(
            f"the model has {', '.join(unserved)} parameters: patched modules run HF's forward on "
            f"tensors of a dtype the kernels do not serve ({forwards.SERVED_DTYPES}), counted as "
            "run-time fallbacks"
        )
    checked_norms: dict = {}
    for m in model.modules():
        kind = _kind_of(m, family, report.family_known)
        if kind is None:
            continue
        if not options.wants(kind):
            report.kept(kind, "turned off by the caller")
            continue
        if "forward" in m.__dict__:
            report.kept(kind, "has an instance-level forward (an accelerate hook or another patch)")
            continue
        facts, why = CHECKS[kind](m, family, report.family_known, checked_norms)
        if why:
            report.kept(kind, why)
            continue
        _bind(m, kind, PatchRecord(kind, family, report.fallbacks, facts.configured(options)))
        report.patched(kind, _trains_on_original(m, kind, family))
    if options.offload_checkpoints:
        _offload_checkpoints(model, report, options.offload_host_limit_gib)
    if options.cuda_graphs:
        _cuda_graphs(model, report)
    if param is not None and param.is_cuda:
        # Loading leaves the caching allocator holding blocks of its own sizes (a checkpoint cast or quantised
        # tensor by tensor); training's activations split them and the process holds far more than it uses
        # (8B QLoRA: 43.6 GiB reserved for a 29.6 GiB peak, 30.3 after this; BENCHMARKS.md, issue 34).
        torch.cuda.empty_cache()
    if report.n_patched == 0:
        kept = sum(c.kept for c in report.kinds.values())
        report.notes.append(
            "nothing was patched: "
            + (
                f"{kept} matching modules kept HF's path (reasons above)"
                if kept
                else "no module matched the family's module classes"
            )
        )
    return report


FORWARDS = {
    "rms_norm": forwards.norm_forward,
    "attention": forwards.attention_forward,
    "mlp": forwards.mlp_forward,
    "moe": moe.moe_forward,
    "loss": forwards.causal_lm_forward,
}


class PatchedForward:
    """A patched module's forward: FORWARDS[kind] bound to the module, under the class forward's signature (the
    HF Trainer drops dataset columns that the model's forward signature does not name). A callable object
    rather than a bound function so that pickling (torch.save of the model, deepcopy) keeps the patch: a bound
    method pickles as getattr(module, "forward"), which resolves to the class's forward on loading."""

    def __init__(self, kind: str, module):
        self.kind, self.module = kind, module
        self.__signature__ = _signature_without_self(type(module))
        self.__doc__ = type(module).forward.__doc__

    def __call__(self, *args, **kwargs):
        if PATCH_ATTR not in self.module.__dict__:  # unpatched while wrapped by something installed after patch
            return type(self.module).forward(self.module, *args, **kwargs)
        return FORWARDS[self.kind](self.module, *args, **kwargs)

    def __reduce__(self):
        return PatchedForward, (self.kind, self.module)

    def __repr__(self):
        return f"<fusedlora {self.kind} forward of {type(self.module).__name__}>"


@functools.lru_cache(maxsize=None)
def _signature_without_self(cls):
    sig = inspect.signature(cls.forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _bind(m, kind, rec):
    m.__dict__[PATCH_ATTR] = rec
    m.__dict__["forward"] = PatchedForward(kind, m)


def _kind_of(m, family: Family, known: bool):
    name = type(m).__name__
    if name in family.norms or (not known and name.endswith("RMSNorm")):
        return "rms_norm"
    if name in family.attention:
        return "attention"
    if name in family.moe_block:
        return "moe"
    if name in family.mlp:
        return "mlp"
    if name in family.causal_lm or (not known and name.endswith("ForCausalLM")):
        return "loss"
    return None


# ------------------------------------------------------------------------------ per-kind checks
def _check_norm(m, family, known, checked):
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    weight = getattr(m, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None, "no 1-d weight and float eps (variance_epsilon / eps)"
    cls = type(m)
    if cls not in checked:
        checked[cls] = _match_norm(m, family, known)
    match = checked[cls]
    if isinstance(match, str):
        return None, match
    casting, offset = match
    return NormFacts(eps, casting, offset), None


def _match_norm(m, family, known):
    """(casting, offset) whose reference reproduces this class's own forward on a random input, or why none."""
    candidates = (
        [(family.norm_casting, family.norm_offset)] if known else [("llama", 0.0), ("gemma", 1.0), ("gemma", 0.0)]
    )
    w = m.weight
    if w.device.type == "meta":
        return candidates[0] if known else "weights on the meta device: cannot check the norm's semantics"
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, w.shape[0], generator=gen) * 3).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        try:
            ref = type(m).forward(m, x)
        except Exception as e:  # noqa: BLE001 - any failure means we do not understand this class
            return f"its forward failed on a probe input ({type(e).__name__})"
        tol = 1e-5 if w.dtype == torch.float32 else 2e-2
        for casting, offset in candidates:
            y = naive_rms_norm(x, w, m.variance_epsilon if hasattr(m, "variance_epsilon") else m.eps, offset, casting)
            if y.dtype == ref.dtype and torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol):
                return casting, offset
    return "its forward matches no RMSNorm reference (llama / gemma casting)"


def _projections(kind, family):
    """The LoRA-able projections the fused forward of an attention or MLP module of this family computes."""
    if kind == "attention":
        return ("qkv_proj", "o_proj") if family.fused_projections else ("q_proj", "k_proj", "v_proj", "o_proj")
    return ("gate_up_proj", "down_proj") if family.fused_projections else ("gate_proj", "up_proj", "down_proj")


def _trains_on_original(m, kind, family) -> str | None:
    """Why a training call of this just-patched module would run its projections on HF's path as the model
    stands now, or None:
    the fused LoRA functions give no gradient to a base weight that trains (a model without LoRA adapters
    yet, or full fine-tuning). Calls without gradients, and training calls once PEFT freezes the base
    weights, take the fused path."""
    if kind == "moe":
        return moe.trains_on_original(m, family)
    if kind not in ("attention", "mlp"):
        return None
    training = [
        name
        for name in _projections(kind, family)
        if peft_layers.get_lora_parameters(getattr(m, name))[0].requires_grad
    ]
    if not training:
        return None
    return (
        f"base weights ({', '.join(training)}) require grad (no LoRA adapter, or full fine-tuning): training calls "
        "run these projections on HF's path (run-time fallbacks) until PEFT adds adapters; no_grad calls are fused"
    )


def _check_attention(m, family, known, checked):
    projections = _projections("attention", family)
    missing = [a for a in projections + ("head_dim", "scaling", "config") if not hasattr(m, a)]
    if family.qk_norm or family.qk_norm_full:
        missing += [a for a in ("q_norm", "k_norm") if not hasattr(m, a)]
    if family.rope_attr and not hasattr(m, family.rope_attr):
        missing.append(family.rope_attr)
    if missing:
        return None, f"no {', '.join(missing)}"
    eager = getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None)
    if eager is None:
        return None, "its module has no eager_attention_forward"
    why = _projections_problem(m, projections)
    if why is None and family.fused_projections:
        W, quant = peft_layers.get_lora_parameters(m.qkv_proj)[:2]
        heads = m.config.num_attention_heads + 2 * m.config.num_key_value_heads
        if weight_shape(W, quant)[0] != heads * m.head_dim:
            why = f"qkv_proj has {weight_shape(W, quant)[0]} outputs, not (q + 2 kv heads) x head_dim"
    return (AttentionFacts(eager, forwards.varlen_facts()), None) if why is None else (None, why)


def _projections_problem(m, names, bias_ok=True):
    """Why the fused LoRA functions cannot serve these projections as they are now (DoRA, several active
    adapters, an unknown quantisation...), or None. Whether the base weight is frozen is checked per call."""
    for name in names:
        proj = getattr(m, name)
        try:
            peft_layers.get_lora_parameters(proj)
        except peft_layers.UnsupportedLoRA as e:
            return f"{name}: {e}"
        if not bias_ok and peft_layers.layer_bias(proj) is not None:
            return f"{name} has a bias (not fused in the MLP)"
    return None


def _check_mlp(m, family, known, checked):
    projections = _projections("mlp", family)
    act_attr = family.mlp_act_attr
    missing = [a for a in projections + (act_attr,) if not hasattr(m, a)]
    if missing:
        return None, f"no {', '.join(missing)}"
    act = getattr(m, act_attr)
    x = torch.linspace(-6, 6, 193)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception as e:  # noqa: BLE001
        return None, f"its {act_attr} failed on a probe input ({type(e).__name__})"
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(y, ref(x), rtol=1e-5, atol=1e-6):
            why = _projections_problem(m, projections, bias_ok=False)
            if why:
                return None, why
            W, quant = peft_layers.get_lora_parameters(getattr(m, projections[0]))[:2]
            rows = int(weight_shape(W, quant)[0])
            if family.fused_projections:
                return MLPFacts(name, rows // 2, fused_gate_up=True), None
            return MLPFacts(name, rows), None
    return None, f"activation {type(act).__name__} has no fused GLU kernel (silu, gelu, gelu tanh)"


def _check_loss(m, family, known, checked):
    if not hasattr(m, "model"):
        return None, "no .model (decoder) attribute"
    if not known:
        changing = [a for a in LOGIT_CHANGING_CONFIG if getattr(m.config, a, None) not in (None, 1, 1.0)]
        if changing:
            return None, f"config sets {', '.join(changing)}, which an unknown family may apply to the logits"
    why = forwards.loss_head_problem(m)
    return (forwards.loss_facts(type(m), family), None) if why is None else (None, why)


CHECKS = {
    "rms_norm": _check_norm,
    "attention": _check_attention,
    "mlp": _check_mlp,
    "moe": moe.check_block,
    "loss": _check_loss,
}
