"""torch.compile over whole patched models (fusedlora.patch, fusedlora.compile_layers): every public op and the
fused LoRA functions are custom ops (fusedlora.ops._custom, fusedlora.lora_ops), so Dynamo traces a patched model
with no graph break and the compiled step gives eager's values. Each op's and the LoRA functions' own compile
cases stand beside their other cases (tests/ops/test_<op>.py, tests/test_lora.py, tests/test_quant.py); here
only what crosses them: a patched model of each family, QLoRA, gradient checkpointing, autocast, varying
sequence lengths, compile_layers, and several ops in one dynamic graph. On CPU: backend "aot_eager"
(AOTAutograd's forward/backward split, eager kernels: the interpreter); on a GPU: inductor, and CUDA graphs
(mode="reduce-overhead")."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedlora
from fusedlora.ops import cross_entropy, rms_norm
from fusedlora.testing import (
    COMPILE_BACKEND,
    COMPILE_TOL,
    DEVICE,
    HAS_CUDA,
    assert_compiled_matches_eager,
    randn_leaf,
    rel_err,
    reset_dynamo,
    seeded_labels,
)

_fresh_dynamo = pytest.fixture(autouse=True)(reset_dynamo)


def test_dynamic_rows_compile_once():
    """A dynamic row count: the ops' fakes take symbolic sizes (kernel constexprs specialise only on the
    feature sizes), so a new row count runs the same graph."""
    counter = CompileCounterWithBackend(COMPILE_BACKEND)
    w = randn_leaf(64)
    fn = torch.compile(lambda x, y: rms_norm(x, w).sum() + cross_entropy(x, y), backend=counter, dynamic=True)
    frames = []
    for rows in (5, 9, 17, 33):
        x = randn_leaf(rows, 64)
        fn(x, seeded_labels(rows, 64)).backward()
        frames.append(counter.frame_count)
        x_ref = x.detach().requires_grad_()
        (rms_norm(x_ref, w).sum() + cross_entropy(x_ref, seeded_labels(rows, 64))).backward()
        assert rel_err(x.grad, x_ref.grad) <= max(COMPILE_TOL, 1e-7)
    assert frames[0] >= 1 and frames == frames[:1] * 4, frames  # (Dynamo may add an empty frame: counted once)


# ----------------------------------------------------------------------------------- patched models


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
    for fn in (loss_of, torch.compile(loss_of, backend=COMPILE_BACKEND, fullgraph=fullgraph)):
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
    assert rel_err(loss, ref_loss) <= COMPILE_TOL
    for n in ref:
        assert rel_err(got[n], ref[n]) <= max(COMPILE_TOL, 1e-6), n


def assert_model_compiles_whole_and_matches_eager(model):
    """The whole patched training forward as one graph (fullgraph=True: a graph break raises, naming its reason),
    its loss and every LoRA gradient those of the eager patched model."""
    from fusedlora.testing import batch

    ids, labels = batch()

    def loss_of(ids, labels):
        return model(input_ids=ids, labels=labels).loss

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
    l_comp, g_comp = run(torch.compile(loss_of, backend=COMPILE_BACKEND, fullgraph=True))
    assert rel_err(l_comp, l_eager) < 1e-3
    for n in g32:
        assert rel_err(g_comp[n], g32[n]) <= 1.5 * rel_err(g_eager[n], g32[n]) + 2e-3, n


def test_varying_sequence_lengths_recompile_at_most_once():
    """torch.compile(model) with its default dynamic=None over a run whose sequence lengths vary: the first
    length compiles a static graph, the second a dynamic one that serves every later length (issue target:
    at most 8 compilations)."""
    from fusedlora.testing import batch

    model = _patched("llama")
    counter = CompileCounterWithBackend(COMPILE_BACKEND)
    compiled = torch.compile(model, backend=counter)
    eager_losses, compiled_losses = [], []
    for seq in (16, 12, 20, 9, 24, 13):
        ids, labels = batch(seq=seq)
        compiled_losses.append(compiled(input_ids=ids, labels=labels).loss.detach())
        eager_losses.append(model(input_ids=ids, labels=labels).loss.detach())
    assert counter.frame_count <= 2, counter.frame_count
    for a, b in zip(compiled_losses, eager_losses):
        assert rel_err(a, b) <= COMPILE_TOL


def test_one_decoder_layer_fullgraph():
    model = _patched("llama")
    layer = model.base_model.model.model.layers[0]
    rotary = model.base_model.model.model.rotary_emb
    x = randn_leaf(2, 16, 64)
    pos = torch.arange(16, device=DEVICE)[None].expand(2, -1)

    def run(x):
        out = layer(x, position_embeddings=rotary(x, pos), attention_mask=None, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    leaves = [p for p in layer.parameters() if p.requires_grad]
    assert_compiled_matches_eager(lambda x, *p: run(x), (x, *leaves), COMPILE_TOL)


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
    counter = CompileCounterWithBackend(COMPILE_BACKEND)
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
    assert rel_err(got_loss, ref_loss) <= COMPILE_TOL and got.keys() == ref.keys() and len(got) == 56
    for n in ref:
        assert rel_err(got[n], ref[n]) <= max(COMPILE_TOL, 1e-6), n
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
