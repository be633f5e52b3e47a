"""fusedlora.patch on MoE models (issue 36): tiny random qwen3_moe, qwen2_moe, mixtral, olmoe and gpt_oss models
with PEFT's target_parameters LoRA on the experts (fp32; CPU: the interpreter). Patched vs unpatched loss, every
LoRA gradient (experts and attention) and the embedding gradient (which reaches the router through the routing
weights), with and without the load-balancing loss; patch before get_peft_model; unpatch; each fallback with its
reason; an expert with no token; top-k 1; quantize_experts (bitsandbytes' bytes, the loss against the dequantised
experts, the bytes a parameter, the wrong order refused)."""

import copy
import warnings

import pytest
import torch

import fusedlora
from fusedlora.hf import moe as hf_moe
from fusedlora.hf.experts import quantize_block
from fusedlora.testing import DEVICE, HAS_CUDA, batch, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
)
FAMILY_CONFIGS = {  # docs/moe-design.md section 6.4; 4 experts, top-2, intermediate 32
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=48,
        shared_expert_intermediate_size=48,
        use_sliding_window=False,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
MOE_BLOCKS = {"qwen3_moe": 1, "qwen2_moe": 2, "mixtral": 2, "olmoe": 2, "gpt_oss": 2}  # (qwen3_moe: layer 1 dense)


def make_moe(model_type, lora=True, seed=0, extra_targets=(), **config):
    """A tiny MoE model, with PEFT LoRA (r 4) on q/v and the experts when `lora`, its B matrices (and gpt_oss's
    router bias, zero at init) random so that every term counts."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILY_CONFIGS[model_type], **config})
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.bias"):
                p.normal_(0, 1)
    if not lora:
        return model
    return add_expert_lora(model, extra_targets)


def add_expert_lora(model, extra_targets=(), adapter="default"):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS + list(extra_targets)
    )
    if isinstance(model, peft.PeftModel):
        model.add_adapter(adapter, config)
    else:
        model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def embeddings_train(model):
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def loss_and_grads(model, **kw):
    ids, labels = batch()
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ref, got, tol=1e-4, need=("lora_A", "lora_B", "embed_tokens")):
    (l0, g0), (l1, g1) = ref, got
    assert rel_err(l1, l0) <= tol, (l1, l0)
    assert g0.keys() == g1.keys(), set(g0) ^ set(g1)
    for part in need:
        assert any(part in n for n in g0), (part, list(g0))
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= tol, (n, rel_err(g1[n], g0[n]))


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the patched blocks handed their experts to the fused op."""
    calls = []
    op = hf_moe.moe_lora_experts

    def counted(*args, **kwargs):
        calls.append(args[3])  # the gate_up ExpertProj
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_moe, "moe_lora_experts", counted)
    return calls


def no_moe_fallback(report):
    return not [k for k in report.fallbacks.counts if k[0] == "moe"]


@pytest.mark.parametrize("router_logits", [False, True], ids=["no_aux", "aux_loss"])
@pytest.mark.parametrize(
    "model_type,config",
    [
        ("qwen3_moe", dict(norm_topk_prob=True)),
        ("qwen3_moe", dict(norm_topk_prob=False)),
        ("qwen2_moe", {}),
        ("mixtral", {}),
        ("olmoe", {}),
        ("gpt_oss", {}),
    ],
    ids=["qwen3_moe_norm_topk", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"],
)
def test_family_loss_and_grads_match(model_type, config, router_logits, fused_calls):
    ref = embeddings_train(make_moe(model_type, **config))
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    assert report.kinds["moe"].patched == MOE_BLOCKS[model_type] and not report.kinds["moe"].kept, str(report)
    assert not report.kinds["moe"].trains_on_original, str(report)
    if model_type == "gpt_oss":
        assert any("attention keeps HF's path: attention sinks" in n for n in report.notes), str(report)
    want = loss_and_grads(ref, output_router_logits=router_logits)
    got = loss_and_grads(fused, output_router_logits=router_logits)
    assert_same(want, got)
    assert any("experts.lora_A" in n for n in got[1]) and any("self_attn" in n and "lora_B" in n for n in got[1])
    assert len(fused_calls) == MOE_BLOCKS[model_type] and all(p.lora_A is not None for p in fused_calls)
    assert not report.fallbacks.counts, str(report.fallbacks)  # (the loss too: fused, with the aux loss added)


@pytest.mark.skipif(HAS_CUDA, reason="fp32 on the CPU; the GPU's hybrid path (bf16) runs in the 20-step test")
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_hybrid_grouped_mm_experts_match(model_type, fused_calls, monkeypatch):
    """patch(moe_base_gemm="grouped_mm"): the routed experts' GEMMs through torch._grouped_mm (the CPU runs it in
    fp32), the loss and every gradient as HF+PEFT's, through the hybrid path (its grouped_mm calls counted)."""
    gmm_calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: gmm_calls.append(1) or real(*a, **k))
    ref = embeddings_train(make_moe(model_type))
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused, moe_base_gemm="grouped_mm")
    want = loss_and_grads(ref)
    gmm_calls.clear()  # (HF's experts may run grouped_mm too)
    got = loss_and_grads(fused)
    assert_same(want, got)
    assert fused_calls and all(p.lora_A is not None for p in fused_calls) and no_moe_fallback(report)
    assert len(gmm_calls) == 10 * len(fused_calls)  # per call, forward and backward: 2 frozen + 3 LoRA GEMMs


def test_router_logits_and_aux_loss_are_hf_s(fused_calls):
    """The patched block calls HF's router module: the recorded router logits and the aux loss are HF's."""
    ref = make_moe("mixtral")
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    ids, _ = batch()
    outs = [m(input_ids=ids, output_router_logits=True) for m in (ref, fused)]
    assert len(outs[1].router_logits) == 2
    for a, b in zip(outs[0].router_logits, outs[1].router_logits):  # (the fused norms and attention before them)
        assert rel_err(b, a) <= 1e-5
    assert rel_err(outs[1].aux_loss, outs[0].aux_loss) <= 1e-6 and outs[0].aux_loss > 0
    assert rel_err(outs[1].logits, outs[0].logits) <= 1e-4 and fused_calls


@pytest.mark.parametrize("how", ["call", "config", "config_and_none_argument"])
def test_training_loss_adds_hf_s_aux_loss_without_logits(how):
    """output_router_logits in a training step with labels (an argument, or the config's, also under an explicit
    None as HF resolves it): the fused loss plus router_aux_loss_coef x HF's load-balancing loss of the recorded
    router logits over the padded batch's mask, the MoE output HF returns (aux_loss, router_logits), no
    [tokens, vocab] logits, and the same gradients."""
    ref = make_moe("mixtral", router_aux_loss_coef=0.5, output_router_logits=how != "call")
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # (left padding: the aux loss counts the unmasked tokens only)
    kw = {
        "call": {"output_router_logits": True},
        "config": {},
        "config_and_none_argument": {"output_router_logits": None},
    }
    outs, grads = [], []
    for m in (ref, fused):
        m.train()
        m.zero_grad(set_to_none=True)
        outs.append(m(input_ids=ids, attention_mask=mask, labels=labels, **kw[how]))
        outs[-1].loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    want, got = outs
    assert type(got) is type(want) and got.logits is None and want.logits is not None
    assert rel_err(got.aux_loss, want.aux_loss) <= 1e-6 and want.aux_loss > 0
    assert rel_err(got.loss, want.loss) <= 1e-5
    assert rel_err(got.loss - 0.5 * got.aux_loss, want.loss - 0.5 * want.aux_loss) <= 1e-5  # (the CE part alone)
    assert len(got.router_logits) == len(want.router_logits) == 2
    assert grads[0].keys() == grads[1].keys() and any("experts.lora_A" in n for n in grads[0])
    for n in grads[0]:
        assert rel_err(grads[1][n], grads[0][n]) <= 1e-4, n
    assert not report.fallbacks.counts, str(report.fallbacks)


@pytest.mark.skipif(not hasattr(transformers, "PhimoeForCausalLM"), reason="transformers without phimoe")
def test_an_unknown_moe_family_s_aux_loss_keeps_hf_s_loss():
    """A MoE family fusedlora has no row for (phimoe): its loss module is patched as any causal LM's, so a step
    with output_router_logits on runs HF's loss (aux loss included), reported, instead of dropping the aux term."""
    cfg = transformers.AutoConfig.for_model(
        "phimoe",
        **TINY,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).to(DEVICE)
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    ids, labels = batch()
    want, got = (m.train()(input_ids=ids, labels=labels) for m in (ref, fused))
    assert want.aux_loss > 0 and rel_err(got.loss, want.loss) <= 1e-5 and rel_err(got.aux_loss, want.aux_loss) <= 1e-6
    assert any(k == "loss" and "load-balancing" in why for k, why in report.fallbacks.counts), str(report.fallbacks)


def test_mixtral_router_jitter_as_hf(fused_calls):
    """Training-mode router jitter: the same random draws scale the block's input as in HF's forward."""
    ref = embeddings_train(make_moe("mixtral", router_jitter_noise=0.1))
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    results = []
    for m in (ref, fused):
        torch.manual_seed(7)
        results.append(loss_and_grads(m))
    assert_same(*results)
    torch.manual_seed(8)
    assert rel_err(loss_and_grads(fused)[0], results[1][0]) > 1e-6 and fused_calls  # (the jitter does act)
    for name, p in fused.named_parameters():  # a fallback (expert weights that train) runs HF's in-place jitter
        if name.endswith("experts.base_layer.base_layer.down_proj"):
            p.requires_grad_(True)
    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_and_grads(fused)[0]
    assert rel_err(loss, results[0][0]) <= 1e-4 and any("expert weights require grad" in str(w.message) for w in caught)


def test_olmoe_clip_qkv_keeps_hf_attention():
    ref = make_moe("olmoe", clip_qkv=0.05)
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    assert report.kinds["attention"].patched == report.kinds["rms_norm"].patched == 0, str(report)
    assert report.kinds["moe"].patched == 2, str(report)
    assert any("config sets clip_qkv" in n for n in report.notes), str(report)
    assert_same(loss_and_grads(ref), loss_and_grads(fused), need=("lora_A",))


def test_top_k_1_and_an_expert_without_tokens(fused_calls):
    """gpt_oss (a router bias of -1e4 keeps expert 3 unchosen) and qwen3_moe with top-1 routing whose router
    output is clamped so that expert 3 gets no token."""
    ref = make_moe("gpt_oss", num_experts_per_tok=1)
    with torch.no_grad():
        for block in [m for m in ref.modules() if type(m).__name__ == "GptOssMLP"]:
            block.router.bias[3] = -1e4
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    assert_same(loss_and_grads(ref), loss_and_grads(fused), need=("lora_A",))
    assert fused_calls and all(p.num_experts == 4 for p in fused_calls)

    def without_expert_3(module, args, out):
        logits, weights, index = out
        return logits, weights, index.clamp(max=2)

    seen = []
    ref = make_moe("qwen3_moe", num_experts_per_tok=1)
    for block in [m for m in ref.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]:
        block.gate.register_forward_hook(without_expert_3)
        block.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    assert_same(loss_and_grads(ref), loss_and_grads(fused), need=("lora_A",))
    assert all(i.shape[1] == 1 and int(i.max()) <= 2 for i in seen)


def test_patch_before_get_peft_model(fused_calls):
    base = make_moe("olmoe", lora=False)
    ref = add_expert_lora(copy.deepcopy(base))
    report = fusedlora.patch(base)
    assert report.kinds["moe"].patched == 2
    assert any("expert weights require grad" in r for r in report.kinds["moe"].trains_on_original), str(report)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_and_grads(base)  # base weights train: HF's path, a reported fallback
    assert any("expert weights require grad" in str(w.message) for w in caught)
    assert not fused_calls
    model = add_expert_lora(base)
    with torch.no_grad():  # the same adapter weights as the reference's
        model.load_state_dict(ref.state_dict())
    assert_same(loss_and_grads(ref), loss_and_grads(model), need=("lora_A",))
    assert len(fused_calls) == 2


def test_unpatch_restores():
    model = make_moe("qwen2_moe")
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeSparseMoeBlock"]
    want = loss_and_grads(model)
    fusedlora.patch(model)
    assert all("forward" in b.__dict__ for b in blocks)
    assert fusedlora.unpatch(model) >= len(blocks)
    assert all("forward" not in b.__dict__ for b in blocks)
    assert_same(want, loss_and_grads(model), tol=0, need=())


def test_fp16_loss_scale_and_second_backward(fused_calls):
    """fp16 with a loss scale of 1024 against the fp32 model (fp16 rounding: 1e-2), and a second backward through
    the same graph (retain_graph) adds the same gradients again."""
    ref = make_moe("gpt_oss")
    fused = copy.deepcopy(ref).half()
    fusedlora.patch(fused)
    ids, labels = batch()
    grads = []
    for m in (ref, fused):
        m.train()
        loss = m(input_ids=ids, labels=labels).loss
        (loss * 1024).backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        (loss * 1024).backward()
        assert all(torch.equal(p.grad, 2 * grads[-1][n]) for n, p in m.named_parameters() if p.grad is not None)
    assert any("experts.lora_A" in n for n in grads[1]) and fused_calls
    for n, g in grads[0].items():
        assert torch.isfinite(grads[1][n]).all() and rel_err(grads[1][n].float(), g) <= 1e-2, n


# ----------------------------------------------------------------------------------------- fallbacks
def _run_with_reason(model, reason):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss_and_grads(model)
    assert any(reason in str(w.message) for w in caught), [str(w.message) for w in caught]
    return out


def test_two_active_adapters_fall_back(fused_calls):
    ref = add_expert_lora(make_moe("qwen3_moe"), adapter="other")
    ref.base_model.set_adapter(["default", "other"])
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    got = _run_with_reason(fused, "2 active adapters at once on")
    assert report.fallbacks.counts and not fused_calls
    assert_same(loss_and_grads(ref), got, need=())


def test_disabled_adapters_fused_without_lora(fused_calls):
    ref = embeddings_train(make_moe("mixtral"))
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    with ref.disable_adapter(), fused.disable_adapter():
        want, got = loss_and_grads(ref), loss_and_grads(fused)
    assert_same(want, got, need=("embed_tokens",))
    assert fused_calls and all(p.lora_A is None for p in fused_calls)
    assert no_moe_fallback(report)


def test_merged_adapter_fused_without_lora_and_disabled_merged_falls_back(fused_calls):
    """A merged adapter is in the weight (PEFT runs the base): fused with no LoRA term. Disabled while merged, PEFT
    unmerges first: its own path, a reported fallback."""
    ref = make_moe("gpt_oss")
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    ids, _ = batch()
    for m in (ref, fused):
        m.eval()
        m.base_model.merge_adapter()
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, fused(input_ids=ids).logits
    assert rel_err(got, want) <= 1e-4 and fused_calls and all(p.lora_A is None for p in fused_calls)
    assert no_moe_fallback(report)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with fused.disable_adapter(), ref.disable_adapter():
            got, want = fused(input_ids=ids).logits, ref(input_ids=ids).logits
    assert any("adapters disabled while merged" in str(w.message) for w in caught)
    assert rel_err(got, want) <= 1e-4


def test_expert_weights_requiring_grad_fall_back(fused_calls):
    ref = make_moe("qwen2_moe")
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    for m in (ref, fused):
        for name, p in m.named_parameters():
            if name.endswith("experts.base_layer.base_layer.down_proj"):
                p.requires_grad_(True)
    got = _run_with_reason(fused, "expert weights require grad")
    assert_same(loss_and_grads(ref), got, need=())
    assert any(n.endswith("down_proj") and "lora" not in n for n in got[1]) and not fused_calls
    with torch.no_grad():  # no gradient wanted: fused
        fused(input_ids=batch()[0])
    assert fused_calls


def test_a_strided_expert_stack_falls_back(fused_calls):
    """A non-contiguous expert weight (a view of a transposed stack) runs HF's path, reported; the op would refuse
    it (its kernels address the stack from its shape)."""
    ref = make_moe("qwen3_moe")
    fused = copy.deepcopy(ref)
    fusedlora.patch(fused)
    strided = 0
    for m in (ref, fused):
        for name, p in m.named_parameters():
            if name.endswith("experts.base_layer.base_layer.down_proj"):
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
                strided += 1
    assert strided == 2
    got = _run_with_reason(fused, "experts.down_proj is not a contiguous stack")
    assert_same(loss_and_grads(ref), got, need=("lora_A", "lora_B"))
    assert not fused_calls


def test_custom_act_fn_unknown_submodule_and_lora_on_a_bias_keep_hf_path():
    model = make_moe("mixtral")
    blocks = [m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    hf_moe.base_experts(blocks[0]).act_fn = torch.nn.GELU()
    blocks[1].extra = torch.nn.Identity()
    report = fusedlora.patch(model)
    kept = report.kinds["moe"].original
    assert report.kinds["moe"].patched == 0 and sum(kept.values()) == 2, str(report)
    assert any("act_fn is not the silu GLU" in r for r in kept) and any("submodules" in r for r in kept), str(report)
    gptoss = make_moe("gpt_oss")
    block = next(m for m in gptoss.modules() if type(m).__name__ == "GptOssMLP")
    hf_moe.base_experts(block).limit = 5.0  # the probe follows the module's own clamp: still served
    hf_moe.base_experts(block)._apply_gate = lambda h: h[..., ::2] * h[..., 1::2]
    report = fusedlora.patch(gptoss)
    assert report.kinds["moe"].patched == 1 and any("_apply_gate" in r for r in report.kinds["moe"].original)
    report = fusedlora.patch(make_moe("gpt_oss", extra_targets=["mlp.experts.down_proj_bias"]))
    assert report.kinds["moe"].original == {
        "a LoRA adapter on the experts' down_proj_bias (fused: gate_up_proj, down_proj)": 2
    }, str(report)


def test_lora_on_router_keeps_peft_path_and_report_says_so(fused_calls):
    ref = make_moe("qwen3_moe", extra_targets=["mlp.gate.weight"])
    fused = copy.deepcopy(ref)
    report = fusedlora.patch(fused)
    assert report.kinds["moe"].patched == 1
    assert any("router carries a LoRA adapter" in r for r in report.kinds["moe"].trains_on_original), str(report)
    want, got = loss_and_grads(ref), loss_and_grads(fused)
    assert_same(want, got, need=("lora_A", "lora_B"))
    assert any("gate.lora_A" in n for n in got[1]) and fused_calls


# ------------------------------------------------------------------------------------ NF4 experts
def _dequantised_copy(model):
    """`model`'s NF4 experts as plain tensors, decoded by bitsandbytes (over the flat stream: bitsandbytes 0.50's
    CPU dequantize_4bit decodes 3-D shapes whose last dimension is below the blocksize wrongly)."""
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for experts in [m for m in out.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]:
        experts.__dict__.pop("forward", None)
        for name in hf_moe.EXPERT_PARAMS:
            p = getattr(experts, name)
            qs = copy.copy(p.quant_state)
            shape, qs.shape = qs.shape, torch.Size([qs.shape.numel()])
            setattr(
                experts,
                name,
                torch.nn.Parameter(bnb.functional.dequantize_4bit(p.data, qs).view(shape), requires_grad=False),
            )
    for m in out.modules():
        if "forward" in m.__dict__ and isinstance(m.__dict__["forward"], hf_moe.NF4ExpertsGuard):
            del m.__dict__["forward"]
    return out


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_quantize_experts(model_type, fused_calls):
    import bitsandbytes as bnb

    model = make_moe(model_type)
    originals = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
    }
    done = fusedlora.quantize_experts(model)
    assert done.tensors == 2 * MOE_BLOCKS[model_type] and done.parameters == sum(t.numel() for t in originals.values())
    stored = dict(model.named_parameters())
    for name, W in originals.items():
        p = stored[name]
        packed, qs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert isinstance(p, bnb.nn.Params4bit) and not p.requires_grad
        assert torch.equal(p.data, packed) and torch.equal(p.quant_state.absmax, qs.absmax)
        assert torch.equal(p.quant_state.state2.absmax, qs.state2.absmax) and p.quant_state.shape == W.shape
    with pytest.raises(RuntimeError, match="call fusedlora.patch"):  # no HF / PEFT path runs NF4 experts
        model(input_ids=batch()[0])
    reference = _dequantised_copy(model)
    report = fusedlora.patch(model)
    assert report.kinds["moe"].patched == MOE_BLOCKS[model_type]
    assert_same(loss_and_grads(reference), loss_and_grads(model), need=("lora_A",))
    assert fused_calls and all(p.quant_state is not None for p in fused_calls)
    assert fusedlora.quantize_experts(model).already_quantised == done.tensors


def test_quantize_experts_bytes_per_parameter():
    """The reported bytes are the stored tensors' (codes, absmax, double-quantisation statistics, code books):
    about 0.52 a parameter with double quantisation at a real layer's size, 0.56 without."""
    model = make_moe("mixtral")
    done = fusedlora.quantize_experts(model)
    stored = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    counted = sum(
        t.numel() * t.element_size()
        for p in stored
        for t in (
            p.data,
            p.quant_state.absmax,
            p.quant_state.code,
            p.quant_state.state2.absmax,
            p.quant_state.state2.code,
        )
    )
    assert done.bytes_after == counted and done.bytes_before == 4 * done.parameters
    big = torch.nn.Module()  # a Mixtral-like layer at 1/16 scale: 8 experts, 2I = 2 * 896, H = 256
    big.gate_up_proj = torch.nn.Parameter(torch.randn(8, 1792, 256, device=DEVICE), requires_grad=False)
    big.down_proj = torch.nn.Parameter(torch.randn(8, 256, 896, device=DEVICE), requires_grad=False)
    for double_quant, want in ((True, 0.5 + 1 / 64 + 4 / (64 * 256)), (False, 0.5 + 4 / 64)):
        layer = copy.deepcopy(big)
        block = torch.nn.Module()
        block.experts = layer
        total = quantize_block(block, blocksize=64, double_quant=double_quant)
        assert abs(total.bytes_per_parameter - want) < 2e-3, (double_quant, total.bytes_per_parameter, want)


def test_quantize_experts_refuses_clearly():
    with pytest.raises(RuntimeError, match="call it after peft.get_peft_model"):
        fusedlora.quantize_experts(make_moe("mixtral", lora=False))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        fusedlora.quantize_experts(make_moe("mixtral"), blocksize=48)
    with pytest.raises(ValueError, match="has no MoE block fusedlora serves"):
        fusedlora.quantize_experts(
            transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model("llama", **TINY, intermediate_size=32)
            )
        )
    with pytest.raises(TypeError, match="expected the model"):
        fusedlora.quantize_experts("Qwen/Qwen3-30B-A3B")
    model = add_expert_lora(make_moe("qwen3_moe"), adapter="other")
    fusedlora.quantize_experts(model)
    fusedlora.patch(model)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(RuntimeError, match="holds NF4 experts .* 2 active adapters"):
        model(input_ids=batch()[0])


@pytest.mark.gpu
@pytest.mark.parametrize("base_gemm", ["triton", "auto"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_gpu_bf16_training_loss_tracks_hf_over_20_steps(model_type, base_gemm, fused_calls):
    """bf16 on the GPU, 20 AdamW steps over two random batches, from the same initial weights: the patched
    model's loss at every step within 1e-2 (relative) of HF+PEFT's own, through the fused kernels and through
    "auto" (the hybrid grouped_mm path on sm_90). 8 experts, top-2, every projection wide enough for the
    kernels' real tiles (hidden 256, expert intermediate 128, 64-row tiles)."""
    config = dict(hidden_size=256, num_attention_heads=4, head_dim=64, vocab_size=512, max_position_embeddings=256)
    experts = "num_local_experts" if model_type == "mixtral" else "num_experts"
    inter = "intermediate_size" if model_type in ("mixtral", "olmoe") else "moe_intermediate_size"
    config.update({experts: 8, inter: 128})

    def run(patched):
        model = make_moe(model_type, seed=3, **config).to(torch.bfloat16)
        if patched:
            assert no_moe_fallback(fusedlora.patch(model, moe_base_gemm=base_gemm))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(7)
        data = torch.randint(0, 512, (2, 4, 128), device="cuda", generator=gen)  # two batches, learnt in turn
        losses = []
        for step in range(20):
            ids = data[step % 2]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        return torch.stack(losses).cpu()

    hf = run(False)
    gmm_calls = []
    real = torch._grouped_mm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_grouped_mm", lambda *a, **k: gmm_calls.append(1) or real(*a, **k))
        fused = run(True)
    assert fused_calls and len(fused_calls) >= 20 * MOE_BLOCKS[model_type]
    hybrid = base_gemm == "auto" and torch.cuda.get_device_capability()[0] in (9, 10)
    assert len(gmm_calls) == (10 * len(fused_calls) if hybrid else 0)  # the path asked for ran
    gap = ((fused - hf).abs() / hf.abs()).max().item()
    assert gap <= 1e-2, (gap, hf.tolist(), fused.tolist())
    assert hf[-1] < hf[0]  # (it trained)
