"""fusedlora.cuda_graph_layers: decoder layers replayed as CUDA graphs give the eager patched model's training
run (losses, adapter gradients, gradient accumulation), and every call a graph cannot serve runs eagerly.
The replay itself needs a GPU; the argument handling and the errors are checked everywhere."""

import functools
import warnings

import pytest
import torch

import fusedlora
from fusedlora import cuda_graphs, workload
from fusedlora.testing import HAS_CUDA

gpu = pytest.mark.gpu


def test_arguments_flatten_and_rebuild():
    a, b, c = torch.zeros(2, 3), torch.ones(4), torch.arange(3)
    call = ((a,), {"position_embeddings": (b, c), "attention_mask": None, "use_cache": False, "n": 3})
    tensors: list = []
    desc = cuda_graphs._flatten(call, tensors)
    assert [t is x for t, x in zip(tensors, (a, b, c))] == [True] * 3
    args, kwargs = cuda_graphs._rebuild(desc, iter(tensors))
    assert args[0] is a and kwargs["position_embeddings"][0] is b and kwargs["position_embeddings"][1] is c
    assert kwargs["attention_mask"] is None and kwargs["use_cache"] is False and kwargs["n"] == 3

    # the description is the cache key: it changes with a shape, a stride, requires_grad or a plain value
    def key(*a, **k):
        return cuda_graphs._flatten((a, k), [])

    assert key(a) == key(torch.zeros(2, 3))
    assert key(a) != key(torch.zeros(3, 2)) and key(a) != key(torch.zeros(3, 2).t())
    assert key(a) != key(torch.zeros(2, 3, requires_grad=True)) and key(a, n=1) != key(a, n=2)
    with pytest.raises(TypeError):
        cuda_graphs._flatten(object(), [])

    # a dict subclass (a ModelOutput, say) comes back as its own type
    class Output(dict):
        pass

    tensors = []
    rebuilt = cuda_graphs._rebuild(cuda_graphs._flatten(Output(hidden=a), tensors), iter(tensors))
    assert type(rebuilt) is Output and rebuilt["hidden"] is a


def test_wrapped_layers_without_a_graph_run_eagerly_and_copy():
    """Calls no graph can serve (here: CPU tensors) run the layer's own forward: the same loss and gradients;
    a deep copy of the model (TRL's reference model) gets wrappers of its own; unpatch removes them."""
    import copy

    device = "cuda" if HAS_CUDA else "cpu"
    ref, _ = workload.build("tiny", "lora", "fusedlora", device, False)
    model = copy.deepcopy(ref)
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    wrappers = cuda_graphs.graph_modules(layers, warmup=1)
    ids, labels, _ = workload.batches(1, 2, 16, False, device)[0]

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]

    if not HAS_CUDA:
        want, got = loss_and_grads(ref), loss_and_grads(model)
        assert torch.equal(want[0], got[0]) and all(torch.equal(a, b) for a, b in zip(want[1], got[1]))
        assert all(w.eager_calls == 1 and w.replays == 0 for w in wrappers)
    twin = copy.deepcopy(model)
    twin_wrappers = [m.__dict__["forward"] for m in twin.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert all(isinstance(w, cuda_graphs.GraphedModule) for w in twin_wrappers)
    twin_layers = [m for m in twin.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert [w.module_ref() for w in twin_wrappers] == twin_layers and not any(w.graphs for w in twin_wrappers)
    assert len({id(w.shared) for w in twin_wrappers}) == 1 and twin_wrappers[0].shared is not wrappers[0].shared
    assert all(w.original.__self__ is m for w, m in zip(twin_wrappers, twin_layers))
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(model)
    report = fusedlora.patch(model)  # patching again first unpatches: the wrappers go, and the report says so
    assert "removed the CUDA-graph wrappers of 2 decoder layers" in str(report)
    assert not any(isinstance(m.__dict__.get("forward"), cuda_graphs.GraphedModule) for m in model.modules())
    assert fusedlora.unpatch(twin) >= len(twin_layers)
    assert not any(isinstance(m.__dict__.get("forward"), cuda_graphs.GraphedModule) for m in twin.modules())


def test_adapter_state_is_part_of_the_key():
    """What PEFT changes without touching a tensor the graph reads (the active adapter, disable_adapter,
    merge_adapter, the scale) changes the wrapper's adapter state, so an old graph is never replayed for it."""
    import peft

    model, _ = workload.build("tiny", "lora", "hf", "cpu", False)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=workload.TARGETS))
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    w = cuda_graphs.graph_modules(layers)[0]
    assert len(w.lora_modules) == len(workload.TARGETS)
    states = [w.adapter_state()]
    model.set_adapter("other")
    states.append(w.adapter_state())
    model.set_adapter("default")
    assert w.adapter_state() == states[0]
    with model.disable_adapter():
        states.append(w.adapter_state())
    for m in w.lora_modules:
        m.scaling["default"] *= 2
    states.append(w.adapter_state())
    w.lora_modules[0].lora_dropout["default"] = torch.nn.Dropout(0.1)
    states.append(w.adapter_state())
    model.merge_adapter()
    states.append(w.adapter_state())
    assert len(set(states)) == len(states), states
    # the whole cache key (what a GPU call computes after its device checks), on this machine's tensors
    x = torch.zeros(1, 4, workload.SHAPES["tiny"]["hidden_size"])
    tensors = []
    desc = cuda_graphs._flatten(((x,), {}), tensors)
    key, got_tensors, params = w._cache_key(layers[0], desc, tensors, cuda_graphs.LayerGraph)
    assert got_tensors == tensors and key.args == desc and key.adapters == w.adapter_state()
    assert [id(p) for p in params] == list(key.params) and all(p.requires_grad for p in params)
    assert key.kind is cuda_graphs.LayerGraph
    assert w._cache_key(layers[0], desc, tensors, cuda_graphs.LayerGraph).key == key
    assert w._cache_key(layers[0], desc, tensors, cuda_graphs.CheckpointGraph).key != key
    model.unmerge_adapter()
    assert w._cache_key(layers[0], desc, tensors, cuda_graphs.LayerGraph).key != key


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_needs_a_gpu():
    model, _ = workload.build("tiny", "lora", "fusedlora", "cpu", False)
    with pytest.raises(RuntimeError, match="cuda_graph_layers: CUDA graphs need a CUDA GPU"):
        fusedlora.cuda_graph_layers(model)
    # through patch: a note, not an error (the rest of the patch applies)
    report = fusedlora.patch(model, cuda_graphs=True)
    assert "cuda_graphs: not applied (fusedlora.cuda_graph_layers: CUDA graphs need a CUDA GPU)" in str(report)
    assert report.kinds["attention"].patched == 2
    report = fusedlora.patch(model, cuda_graphs=True, offload_checkpoints=True)
    assert "cuda_graphs: not applied" in str(report) and "offloaded activation checkpointing" in str(report)


def test_bad_options_and_models():
    if not HAS_CUDA:
        pytest.skip("the option checks come after the GPU check")
    model, _ = workload.build("tiny", "lora", "fusedlora", "cuda", False)
    with pytest.raises(ValueError, match="max_shapes >= 1"):
        fusedlora.cuda_graph_layers(model, max_shapes=0)
    with pytest.raises(TypeError, match="has no decoder layers"):
        fusedlora.cuda_graph_layers(torch.nn.Linear(2, 2))


def _train(model, data, accumulate=1, lr=1e-3, amp=True):
    """Losses and the adapters' gradients of each optimizer step (AdamW), bf16 autocast on the GPU (amp)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, grads = [], []
    for i in range(0, len(data), accumulate):
        for ids, labels, pos in data[i : i + accumulate]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=ids, labels=labels, position_ids=pos).loss / accumulate
            loss.backward()
            losses.append(loss.detach().float())
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses), grads


@gpu
def test_patch_option_applies_the_graphs():
    model, _ = workload.build("tiny", "lora", "hf", "cuda", False)
    for offload in (False, True):
        report = fusedlora.patch(model, cuda_graphs=True, offload_checkpoints=offload)
        assert "CUDA graphs on 2 decoder layers" in str(report)
        assert sum(isinstance(m.__dict__.get("forward"), cuda_graphs.GraphedModule) for m in model.modules()) == 2


def _assert_same_run(got, want, loss_rtol=2e-3, loss_atol=1e-4, rtol=2e-2, atol=2e-2, floor=1e-6):
    """Two `_train` results agree: per-step losses, and per step every adapter gradient (atol relative to the
    gradient's largest entry)."""
    torch.testing.assert_close(got[0], want[0], rtol=loss_rtol, atol=loss_atol)
    for step_got, step_want in zip(got[1], want[1]):
        for g, r in zip(step_got, step_want):
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * r.abs().max().item() + floor)


def _graphed(mode, **options):
    model, _ = workload.build("tiny", mode, "fusedlora", "cuda", False)
    layers = _graphed_wrappers(model, **options)
    assert len(layers) == workload.SHAPES["tiny"]["num_hidden_layers"]
    return model, layers


@gpu
@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_graphed_training_matches_eager(mode, accumulate):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    data = workload.batches(8, 2, 64, False, "cuda")
    eager, _ = workload.build("tiny", mode, "fusedlora", "cuda", False)
    want = _train(eager, data, accumulate)
    model, layers = _graphed(mode, warmup=1)
    got = _train(model, data, accumulate)
    # replay after one eager call per layer; the graphs run the eager kernels on the same inputs, so the
    # run is the eager one up to cuBLAS choosing another algorithm on the capture stream (bf16 autocast)
    assert all(w.replays == len(data) - 1 and w.eager_calls == 1 for w in layers), [
        (w.replays, w.eager_calls) for w in layers
    ]
    _assert_same_run(got, want)


def _graphed_and_eager_trained(n_batches, steps=3):
    """(batches, graphed model, its wrappers, the eager patched model, replays so far), both trained `steps`
    identical steps."""
    data = workload.batches(n_batches, 2, 64, False, "cuda")
    model, layers = _graphed("lora", warmup=1)
    ref, _ = workload.build("tiny", "lora", "fusedlora", "cuda", False)
    _train(model, data[:steps])
    _train(ref, data[:steps])
    return data, model, layers, ref, [w.replays for w in layers]


@gpu
def test_calls_a_graph_cannot_serve_run_eagerly():
    data, model, layers, ref, replays = _graphed_and_eager_trained(6)
    assert min(replays) >= 2
    ids, labels, _ = data[3]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        # no_grad / eval: eager, same values as the eager model
        with torch.no_grad():
            a, b = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)
        model.eval()
        ref.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
        model.train()
        ref.train()
        assert [w.replays for w in layers] == replays
        # two training forwards before a backward: the second runs eagerly, both backwards are right
        la, lb = model(input_ids=ids, labels=labels).loss, model(input_ids=data[4][0], labels=data[4][1]).loss
        ra, rb = ref(input_ids=ids, labels=labels).loss, ref(input_ids=data[4][0], labels=data[4][1]).loss
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for p in params + ref_params:
        p.grad = None
    (la + 2 * lb).backward()
    (ra + 2 * rb).backward()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item() + 1e-6)
    assert [w.replays for w in layers] == [r + 1 for r in replays]
    # a new shape past max_shapes runs eagerly; a stale graph (forward without backward) frees its slot
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids[:, :32], labels=labels[:, :32]).loss.backward()
        model(input_ids=ids, labels=labels)  # result dropped: no backward will come
        model(input_ids=ids, labels=labels).loss.backward()
    assert [w.replays for w in layers] == [r + 3 for r in replays]
    # HF gradient checkpointing turned on after the capture: the checkpointed key would be a second shape
    # (max_shapes=1), so it runs eagerly, with the eager model's gradients; unpatch removes the wrappers
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in params + ref_params:
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=labels).loss.backward()
        ref(input_ids=ids, labels=labels).loss.backward()
    assert [w.replays for w in layers] == [r + 3 for r in replays]
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item() + 1e-6)
    fusedlora.unpatch(model)
    assert not any(isinstance(m.__dict__.get("forward"), cuda_graphs.GraphedModule) for m in model.modules())
    assert not any(
        isinstance(m.__dict__.get("_gradient_checkpointing_func"), cuda_graphs._GraphedCheckpoint)
        for m in model.modules()
    )


def _checkpointed(mode, offload, graphs, dropout=0.0):
    """The tiny patched model under HF's gradient checkpointing (non-reentrant) or fusedlora's offloaded one,
    optionally with graphed layers (warmup 1) and LoRA dropout; returns (model, wrappers)."""
    model, _ = workload.build("tiny", mode, "fusedlora", "cuda", gc=not offload, offload=offload)
    if dropout:
        for proj in (m for m in model.modules() if "lora_dropout" in m._modules):
            proj.lora_dropout["default"] = torch.nn.Dropout(dropout)
    return model, (_graphed_wrappers(model, warmup=1) if graphs else [])


@gpu
@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("offload", [False, True])
def test_graphed_checkpointing_matches_eager_checkpointing(mode, offload):
    """Checkpointed layers replay as checkpoint graphs (a forward saving nothing, a recompute-and-backward):
    the eager checkpointed model's losses and gradients, with gradient accumulation; the layer input kept
    on the GPU (HF's checkpointing) or offloaded to the host (fusedlora's)."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    data = workload.batches(8, 2, 64, False, "cuda")
    ref, _ = _checkpointed(mode, offload, graphs=False)
    want = _train(ref, data, accumulate=2)
    model, layers = _checkpointed(mode, offload, graphs=True)
    got = _train(model, data, accumulate=2)
    assert all(w.replays == len(data) - 1 for w in layers), [(w.replays, w.eager_calls) for w in layers]
    assert all(isinstance(g, cuda_graphs.CheckpointGraph) for w in layers for g in w.graphs.values())
    assert all(
        isinstance(m.__dict__.get("_gradient_checkpointing_func"), cuda_graphs._GraphedCheckpoint)
        for m in model.modules()
        if type(m).__name__ == "LlamaDecoderLayer"
    )
    _assert_same_run(got, want)
    # two forwards before their backwards: checkpoint graphs keep nothing, so both replay
    ids, labels, _ = data[0]
    before = [w.replays for w in layers]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (model(input_ids=ids, labels=labels).loss + model(input_ids=data[1][0], labels=data[1][1]).loss).backward()
        (ref(input_ids=ids, labels=labels).loss + ref(input_ids=data[1][0], labels=data[1][1]).loss).backward()
    assert [w.replays for w in layers] == [b + 2 for b in before]
    for p, r in zip(
        (p for p in model.parameters() if p.requires_grad), (p for p in ref.parameters() if p.requires_grad)
    ):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item() + 1e-6)
    fusedlora.unpatch(model)
    assert not any(
        isinstance(m.__dict__.get("_gradient_checkpointing_func"), cuda_graphs._GraphedCheckpoint)
        for m in model.modules()
    )


@gpu
def test_graphed_checkpointing_recomputes_the_forwards_dropout_masks():
    """LoRA dropout 0.5 under checkpoint graphs: the recompute replays under the forward's generator state,
    so the gradients are those of graphed layers without checkpointing from the same seed. No optimizer step:
    lora_B stays PEFT's zeros, so the loss ignores the masks while lora_B's gradients depend on every one
    (another mask in the recompute gives other gradients), and the capture step's draws change no weight."""
    data = workload.batches(4, 2, 64, False, "cuda")
    runs = []
    for offload in (None, False):
        if offload is None:
            model, _ = workload.build("tiny", "lora", "fusedlora", "cuda", False)
            for proj in (m for m in model.modules() if "lora_dropout" in m._modules):
                proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
            layers = _graphed_wrappers(model, warmup=1)
        else:
            model, layers = _checkpointed("lora", offload, graphs=True, dropout=0.5)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = []
        for step, (ids, labels, _) in enumerate(data):
            torch.cuda.manual_seed(100 + step)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(input_ids=ids, labels=labels).loss.backward()
            grads.append([p.grad.detach().clone() for p in params])
            model.zero_grad(set_to_none=True)
        assert all(w.replays >= 2 for w in layers)
        runs.append(grads)
    for step_a, step_b in list(zip(*runs))[2:]:  # the steps after both captured (the same masks from then on)
        assert any(a.abs().max() > 0 for a in step_a)
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item() + 1e-6)


@gpu
def test_a_new_lora_scale_is_not_replayed_from_an_old_graph():
    data, model, layers, ref, replays = _graphed_and_eager_trained(4)
    for m in (model, ref):
        for proj in (p for p in m.modules() if "lora_A" in p._modules):
            proj.scaling["default"] *= 3
    got, want = _train(model, data[3:]), _train(ref, data[3:])
    assert [w.replays for w in layers] == replays  # the baked-in scale would have been wrong: eager instead
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=1e-4)


@gpu
def test_moved_parameters_drop_the_graphs():
    data = workload.batches(4, 2, 64, False, "cuda")
    model, layers = _graphed("lora", warmup=0)
    _train(model, data[:2])
    assert all(w.replays == 2 for w in layers)
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.data = lora_a.data.clone()  # a new address: a graph would read the old one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, data[2:3])
    assert any("parameters moved" in str(w.message) for w in caught)


@gpu
def test_hf_trainer_with_graphed_layers(tmp_path):
    """The HF Trainer (bf16, gradient accumulation 2, AdamW) on the patched model with graphed layers gives
    the eager patched model's losses, and the layers did replay."""
    import transformers
    from torch.utils.data import Dataset

    data = workload.batches(8, 1, 64, False, "cpu")

    class Rows(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i][0][0], "labels": data[i][1][0]}

    def train(graphs):
        model, _ = workload.build("tiny", "lora", "fusedlora", "cuda", False)
        layers = _graphed_wrappers(model, warmup=1) if graphs else []
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(graphs)),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            bf16=True,
            seed=0,
            data_seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(Rows())
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], layers

    ref, _ = train(False)
    got, layers = train(True)
    assert len(got) == len(ref) == 4
    assert all(w.replays == 7 for w in layers), [w.replays for w in layers]
    assert got == pytest.approx(ref, rel=5e-3)


def _graphed_wrappers(model, **options):
    fusedlora.cuda_graph_layers(model, **options)
    return [
        m.__dict__["forward"]
        for m in model.modules()
        if isinstance(m.__dict__.get("forward"), cuda_graphs.GraphedModule)
    ]


class _FakeGraph:
    """Stands in for a CUDA graph on a CPU: replay runs the recorded computation on the static tensors."""

    def __init__(self, fn):
        self.replay = fn


def test_replay_function_bookkeeping_on_a_cpu():
    """_Replay over a linear layer with fake graphs (the same static-tensor contract as CUDA graphs): inputs
    copied in, gradients of the input and the weight returned fresh (gradient accumulation adds them up), a
    backward after a newer replay refused, and weights moved between forward and backward refused."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3, bias=False)
    static_x, out, gout = torch.zeros(4, 5, requires_grad=True), torch.zeros(4, 3), torch.zeros(4, 3)
    gx, gw = torch.zeros(4, 5), torch.zeros(3, 5)
    fwd = _FakeGraph(lambda: out.copy_(static_x.detach() @ layer.weight.detach().t()))
    bwd = _FakeGraph(lambda: (gx.copy_(gout @ layer.weight.detach()), gw.copy_(gout.t() @ static_x.detach())))
    graph = cuda_graphs.LayerGraph(
        inputs=[static_x],
        params=[layer.weight],
        outputs=[out],
        out_desc=("T",),
        grad_outputs=[gout],
        grad_inputs=[gx, gw],
        diff_outputs=[0],
        wants_grad=[0],
        fwd=fwd,
        bwd=bwd,
        module_ref=cuda_graphs.weakref.ref(layer),
        ptrs=cuda_graphs._addresses(layer),
    )
    x = torch.randn(4, 5, requires_grad=True)
    seeds = []
    for _ in range(2):  # two accumulation steps
        (y,) = cuda_graphs._Replay.apply(graph, x, layer.weight)
        torch.testing.assert_close(y, x.detach() @ layer.weight.detach().t())
        seeds.append(torch.randn(4, 3))
        (y * seeds[-1]).sum().backward()
    total = seeds[0] + seeds[1]
    torch.testing.assert_close(x.grad, total @ layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, total.t() @ x.detach())
    assert x.grad.data_ptr() != gx.data_ptr() and layer.weight.grad.data_ptr() != gw.data_ptr()
    (old,) = cuda_graphs._Replay.apply(graph, x, layer.weight)
    (new,) = cuda_graphs._Replay.apply(graph, x, layer.weight)
    with pytest.raises(RuntimeError, match="replayed again before this backward"):
        old.sum().backward()
    layer.weight.data = layer.weight.data.clone()  # moved: the backward graph would read the old memory
    with pytest.raises(RuntimeError, match="weights moved between its forward and its backward"):
        new.sum().backward()


def test_option_and_model_errors_name_the_problem(monkeypatch):
    """The checks before any CUDA work, run on any machine (CUDA reported present): bad options, a model with no
    decoder layers, layers already compiled or carrying an instance-level forward."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = workload.build("tiny", "lora", "fusedlora", "cpu", False)
    with pytest.raises(ValueError, match="expected warmup >= 0 and max_shapes >= 1, got warmup=1, max_shapes=0"):
        fusedlora.cuda_graph_layers(model, warmup=1, max_shapes=0)
    with pytest.raises(TypeError, match="cuda_graph_layers: Linear has no decoder layers"):
        fusedlora.cuda_graph_layers(torch.nn.Linear(2, 2))
    layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    layer.forward = lambda *a, **k: None  # an accelerate hook, say
    with pytest.raises(
        RuntimeError, match=r"decoder layers \(LlamaDecoderLayer\) are compiled .* or have an instance-level forward"
    ):
        fusedlora.cuda_graph_layers(model)
    del layer.forward
    fusedlora.compile_layers(model, backend="eager")
    with pytest.raises(RuntimeError, match="are compiled"):
        fusedlora.cuda_graph_layers(model)


def test_fsdp2_sharded_parameters_are_recognised():
    class DTensor(torch.nn.Parameter):  # stands in for torch.distributed.tensor.DTensor (matched by name)
        pass

    sharded, plain = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    sharded.weight = DTensor(sharded.weight.data)
    assert cuda_graphs._sharded(sharded) and not cuda_graphs._sharded(plain)
    assert not cuda_graphs._sharded(torch.nn.ReLU())


@pytest.mark.skipif(HAS_CUDA, reason="checks the message without a GPU")
def test_probe_without_a_gpu_says_so(capsys):
    from build_tools import cuda_graph_probe

    assert cuda_graph_probe.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _linear_checkpoint_graph(layer, n):
    """Fake checkpoint graphs of `layer` (a bias-free Linear) over n-row inputs: the forward reads
    the shared input buffer and writes the shared output buffer, the backward reads the input buffer again
    (its recompute) and writes the shared input gradient and the weight's own gradient."""
    x_in, out = torch.zeros(n, layer.in_features, requires_grad=True), torch.zeros(n, layer.out_features)
    gout, gx, gw = torch.zeros(n, layer.out_features), torch.zeros(n, layer.in_features), torch.zeros_like(layer.weight)
    fwd = _FakeGraph(lambda: out.copy_(x_in.detach() @ layer.weight.detach().t()))
    bwd = _FakeGraph(lambda: (gx.copy_(gout @ layer.weight.detach()), gw.copy_(gout.t() @ x_in.detach())))
    return cuda_graphs.CheckpointGraph(
        inputs=[x_in],
        params=[layer.weight],
        outputs=[out],
        out_desc=("T",),
        grad_outputs=[gout],
        grad_inputs=[gx, gw],
        diff_outputs=[0],
        wants_grad=[0],
        fwd=fwd,
        bwd=bwd,
        module_ref=cuda_graphs.weakref.ref(layer),
        ptrs=cuda_graphs._addresses(layer),
    )


@pytest.mark.parametrize("offload", [False, True])
def test_checkpoint_replay_bookkeeping_on_a_cpu(offload):
    """_CheckpointReplay with fake graphs: outputs are fresh copies (the shared buffer is overwritten by the next
    call), several forwards may wait for their backwards, each backward copies its own kept input (on the
    host when offloaded) back into the shared input buffer, gradients accumulate, moved weights are refused."""
    from fusedlora.checkpoint import Offloader

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3, bias=False)
    graph = _linear_checkpoint_graph(layer, 4)
    offloader = Offloader() if offload else None
    xs = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    ys = [cuda_graphs._CheckpointReplay.apply(graph, offloader, x, layer.weight)[0] for x in xs]
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, x.detach() @ layer.weight.detach().t())
        assert y.data_ptr() != graph.outputs[0].data_ptr()
    if offload:
        assert len([r for r in offloader.live if r() is not None]) == 3
    seeds = [torch.randn(4, 3) for _ in ys]
    sum((y * s).sum() for y, s in zip(reversed(ys), reversed(seeds))).backward()
    for x, s in zip(xs, seeds):  # each backward recomputed from its own input, not the last one copied in
        torch.testing.assert_close(x.grad, s @ layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, sum(s.t() @ x.detach() for x, s in zip(xs, seeds)))
    assert layer.weight.grad.data_ptr() != graph.grad_inputs[1].data_ptr()
    (y,) = cuda_graphs._CheckpointReplay.apply(graph, offloader, xs[0], layer.weight)
    layer.weight.data = layer.weight.data.clone()
    with pytest.raises(RuntimeError, match="weights moved between its forward and its backward"):
        y.sum().backward()


def test_checkpointing_function_is_wrapped_and_unwrapped():
    """Under HF's gradient checkpointing a wrapped layer's checkpointing function becomes _GraphedCheckpoint at
    its first call (around HF's function, or fusedlora's offloaded one, again after gradient_checkpointing_enable
    replaced it); calls no graph serves (here: CPU tensors) go to that function, with its loss and gradients;
    unpatch restores it and a deep copy gets the plain function."""
    import copy

    device = "cuda" if HAS_CUDA else "cpu"
    for offload in (False, True):
        ref, _ = workload.build("tiny", "lora", "fusedlora", device, gc=not offload, offload=offload)
        model = copy.deepcopy(ref)
        layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        inner = [m._gradient_checkpointing_func for m in layers]
        wrappers = cuda_graphs.graph_modules(layers, warmup=1)
        ids, labels, _ = workload.batches(1, 2, 16, False, device)[0]
        assert all(isinstance(m._gradient_checkpointing_func, cuda_graphs._GraphedCheckpoint) for m in layers)
        for _ in range(2):
            for m in (ref, model):
                m.zero_grad(set_to_none=True)
                m(input_ids=ids, labels=labels).loss.backward()
        funcs = [m._gradient_checkpointing_func for m in layers]
        assert all(
            isinstance(f, cuda_graphs._GraphedCheckpoint) and f.inner is i and f.wrapper is w
            for f, i, w in zip(funcs, inner, wrappers)
        )
        assert all((f.offloader is not None) == offload for f in funcs)
        if not HAS_CUDA:
            assert all(w.replays == 0 and w.eager_calls >= 1 for w in wrappers)
            for p, r in zip(model.parameters(), ref.parameters()):
                assert (p.grad is None) == (r.grad is None) and (p.grad is None or torch.equal(p.grad, r.grad))
        if not offload:  # HF's gradient_checkpointing_enable replaces it: the next checkpointed call wraps it again
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner = [m._gradient_checkpointing_func for m in layers]
            assert not any(isinstance(f, cuda_graphs._GraphedCheckpoint) for f in inner)
            model(input_ids=ids, labels=labels).loss.backward()
            assert all(m._gradient_checkpointing_func.inner is i for m, i in zip(layers, inner))
        twin = copy.deepcopy(model)
        assert not any(
            isinstance(m.__dict__.get("_gradient_checkpointing_func"), cuda_graphs._GraphedCheckpoint)
            for m in twin.modules()
        )
        fusedlora.unpatch(model)
        assert [m.__dict__.get("_gradient_checkpointing_func") for m in layers if not offload] == (
            [] if offload else inner
        )


def _decoder_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def _cpu_model(checkpointing, dropout=0.0):
    model, _ = workload.build(
        "tiny", "lora", "fusedlora", "cpu", gc=checkpointing == "hf", offload=checkpointing == "offload"
    )
    if dropout:
        for proj in (m for m in model.modules() if "lora_dropout" in m._modules):
            proj.lora_dropout["default"] = torch.nn.Dropout(dropout)
    return model


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run real graphs")
@pytest.mark.parametrize("checkpointing", [None, "hf", "offload"])
def test_fake_graphs_replay_the_eager_training_on_a_cpu(checkpointing):
    """The whole capture and replay with CUDA graphs faked on a CPU (fusedlora.testing.fake_cuda_graphs: the recorded
    ops and kernel launches run again on the same tensors): graphed layers (saved activations, or checkpoint
    graphs under HF's or the offloaded checkpointing) give the eager model's losses and gradients over steps
    with new data, gradient accumulation included; a second forward before a backward is served too."""
    from fusedlora.testing import fake_cuda_graphs

    data = workload.batches(3, 2, 16, False, "cpu")
    ref = _cpu_model(checkpointing)
    want = _train(ref, data, accumulate=2, amp=False)
    with fake_cuda_graphs():
        model = _cpu_model(checkpointing)
        wrappers = cuda_graphs.graph_modules(_decoder_layers(model), warmup=1)
        got = _train(model, data, accumulate=2, amp=False)
        assert all(w.replays == len(data) - 1 and w.eager_calls == 1 for w in wrappers), [
            (w.replays, w.eager_calls, w.failed) for w in wrappers
        ]
        graphs = [g for w in wrappers for g in w.graphs.values()]
        kind = cuda_graphs.LayerGraph if checkpointing is None else cuda_graphs.CheckpointGraph
        assert len(graphs) == len(wrappers) and all(type(g) is kind for g in graphs)
        assert all(g.fwd.replays == len(data) - 1 and g.bwd.replays == len(data) - 1 for g in graphs)
        assert wrappers[0].shared.warm_ups == 1  # the second layer's capture is sized from its eager call
        _assert_same_run(got, want, 1e-5, 1e-6, 1e-4, 1e-6, 1e-9)
        # two forwards, then one backward through both: checkpoint graphs replay both, saved-activation
        # graphs run the second eagerly (the first one's activations are still the graph's)
        ids, labels, _ = data[0]
        before = [w.replays for w in wrappers]
        params = [p for p in model.parameters() if p.requires_grad]
        ref_params = [p for p in ref.parameters() if p.requires_grad]
        for m in (model, ref):
            (m(input_ids=ids, labels=labels).loss + 2 * m(input_ids=data[1][0], labels=data[1][1]).loss).backward()
        assert [w.replays for w in wrappers] == [b + (2 if checkpointing else 1) for b in before]
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6 * r.grad.abs().max().item() + 1e-9)
        if checkpointing is None:
            # the second layer's graph reads the first one's static output in place; when the first layer runs
            # eagerly (here: a new LoRA scale in it, past max_shapes), its input comes from elsewhere and the
            # second layer is captured again, reading a copy, never copying into the first graph's output
            first, second = (next(iter(w.graphs.values())) for w in wrappers)
            assert first.aliased == () and second.aliased == (0,)
            assert second.inputs[0].data_ptr() == first.outputs[0].data_ptr()
            for m in (model, ref):
                proj = next(p for p in _decoder_layers(m)[0].modules() if "lora_A" in p._modules)
                proj.scaling["default"] *= 2
            before = [w.replays for w in wrappers]
            got, want = _train(model, data[:2], amp=False), _train(ref, data[:2], amp=False)
            assert [w.replays for w in wrappers] == [before[0], before[1] + 2]
            (again,) = wrappers[1].graphs.values()
            assert again is not second and again.aliased == ()
            _assert_same_run(got, want, 1e-5, 1e-6, 1e-4, 1e-6, 1e-9)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run real graphs")
@pytest.mark.parametrize("checkpointing", ["hf", "offload"])  # (the recompute's RNG; CI time)
def test_fake_graphs_draw_the_eager_dropout_masks_on_a_cpu(checkpointing):
    """LoRA dropout 0.5 with fake graphs: a replay draws from the generator as the eager forward does, and a
    checkpointed layer's recompute replays under its forward's generator state, so from the same seed the
    graphed run's lora_B gradients (which depend on every mask; no optimizer step, so lora_B stays zero and the
    capture step's own draws change nothing) are the eager run's."""
    from fusedlora.testing import fake_cuda_graphs

    data = workload.batches(3, 2, 16, False, "cpu")

    def grads(model):
        out = []
        for step, (ids, labels, _) in enumerate(data):
            torch.manual_seed(100 + step)
            model(input_ids=ids, labels=labels).loss.backward()
            out.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n})
            model.zero_grad(set_to_none=True)
        return out

    want = grads(_cpu_model(None, dropout=0.5))
    with fake_cuda_graphs():
        model = _cpu_model(checkpointing, dropout=0.5)
        wrappers = cuda_graphs.graph_modules(_decoder_layers(model), warmup=1)
        got = grads(model)
        assert all(w.replays == len(data) - 1 for w in wrappers)
    for step_got, step_want in list(zip(got, want))[2:]:  # from the step after the capture
        assert step_got.keys() == step_want.keys() and any(g.abs().max() > 0 for g in step_got.values())
        for n in step_got:
            torch.testing.assert_close(step_got[n], step_want[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run real graphs")
def test_other_checkpointing_functions_keep_their_layers_eager():
    """A checkpointing function that is neither torch's checkpoint nor fusedlora's offloaded one (transformers
    5.25's activation_checkpointing_enable(offload=True) wraps checkpoint in save_on_cpu) keeps its layers
    eager under it, with a warning: a checkpoint graph would keep the layer input on the GPU, against what the
    function was chosen for. The loss and gradients are the eager model's."""
    from torch.utils.checkpoint import checkpoint

    from fusedlora.testing import fake_cuda_graphs

    calls = []

    def offloading_checkpoint(function, *args, **kwargs):
        calls.append(1)
        with torch.autograd.graph.save_on_cpu():
            return checkpoint(function, *args, **kwargs)

    data = workload.batches(3, 2, 16, False, "cpu")
    want = _train(_cpu_model("hf"), data, amp=False)
    with fake_cuda_graphs():
        model = _cpu_model("hf")
        for layer in _decoder_layers(model):
            layer._gradient_checkpointing_func = functools.partial(offloading_checkpoint, use_reentrant=False)
        wrappers = cuda_graphs.graph_modules(_decoder_layers(model), warmup=1)
        with pytest.warns(UserWarning, match="neither torch's checkpoint nor fusedlora's offloaded"):
            got = _train(model, data, amp=False)
    assert all(w.replays == 0 and not w.graphs for w in wrappers), [(w.replays, w.failed) for w in wrappers]
    assert len(calls) == len(data) * len(wrappers)
    _assert_same_run(got, want, 1e-5, 1e-6, 1e-4, 1e-6, 1e-9)
    plain = cuda_graphs._plain_torch_checkpoint
    assert plain(checkpoint) and plain(functools.partial(checkpoint, use_reentrant=True, preserve_rng_state=False))
    assert not plain(functools.partial(checkpoint, use_reentrant=False, context_fn=lambda: None))
    assert not plain(functools.partial(offloading_checkpoint, use_reentrant=False))
