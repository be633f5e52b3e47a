"""torch.compile over fusedlora: every public op and the fused LoRA functions are custom ops (fusedlora.ops._custom,
fusedlora.lora_ops), so Dynamo traces a patched model with no graph break and the compiled step gives eager's
values. On CPU: backend "aot_eager" (AOTAutograd's forward/backward split, eager kernels: the interpreter);
on a GPU: inductor, and CUDA graphs (mode="reduce-overhead")."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import fusedlora
from fusedlora import lora, lora_ops
from fusedlora.ops import chunked_linear_loss, cross_entropy, fused_linear_cross_entropy, geglu, rms_norm, rope, swiglu
from fusedlora.testing import DEVICE, HAS_CUDA, rel_err

BACKEND = "inductor" if HAS_CUDA else "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


def assert_compiled_matches_eager(fn, inputs, tol=0.0, dynamic=None, seed=None):
    """fn under torch.compile(fullgraph=True): no graph break, and outputs and gradients equal eager's
    (exactly on CPU, where both run the same kernels; within `tol` under inductor). seed: the RNG seed set
    before each run (dropout)."""

    def run(f):
        if seed is not None:
            torch.manual_seed(seed)
        return _outputs(f(*inputs))

    explained = torch._dynamo.explain(fn)(*inputs)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref = run(fn)
    seeds = [torch.randn_like(o) for o in ref]
    ref_grads = torch.autograd.grad(ref, leaves, seeds, allow_unused=True) if leaves else ()
    # Inductor draws random numbers its own way: eager's generator (fallback_random) gives the same masks
    with torch._inductor.config.patch(fallback_random=seed is not None):
        got = run(torch.compile(fn, backend=BACKEND, fullgraph=True, dynamic=dynamic))
    got_grads = torch.autograd.grad(got, leaves, seeds, allow_unused=True) if leaves else ()
    for a, b in zip(got + got_grads, ref + ref_grads):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) if tol == 0.0 else rel_err(a, b) <= tol, rel_err(a, b)


TOL = 1e-5 if HAS_CUDA else 0.0


# ------------------------------------------------------------------------------------- public ops
def _t(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


OP_CASES = {
    "rms_norm": lambda: (lambda x, w: rms_norm(x, w, 1e-6), (_t(2, 5, 64), _t(64))),
    "rms_norm_gemma": lambda: (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "gemma"), (_t(3, 48), _t(48))),
    "rms_norm_none": lambda: (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "none"), (_t(3, 48), _t(48))),
    "rms_norm_no_weight": lambda: (lambda x: rms_norm(x, None, 1e-6, casting="none"), (_t(2, 3, 40),)),
    "rope": lambda: (rope, (_t(2, 5, 4, 16).transpose(1, 2), _t(2, 2, 5, 16), *_cos_sin(5, 16))),
    "rope_positions": lambda: (rope, (_t(2, 4, 5, 16), _t(2, 2, 5, 16), *_cos_sin(12, 16, cache=True), _positions())),
    "swiglu": lambda: (lambda g, u: swiglu(g, u), (_t(3, 40), _t(3, 40))),
    "geglu_tanh": lambda: (lambda g, u: geglu(g, u, "tanh"), (_t(3, 40), _t(3, 40))),
    "cross_entropy": lambda: (lambda z, y: cross_entropy(z, y, label_smoothing=0.1), (_t(6, 50), _labels(6, 50))),
    "cross_entropy_none": lambda: (lambda z, y: cross_entropy(z, y, reduction="none"), (_t(6, 50), _labels(6, 50))),
    "linear_ce": lambda: (
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, softcap=5.0),
        (_t(6, 32), _t(50, 32), _labels(6, 50)),
    ),
    "linear_ce_none_chunked": lambda: (
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction="none", max_chunk_bytes=2 * 50 * 4),
        (_t(6, 32), _t(50, 32), _labels(6, 50)),
    ),
    "chunked_linear_loss": lambda: (
        lambda h, w, y: chunked_linear_loss(
            h, w, y, lambda z, t: F.cross_entropy(z, t, reduction="none"), num_chunks=3
        ),
        (_t(6, 32), _t(50, 32), _labels(6, 50)),
    ),
    # fp16: the gradient recomputed in the backward with d loss applied before the fp16 store (issue 34)
    "cross_entropy_fp16": lambda: (
        lambda z, y: 8.0 * cross_entropy(z, y),
        (_t(6, 50, dtype=torch.float16), _labels(6, 50)),
    ),
    "linear_ce_fp16": lambda: (
        lambda h, w, y: 8.0 * fused_linear_cross_entropy(h, w, y),
        (_t(6, 32, dtype=torch.float16), _t(50, 32, dtype=torch.float16), _labels(6, 50)),
    ),
    "cross_entropy_weight": lambda: (
        lambda z, y, w: cross_entropy(z, y, weight=w),
        (_t(6, 50), _labels(6, 50), torch.rand(50, device=DEVICE)),
    ),
    # loss + z_loss: the reported z-loss (no gradient of its own) compared too
    "cross_entropy_z_loss": lambda: (
        lambda z, y: sum(cross_entropy(z, y, lse_square_scale=0.01, return_z_loss=True)),
        (_t(6, 50), _labels(6, 50)),
    ),
    "linear_ce_z_loss": lambda: (
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, lse_square_scale=0.01),
        (_t(6, 32), _t(50, 32), _labels(6, 50)),
    ),
    "linear_ce_items_bias": lambda: (
        lambda h, w, b, y, n: fused_linear_cross_entropy(h, w, y, b, num_items_in_batch=n),
        (_t(6, 32), _t(50, 32), _t(50), _labels(6, 50), torch.tensor(4, device=DEVICE)),
    ),
}


def _cos_sin(seq, dim, cache=False):
    f = torch.outer(torch.arange(seq, device=DEVICE, dtype=torch.float32), torch.rand(dim // 2, device=DEVICE))
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    return (cos, sin) if cache else (cos[None], sin[None])


def _positions():
    return torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]], device=DEVICE)


def _labels(n, v):
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[0] = -100
    return y


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_public_op_compiles_whole_and_matches_eager(case):
    fn, inputs = OP_CASES[case]()
    # chunked_linear_loss runs unchunked under compile: the same sums in another order (fp32 rounding)
    assert_compiled_matches_eager(fn, inputs, max(TOL, 1e-6) if case == "chunked_linear_loss" else TOL)


@pytest.mark.parametrize("case", ["cross_entropy", "linear_ce", "rms_norm", "rope", "swiglu"])
def test_ops_compile_where_is_compiling_holds_only_in_dynamo(case, monkeypatch):
    """torch 2.11 (the GPU machine's) sets is_compiling() only while Dynamo traces, not while AOTAutograd traces
    the backward (2.13 holds it for the compile session): the backward's launchers must still become custom ops
    there, not launch kernels on functional / fake tensors. (39 of this file's cases failed that way.)"""
    import contextlib

    if hasattr(torch.compiler, "_compile_session_context"):
        monkeypatch.setattr(torch.compiler, "_compile_session_context", contextlib.nullcontext)
    fn, inputs = OP_CASES[case]()
    assert_compiled_matches_eager(fn, inputs, TOL)


@pytest.mark.parametrize("case", ["cross_entropy", "linear_ce", "cross_entropy_fp16", "linear_ce_fp16"])
def test_compiled_loss_second_backward(case):
    """retain_graph through a compiled loss: each backward right, none overwriting a gradient handed out.
    (Inductor's donated buffers, torch's default, refuse any retain_graph through a compiled backward with
    torch's own error naming the switch: off here, so that what runs twice is our ops' backward.)"""
    fn, inputs = OP_CASES[case]()
    leaves = [t for t in inputs if t.is_floating_point()]
    with torch._functorch.config.patch(donated_buffer=False):
        loss = torch.compile(fn, backend=BACKEND, fullgraph=True)(*inputs)
    ref = fn(*inputs)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(3.0 * loss, leaves)
    for g, k, g2, r in zip(first, kept, second, torch.autograd.grad(3.0 * ref, leaves)):
        assert torch.equal(g, k)
        assert rel_err(g2, r) <= max(TOL, 1e-3 if g.dtype == torch.float16 else 0.0)


def test_compiled_cross_entropy_fp16_loss_scale():
    """The compiled path's fp16 gradient under a loss scale: as close to fp64 as fp16 allows (no flushed entries)."""
    x = torch.randn(64, 4096, device=DEVICE).half().requires_grad_()
    y = torch.randint(0, 4096, (64,), device=DEVICE)
    fn = torch.compile(
        lambda z, t: cross_entropy(z, t, num_items_in_batch=65536) * 65536.0, backend=BACKEND, fullgraph=True
    )
    (g,) = torch.autograd.grad(fn(x, y), x)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, y, reduction="sum"), x64)
    assert rel_err(g, g64) <= 1.5 * rel_err(g64.half(), g64)


def test_dynamic_rows_compile_once():
    """A dynamic row count: the ops' fakes take symbolic sizes (kernel constexprs specialise only on the
    feature sizes), so a new row count runs the same graph."""
    counter = CompileCounterWithBackend(BACKEND)
    w = _t(64)
    fn = torch.compile(lambda x, y: rms_norm(x, w).sum() + cross_entropy(x, y), backend=counter, dynamic=True)
    frames = []
    for rows in (5, 9, 17, 33):
        x = _t(rows, 64)
        fn(x, _labels(rows, 64)).backward()
        frames.append(counter.frame_count)
        x_ref = x.detach().requires_grad_()
        (rms_norm(x_ref, w).sum() + cross_entropy(x_ref, _labels(rows, 64))).backward()
        assert rel_err(x.grad, x_ref.grad) <= max(TOL, 1e-7)
    assert frames[0] >= 1 and frames == frames[:1] * 4, frames  # (Dynamo may add an empty frame: counted once)


# ----------------------------------------------------------------------------- fused LoRA functions
def _lora_block(**kw):
    from fusedlora.testing import make

    return make(**kw)


def _block_step(block, act="silu"):
    from fusedlora.testing import attn_fused

    apply_mlp = lora.apply_lora_mlp_swiglu if act == "silu" else lora.apply_lora_mlp_geglu
    kw = {"approximate": "tanh"} if act == "gelu_tanh" else {}

    def step(x):
        o = attn_fused(block.self_attn, x)
        return apply_mlp(block.mlp, o, **kw)

    return step


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(r="mixed", bias=True), dict(act="gelu_tanh"), dict(dropout=0.25)],
    ids=["plain", "mixed_ranks_bias", "geglu", "dropout"],
)
def test_lora_functions_compile_whole_and_match_eager(kw):
    """apply_lora_qkv / _o / _mlp_* compiled: one custom op per call, the same values and gradients as the eager
    Functions (dropout: the masks drawn in the same order, so the same masks)."""
    block = _lora_block(**kw)
    block.train()
    step = _block_step(block, kw.get("act", "silu"))
    leaves = [p for p in block.parameters() if p.requires_grad]
    x = _t(2, 7, 64)

    assert_compiled_matches_eager(lambda x, *params: step(x), (x, *leaves), TOL, seed=7)


def test_compiled_lora_block_backward_twice_through_one_graph():
    """A compiled q/k/v, o and MLP step (the MLP's custom op on its in-place default) with its graph retained:
    the second backward gives the first's gradients (the in-place write over the saved gate/up buffer happens
    only when autograd frees the graph), and both equal eager's."""
    block = _lora_block()
    block.train()
    step = _block_step(block)
    leaves = [p for p in block.parameters() if p.requires_grad]
    x = _t(2, 7, 64)
    want = torch.autograd.grad(step(x).square().sum(), [x, *leaves])
    y = torch.compile(step, backend=BACKEND, fullgraph=True)(x)
    loss = y.square().sum()
    first = torch.autograd.grad(loss, [x, *leaves], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *leaves])
    for a, b, w in zip(first, second, want):
        assert rel_err(a, w) <= max(TOL, 1e-6) and rel_err(b, w) <= max(TOL, 1e-6), (rel_err(a, w), rel_err(b, w))


def test_lora_qkv_with_an_unadapted_projection():
    """q and v with adapters, k a plain Linear (PEFT target_modules without k_proj): k's A and B are None in
    the op's arguments, and each gradient lands on its own tensor."""
    block = _lora_block(bias=True)
    block.self_attn.k_proj = block.self_attn.k_proj.base_layer
    leaves = [p for p in block.self_attn.parameters() if p.requires_grad]
    assert_compiled_matches_eager(lambda x, *p: _block_step(block)(x), (_t(2, 5, 64), *leaves), TOL)


def test_lora_mlp_on_some_projections_and_no_input_grad():
    """Adapters on gate and down only, and an input that needs no gradient (a first layer)."""
    block = _lora_block()
    block.mlp.up_proj = block.mlp.up_proj.base_layer  # a plain Linear: no adapter there
    leaves = [p for p in block.mlp.parameters() if p.requires_grad]
    x = _t(2, 5, 64, grad=False)
    assert_compiled_matches_eager(lambda x, *p: lora.apply_lora_mlp_swiglu(block.mlp, x), (x, *leaves), TOL)


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_bases_compile_and_match_eager(nested):
    """bitsandbytes 4-bit bases (nested absmax or not) through the custom ops: the quant state crosses as
    a tensor list and named scalars (quant.BASE_TENSORS, quant.BaseLayout) and is rebuilt inside."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    hidden, inter, r = 64, 128, 4
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    qs = [
        bnbf.quantize_4bit(
            torch.randn(*s, device=DEVICE) * 0.2, blocksize=64, compress_statistics=nested, quant_type="nf4"
        )
        for s in shapes
    ]
    adapters = [(_t(r, s[1]) * 0.1, _t(s[0], r) * 0.1) for s in shapes]
    adapters = [(A.detach().requires_grad_(), B.detach().requires_grad_()) for A, B in adapters]
    leaves = [t for ab in adapters for t in ab]
    x = _t(6, hidden)
    args = lambda p: [t for (q, s), i in zip(qs, range(3)) for t in (q, s, p[2 * i], p[2 * i + 1], 1.5)]  # noqa: E731

    def mlp(x, *p):
        if torch.compiler.is_compiling():
            return lora_ops.lora_mlp(x, *args(p), "silu")
        return lora.LoRA_MLP.apply(x, *args(p), lora.swiglu_fg, lora.swiglu_fg_backward)

    def o(x, *p):
        fn = lora_ops.lora_o if torch.compiler.is_compiling() else lora.LoRA_O.apply
        return fn(x, qs[0][0], qs[0][1], p[0], p[1], 0.5)

    assert_compiled_matches_eager(mlp, (x, *leaves), TOL)
    torch._dynamo.reset()
    assert_compiled_matches_eager(o, (_t(6, hidden), *leaves[:2]), TOL)


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_gptq_bases_compile_and_match_eager():
    from fusedlora.testing import gptq_lora_block

    block = gptq_lora_block(bits=4, act_order=True)
    leaves = [p for p in block.parameters() if p.requires_grad]
    assert_compiled_matches_eager(lambda x, *p: _block_step(block)(x), (_t(2, 7, 64), *leaves), TOL)


def test_custom_op_outputs_alias_nothing():
    """The LoRA ops' outputs (results and saved tensors) share memory with no input and no other output."""
    block = _lora_block(dropout=0.25)
    x = torch.randn(2, 7, 64, device=DEVICE)
    for training in (True, False):
        prs = lora._projections(
            "LoRA_QKV",
            "t",
            lora.QKVProjections,
            [(*lora.fused_parameters(getattr(block.self_attn, f"{n}_proj")), None, 0.25) for n in "qkv"],
            x,
            kernels=False,
        )
        prs = lora._with_masks(prs, x, x.dtype, training)
        args = lora_ops.op_arguments(prs)
        outs = lora_ops.LORA_QKV_OP(x, **args, dtype=x.dtype, training=training)
        inputs = [
            x,
            *(t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)),
        ]
        assert sum(p.mask is not None for p in prs) == (3 if training else 0)  # (the masks are inputs too)
        for i, t in enumerate(outs):
            assert not any(torch._C._is_alias_of(t, u) for u in inputs + outs[:i]), i


# ------------------------------------------------------------------------------------- patched models
def _patched(model_type, **kw):
    from fusedlora.testing import make_model

    model = make_model(model_type, **kw)
    report = fusedlora.patch(model)
    assert report.n_patched > 0
    model.train()
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _eager_then_compiled(model, loss_of, inputs, fullgraph=True):
    """((eager loss, eager LoRA grads), (compiled loss, compiled LoRA grads)) of one step each."""
    steps = []
    for fn in (loss_of, torch.compile(loss_of, backend=BACKEND, fullgraph=fullgraph)):
        model.zero_grad(set_to_none=True)
        loss = fn(*inputs)
        loss.backward()
        steps.append((loss.detach(), _grads(model)))
    model.zero_grad(set_to_none=True)
    return steps


def _assert_steps_equal(eager, compiled, n_trainable=28):
    """n_trainable: the LoRA tensors that must all have a gradient (7 projections x 2 layers x A, B)."""
    (ref_loss, ref), (loss, got) = eager, compiled
    assert got.keys() == ref.keys() and len(got) == n_trainable
    assert rel_err(loss, ref_loss) <= TOL
    for n in ref:
        assert rel_err(got[n], ref[n]) <= max(TOL, 1e-6), n


def assert_model_compiles_whole_and_matches_eager(model):
    """The whole patched training forward as one graph (fullgraph=True), its loss and every LoRA gradient
    those of the eager patched model."""
    from fusedlora.testing import batch

    ids, labels = batch()

    def loss_of(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    explained = torch._dynamo.explain(loss_of)(ids, labels)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()
    n_trainable = sum(p.requires_grad for p in model.parameters())
    _assert_steps_equal(*_eager_then_compiled(model, loss_of, (ids, labels)), n_trainable)


# (phi3: the fused qkv / gate_up projections and the GLU op; smollm3: a layer without RoPE)
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "granite", "phi3", "smollm3"])
def test_patched_model_compiles_without_graph_breaks_and_matches_eager(model_type):
    assert_model_compiles_whole_and_matches_eager(_patched(model_type))


def test_qlora_model_compiles_without_graph_breaks_and_matches_eager():
    """bitsandbytes NF4 bases (double-quant, as the workload builds them): the quant states cross the custom
    ops as tensors + ints."""
    pytest.importorskip("bitsandbytes")
    import peft
    import transformers

    from fusedlora.testing import TARGETS, tiny_config
    from fusedlora.workload import quantize_linears_nf4

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).to(DEVICE)
    quantize_linears_nf4(model, torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert fusedlora.patch(model).kinds["mlp"].patched == 2
    model.train()
    assert_model_compiles_whole_and_matches_eager(model)


def test_hf_gradient_checkpointing_under_compile_adds_no_graph_break():
    """HF's own (non-reentrant) gradient checkpointing with torch.compile: the patched model breaks the graph
    no more often than the unpatched one (HF's checkpoint wrapper; transformers 5.25 breaks 4 times unpatched, 2
    patched: its output-capturing wrapper around the causal-LM forward, which the patched forward replaces, breaks
    too), and its compiled step is its eager step."""
    from fusedlora.testing import batch, make_model

    ids, labels = batch()
    breaks = []
    for patched in (False, True):
        model = make_model("llama")
        if patched:
            fusedlora.patch(model)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_of(ids, labels):
            return model(input_ids=ids, labels=labels).loss

        breaks.append(torch._dynamo.explain(loss_of)(ids, labels).graph_break_count)
        torch._dynamo.reset()
    assert breaks[1] <= breaks[0], breaks
    _assert_steps_equal(*_eager_then_compiled(model, loss_of, (ids, labels), fullgraph=False))


def test_bf16_autocast_compiled_as_close_to_fp32_as_eager():
    """Under bf16 autocast the compiled step equals eager's loss and its gradients are as close to the fp32
    step's as eager's (AOTAutograd rounds HF's own attention backward in its own order: the two bf16 runs differ
    by bf16 rounding, not by more)."""
    from fusedlora.testing import batch

    model = _patched("llama")
    ids, labels = batch()
    dev = "cuda" if HAS_CUDA else "cpu"

    def loss_of(ids, labels, autocast=True):
        with torch.autocast(dev, torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, labels=labels).loss

    def run(fn, **kw):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels, **kw)
        loss.backward()
        return loss.detach(), _grads(model)

    (_, g32), (l_eager, g_eager) = run(loss_of, autocast=False), run(loss_of)
    l_comp, g_comp = run(torch.compile(loss_of, backend=BACKEND, fullgraph=True))
    assert rel_err(l_comp, l_eager) < 1e-3
    for n in g32:
        assert rel_err(g_comp[n], g32[n]) <= 1.5 * rel_err(g_eager[n], g32[n]) + 2e-3, n


def test_varying_sequence_lengths_recompile_at_most_once():
    """torch.compile(model) with its default dynamic=None over a run whose sequence lengths vary: the first
    length compiles a static graph, the second a dynamic one that serves every later length (issue target:
    at most 8 compilations)."""
    from fusedlora.testing import batch

    model = _patched("llama")
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(model, backend=counter)
    eager_losses, compiled_losses = [], []
    for seq in (16, 12, 20, 9, 24, 13):
        ids, labels = batch(seq=seq)
        compiled_losses.append(compiled(input_ids=ids, labels=labels).loss.detach())
        eager_losses.append(model(input_ids=ids, labels=labels).loss.detach())
    assert counter.frame_count <= 2, counter.frame_count
    for a, b in zip(compiled_losses, eager_losses):
        assert rel_err(a, b) <= TOL


def test_one_decoder_layer_fullgraph():
    model = _patched("llama")
    layer = model.base_model.model.model.layers[0]
    rotary = model.base_model.model.model.rotary_emb
    x = _t(2, 16, 64)
    pos = torch.arange(16, device=DEVICE)[None].expand(2, -1)

    def run(x):
        out = layer(x, position_embeddings=rotary(x, pos), attention_mask=None, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    leaves = [p for p in layer.parameters() if p.requires_grad]
    assert_compiled_matches_eager(lambda x, *p: run(x), (x, *leaves), TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_reduce_overhead_cuda_graphs(dtype):
    """mode="reduce-overhead" (CUDA graphs) with the loader's launches: several steps of a bf16 patched model
    under autocast, losses and gradients those of eager within bf16 tolerance."""
    from fusedlora.testing import batch

    model = _patched("llama")
    ids, labels = batch()

    def loss_of(ids, labels):
        with torch.autocast("cuda", dtype):
            return model(input_ids=ids, labels=labels).loss

    compiled = torch.compile(loss_of, mode="reduce-overhead")
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        loss = compiled(ids, labels)
        loss.backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        ref_loss = loss_of(ids, labels)
        ref_loss.backward()
        ref = _grads(model)
        assert rel_err(loss.detach(), ref_loss.detach()) < 2e-2
        for n in ref:
            assert rel_err(got[n], ref[n]) < 5e-2, n


@pytest.mark.gpu
def test_gpu_compile_layers_reduce_overhead():
    """compile_layers(model, mode="reduce-overhead"): each decoder layer compiled with torch.compile's CUDA
    graphs, trained with an optimizer over steps with new data: the eager patched model's losses (bf16)."""
    from fusedlora.testing import batch

    runs = []
    for compiled in (False, True):
        model = _patched("llama")
        if compiled:
            fusedlora.compile_layers(model, mode="reduce-overhead")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(5):
            ids, labels = batch(seed=step + 1)
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        runs.append(torch.stack(losses))
    assert rel_err(runs[1], runs[0]) < 2e-2, runs


@pytest.mark.parametrize("which", ["nf4", "nf4_out", "gptq", "gptq_transpose"])
def test_dequantize_compiles_and_matches_eager(which):
    from fusedlora.testing import random_gptq_tensors

    if which.startswith("nf4"):
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(
            torch.randn(48, 64, device=DEVICE), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        if which == "nf4":
            fn = lambda p: fusedlora.quant.dequantize_nf4(p, state, dtype=torch.float16)  # noqa: E731
        else:
            fn = lambda p: fusedlora.quant.dequantize_nf4(p, state, out=torch.empty(48, 64, device=DEVICE)) * 1  # noqa: E731
        inputs = (packed,)
    else:
        qweight, qzeros, scales, g_idx = random_gptq_tensors(64, 96, 4, 32, True)
        fn = lambda q: fusedlora.quant.dequantize_gptq(q, qzeros, scales, g_idx, transpose=which.endswith("transpose"))  # noqa: E731
        inputs = (qweight,)
    assert_compiled_matches_eager(fn, inputs, 0.0)


@pytest.mark.parametrize("which", ["nf4", "gptq"])
def test_dequantize_out_is_checked_under_compile(which):
    """Compiled, the result is copied into out=: an out of another dtype or shape is refused as in eager mode,
    never cast or broadcast into silently; a transposed NF4 view comes back transposed, as in eager mode."""
    from fusedlora.testing import random_gptq_tensors

    if which == "nf4":
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, state = bnbf.quantize_4bit(torch.randn(48, 64, device=DEVICE), blocksize=64, quant_type="nf4")
        fn = torch.compile(lambda p, out: fusedlora.quant.dequantize_nf4(p, state, out=out), backend=BACKEND)
        shape, dtype = (48, 64), torch.float32
        transposed = torch.compile(lambda p: fusedlora.quant.dequantize_nf4(p, state), backend=BACKEND)(packed.t())
        assert torch.equal(transposed, bnbf.dequantize_4bit(packed.t(), state))
    else:
        packed, qzeros, scales, g_idx = random_gptq_tensors(64, 96, 4, 32, True)
        fn = torch.compile(
            lambda q, out: fusedlora.quant.dequantize_gptq(q, qzeros, scales, g_idx, out=out), backend=BACKEND
        )
        shape, dtype = (96, 64), torch.float16
    op = f"dequantize_{which}"
    for bad in (
        torch.empty(shape, dtype=torch.bfloat16, device=DEVICE),
        torch.empty(2, *shape, dtype=dtype, device=DEVICE),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{op}: out must be a {dtype} tensor of shape {shape}")):
            fn(packed, bad)
    good = torch.empty(shape, dtype=dtype, device=DEVICE)
    assert fn(packed, good).data_ptr() == good.data_ptr()


def test_lora_mlp_op_names_a_bad_activation():
    block = _lora_block()
    args = [
        t for name in ("gate_proj", "up_proj", "down_proj") for t in lora.fused_parameters(getattr(block.mlp, name))
    ]
    with pytest.raises(
        ValueError, match=r"lora_mlp: activation must be one of \('silu', 'gelu', 'gelu_tanh'\), got 'relu'"
    ):
        lora_ops.lora_mlp(torch.randn(3, 64, device=DEVICE), *args, "relu")


@pytest.mark.parametrize("gc", [False, True], ids=["no_gc", "hf_gc"])
def test_compile_layers_compiles_one_layer_for_all(gc):
    """fusedlora.compile_layers: each decoder layer compiled in place; the layers share their graphs (four
    layers, at most two compiles: the first layer's input may need no gradient, the others' do; fullgraph: no break
    inside a layer), and the step equals the eager patched step."""
    import transformers
    from torch._dynamo.testing import CompileCounterWithBackend

    from fusedlora.testing import SMALL, batch, make_model

    ids, labels = batch()
    with pytest.MonkeyPatch.context() as mp:  # four layers: one compile must serve them all
        mp.setitem(SMALL, "num_hidden_layers", 4)
        model = make_model("llama")
        eager_model = make_model("llama")
    for m in (model, eager_model):
        fusedlora.patch(m)
        m.train()
        if gc:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counter = CompileCounterWithBackend(BACKEND)
    assert fusedlora.compile_layers(model, backend=counter, fullgraph=not gc) == 4
    steps = []
    for m in (eager_model, model):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        steps.append((loss.detach(), _grads(m)))
    (ref_loss, ref), (got_loss, got) = steps
    # (HF's gradient_checkpointing_enable makes the embedding output require grad: one graph for all four)
    assert counter.frame_count == (1 if gc else 2), counter.frame_count
    assert rel_err(got_loss, ref_loss) <= TOL and got.keys() == ref.keys() and len(got) == 56
    for n in ref:
        assert rel_err(got[n], ref[n]) <= max(TOL, 1e-6), n
    assert isinstance(model.base_model.model.model.layers[0], transformers.modeling_layers.GradientCheckpointingLayer)


def test_compile_layers_needs_decoder_layers():
    with pytest.raises(TypeError, match="compile_layers: Linear has no decoder layers"):
        fusedlora.compile_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_unpadded_batch_under_compile_attends_causally_without_a_mask(padded, monkeypatch):
    """Under compile, HF (torch < 2.14) builds a dense causal mask even for an unpadded batch, which keeps SDPA
    off its flash kernels: the patched model tells its attention layers that the mask is the plain causal one
    (no attention_mask, no position_ids given), and they call SDPA with none (is_causal). A padded batch keeps
    HF's mask. Either way the compiled step equals the eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fusedlora.testing import batch

    model = _patched("llama")
    ids, labels = batch()
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0
        labels = labels.masked_fill(mask == 0, -100)
    got_masks = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, q, k, v, attention_mask, **kw):
        got_masks.append(attention_mask is None)
        return sdpa(module, q, k, v, attention_mask, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)

    def loss_of(ids, labels):
        return model(input_ids=ids, labels=labels, attention_mask=mask).loss

    eager, compiled = _eager_then_compiled(model, loss_of, (ids, labels), fullgraph=True)
    n_layers = model.config.num_hidden_layers
    # eager: HF itself drops the mask of an unpadded batch; compiled: the patched model does
    assert got_masks == [not padded] * (2 * n_layers), got_masks
    _assert_steps_equal(eager, compiled)
