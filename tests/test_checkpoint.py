"""Offloaded activation checkpointing (fusedlora.checkpoint, patch(offload_checkpoints=True)) and the chunked
MLP for long sequences (patch(mlp_chunk_bytes=...)): the same loss and gradients as the plain patched model
(bit-identical in fp32 on CPU, dropout included: the recompute replays the forward's RNG state), host buffers
reused across steps, HF's settings restored by unpatch."""

import gc
import warnings

import pytest
import torch

import fusedlora
import fusedlora.checkpoint as ck
from fusedlora.checkpoint import Offloader, offloaded_checkpoint
from fusedlora.testing import DEVICE, HAS_CUDA, rel_err

pytest.importorskip("peft")


def _step(model, seq=16, autocast=None, seed=3):
    from fusedlora.testing import batch

    ids, labels = batch(seq=seq)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(DEVICE, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(dropout=0.0, **patch_kw):
    from fusedlora.testing import make_model

    model = make_model("llama", lora_dropout=dropout)
    report = fusedlora.patch(model, **patch_kw)
    model.train()
    return model, report


def _assert_equal(a, b, tol=0.0):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) == 28
    assert torch.equal(la, lb) if tol == 0.0 else rel_err(la, lb) <= tol
    for n in ga:
        assert torch.equal(ga[n], gb[n]) if tol == 0.0 else rel_err(ga[n], gb[n]) <= tol, n


EXACT = 0.0 if not HAS_CUDA else 1e-6  # CPU: the same kernels in the same order


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoints_match_no_checkpointing(dropout):
    plain, _ = _model(dropout)
    offloaded, report = _model(dropout, offload_checkpoints=True)
    assert "offloaded activation checkpointing on 2 decoder layers" in str(report)
    _assert_equal(_step(offloaded), _step(plain), EXACT)


def test_offloaded_checkpoints_match_hf_checkpointing_and_bf16():
    hf_gc, _ = _model()
    hf_gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded, _ = _model(offload_checkpoints=True)
    _assert_equal(_step(offloaded), _step(hf_gc), EXACT)
    _assert_equal(_step(offloaded, autocast=torch.bfloat16), _step(hf_gc, autocast=torch.bfloat16), 1e-2)


def test_offloaded_checkpoints_under_torch_compile():
    """torch.compile over a model with offloaded checkpoints: the offload's host bookkeeping stays out of the
    graph (a break per layer), the layers inside are compiled, and the step is eager's."""
    from fusedlora.testing import batch

    model, _ = _model(offload_checkpoints=True)
    ids, labels = batch()

    def loss_of():
        return model(input_ids=ids, labels=labels).loss

    eager = _step(model)
    torch._dynamo.reset()
    compiled = torch.compile(loss_of, backend="inductor" if HAS_CUDA else "aot_eager")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = compiled()
    loss.backward()
    got = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    _assert_equal(got, eager, EXACT)


def test_host_buffers_are_reused_and_released():
    model, _ = _model(offload_checkpoints=True)
    layer = model.base_model.model.model.layers[0]
    offloader = layer._gradient_checkpointing_func.keywords["offloader"]
    _step(model)
    pool = offloader.pool.free
    first = {k: [id(b) for b in v] for k, v in pool.items()}
    assert sum(len(v) for v in pool.values()) == 2  # one buffer per layer, back in the pool after the backward
    _step(model)
    assert {k: [id(b) for b in v] for k, v in pool.items()} == first or {k: sorted(v) for k, v in first.items()} == {
        k: sorted(id(b) for b in v) for k, v in pool.items()
    }
    from fusedlora.testing import batch

    ids, labels = batch()
    loss = model(input_ids=ids, labels=labels).loss  # a forward whose graph is dropped without a backward
    assert sum(len(v) for v in pool.values()) == 0
    del loss
    gc.collect()
    assert sum(len(v) for v in pool.values()) == 2


def test_unpatch_restores_checkpointing_settings():
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = _model(offload_checkpoints=True)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m.gradient_checkpointing for m in layers)
    fusedlora.unpatch(model)
    assert not any(m.gradient_checkpointing for m in layers)
    assert not any("_gradient_checkpointing_func" in m.__dict__ for m in layers)


def test_offloaded_checkpoint_gives_parameter_grads_when_the_input_needs_none():
    """A first layer over frozen embeddings: the input needs no gradient, the layer's parameters do."""
    lin = torch.nn.Linear(8, 8).to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    offloader = Offloader()
    y = offloaded_checkpoint(lambda t: torch.tanh(lin(t)), x, offloader=offloader)
    y.square().sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    torch.tanh(lin(x)).square().sum().backward()
    assert torch.equal(got, lin.weight.grad)
    with pytest.raises(TypeError, match="first argument after the function"):
        offloaded_checkpoint(lambda t: t, 3.0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_chunked_mlp_matches_whole_mlp(dropout, monkeypatch):
    """Rows 2 x 80 = 160 with a chunk of 64 rows (3 chunks), each recomputed in the backward. Without dropout
    the same values up to the order of the adapters' row sums; with dropout the chunks draw their own masks
    (checked: the recompute replays them, so the gradient is the one of the loss computed)."""
    from fusedlora.hf import forwards

    whole, _ = _model(dropout)
    chunked, _ = _model(dropout, mlp_chunk_bytes=64 * 2 * 96 * 4)
    calls = []
    real = forwards._chunked_mlp
    spy = lambda m, a, x, rows: calls.append(rows) or real(m, a, x, rows)  # noqa: E731
    monkeypatch.setattr(forwards, "_chunked_mlp", spy)
    got = _step(chunked, seq=80)
    assert calls == [64, 64]  # both layers, 64-row chunks
    if dropout == 0.0:
        _assert_equal(got, _step(whole, seq=80), 1e-5)
    else:
        loss, grads = got
        assert torch.isfinite(loss) and len(grads) == 28
        # the gradient is the loss's: a second step from the same seed gives the same loss and gradients
        _assert_equal(_step(chunked, seq=80), got)


@pytest.mark.gpu
def test_gpu_offloaded_checkpoints_bf16_parity_and_memory():
    """On a GPU: the offloaded step's loss equals on-GPU checkpointing's within bf16 rounding, and its peak
    memory above the model's is lower by most of the layer inputs (8 layers x 4096 x 512 fp32 = 64 MiB; the
    offloader keeps at most two layers' inputs on the GPU)."""
    import peft
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "sdpa"
    ids = torch.randint(0, 512, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses, extra = [], []
    for offload in (False, True):
        torch.manual_seed(0)
        model = peft.get_peft_model(
            transformers.LlamaForCausalLM(cfg).cuda(),
            peft.LoraConfig(r=8, target_modules=["q_proj", "o_proj", "down_proj"]),
        )
        fusedlora.patch(model, offload_checkpoints=offload)
        if not offload:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        losses.append(loss.detach())
        extra.append(torch.cuda.max_memory_allocated() - base)
        del model, loss
        gc.collect()
        torch.cuda.empty_cache()
    assert rel_err(losses[1], losses[0]) < 1e-2
    layer_inputs = 8 * 4096 * 512 * 4
    assert extra[1] <= extra[0] - layer_inputs // 2, (extra, layer_inputs)


@pytest.mark.parametrize("layers_on_host", [0, 1])
def test_inputs_past_the_host_bound_stay_on_the_device(layers_on_host):
    """offload_host_limit_gib bounds the host buffers: a layer input that finds none stays on its device (warned
    once); the step is the same bit for bit, and the next step reuses what the host pool holds."""
    plain, _ = _model()
    per_input = 2 * 16 * 64 * 4  # batch x seq x hidden fp32 (fusedlora.testing's batch, SMALL)
    model, _ = _model(offload_checkpoints=True, offload_host_limit_gib=layers_on_host * per_input / 2**30)
    offloader = model.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords["offloader"]
    with pytest.warns(UserWarning, match="stay on the GPU"):
        got = _step(model)
    assert offloader.kept_on_device == 2 - layers_on_host
    assert offloader.pool.made == layers_on_host * per_input
    _assert_equal(got, _step(plain), EXACT)
    _assert_equal(_step(model), _step(plain), EXACT)  # (warned once: a second warning would fail under -W error)
    assert offloader.kept_on_device == 2 * (2 - layers_on_host)


def test_a_failed_pinning_keeps_the_input_on_the_device(monkeypatch):
    """Pinning that fails (host memory exhausted) stops further attempts; the input stays where it is."""
    import fusedlora.checkpoint as ck

    plain, _ = _model()
    model, _ = _model(offload_checkpoints=True)
    offloader = model.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords["offloader"]
    calls = []

    def failing(like):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA error: out of memory (pinned host)")

    monkeypatch.setattr(ck, "_new_host_buffer", failing)
    with pytest.warns(UserWarning, match="pinning .* failed"):
        got = _step(model)
    assert len(calls) == 1 and offloader.kept_on_device == 2  # one failed attempt, then the bound stops the rest
    _assert_equal(got, _step(plain), EXACT)


def test_bad_host_bound_is_refused():
    with pytest.raises(ValueError, match="offload_host_limit_gib must be a size in GiB"):
        _model(offload_checkpoints=True, offload_host_limit_gib=-1)


# ----------------------------------------------------------------------------------------------------
# The host buffer pool of offloaded checkpointing (fusedlora.checkpoint): buffers serve inputs of every size of
# their class (dynamic padding changes the length each step), idle buffers of other sizes make room at the bound,
# and the default bound reads the memory cgroup's limit as well as MemAvailable, never "no bound".

GIB = 2**30
PER_INPUT = 2 * 16 * 64 * 4  # a decoder layer's input at batch 2 x seq 16, hidden 64, fp32 (fusedlora.testing's SMALL)


def test_inputs_of_changing_length_reuse_and_replace_host_buffers():
    """Dynamic padding: steps of 16, 24, 12 and 16 tokens under a bound of two 24-token buffers. Every layer input
    finds a host buffer (the 24-token step frees the idle 16-token ones, the shorter steps reuse the 24-token
    ones), the pool never passes its bound, and every step equals the plain patched model's."""
    plain, _ = _model()
    limit = 2 * 16384  # two 24-token inputs (12288 bytes each, in the 16384-byte class)
    model, _ = _model(offload_checkpoints=True, offload_host_limit_gib=limit / GIB)
    offloader = model.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords["offloader"]
    for seq in (16, 24, 12, 16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "... stay on the GPU" would be raised
            got = _step(model, seq=seq)
        _assert_equal(got, _step(plain, seq=seq), EXACT)
        assert offloader.kept_on_device == 0 and offloader.pool.made <= limit, (seq, offloader.pool.made)
    idle = [(k, len(b)) for k, b in offloader.pool.free.items() if b]
    assert idle == [((limit // 2, DEVICE == "cuda"), 2)], idle  # the 24-token buffers serve the shorter steps


def test_a_buffer_is_viewed_to_any_input_of_its_class():
    pool = ck._HostPool(limit=1 << 20)
    x = torch.arange(250, dtype=torch.float32).view(10, 25)  # 1000 bytes: the 1024-byte class
    host, key, buf = pool.take(x)
    host.copy_(x)
    assert host.shape == x.shape and host.dtype == x.dtype and torch.equal(host, x) and key == (1024, False)
    pool.give(key, buf)
    y = torch.ones(3, 7, 11, dtype=torch.bfloat16)  # 462 bytes: a smaller class takes the idle larger buffer
    host, key2, buf2 = pool.take(y)
    assert buf2 is buf and key2 == key and host.shape == y.shape and host.dtype == torch.bfloat16
    assert pool.made == 1024


def test_the_bound_frees_idle_buffers_of_other_sizes_and_never_passes():
    pool = ck._HostPool(limit=4096)
    small = [pool.take(torch.empty(256, dtype=torch.float32)) for _ in range(4)]  # 4 x 1024 bytes: the bound
    assert pool.made == 4096 and pool.take(torch.empty(2048, dtype=torch.uint8)) is None  # none idle yet
    for _, key, buf in small[:2]:
        pool.give(key, buf)
    _, key, _ = pool.take(torch.empty(2048, dtype=torch.uint8))  # the two idle 1024-byte buffers make room
    assert key == (2048, False) and pool.made == 4096 and not any(pool.free.values())


@pytest.mark.gpu
def test_pinned_buffers_for_cuda_inputs_and_their_release_at_the_bound():
    """CUDA inputs get pinned buffers; at the bound the idle pinned ones are dropped and torch's cached pinned
    blocks handed back (empty_host_cache), so the bound counts what is really pinned."""
    assert ck._empty_host_cache() is not None, "this torch cannot release cached pinned memory"
    pool = ck._HostPool(limit=4096)
    small = [pool.take(torch.empty(256, device="cuda")) for _ in range(4)]
    assert all(buf.is_pinned() and key == (1024, True) for _, key, buf in small)
    for _, key, buf in small[:2]:
        pool.give(key, buf)
    del small
    host, key, buf = pool.take(torch.empty(512, device="cuda"))
    assert key == (2048, True) and buf.is_pinned() and host.is_pinned() and pool.made == 4096


def _host_files(tmp_path, meminfo_kib=None, cgroup=(), v1=None, v2=None, v2_at=""):
    """Fake /proc/meminfo, /proc/self/cgroup and a cgroup mount under tmp_path; returns monkeypatch targets."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    meminfo = tmp_path / "meminfo"
    if meminfo_kib is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kib} kB\n")
    (tmp_path / "cgroup").write_text("".join(f"{line}\n" for line in cgroup))
    mount = tmp_path / "mnt"
    if v2 is not None:
        d = mount / v2_at
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{v2[0]}\n")
        (d / "memory.current").write_text(f"{v2[1]}\n")
    if v1 is not None:
        d = mount / "memory"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(f"{v1[0]}\n")
        (d / "memory.usage_in_bytes").write_text(f"{v1[1]}\n")
    return {"MEMINFO": str(meminfo), "PROC_CGROUP": str(tmp_path / "cgroup"), "CGROUP_MOUNT": str(mount)}


@pytest.mark.parametrize(
    "case, files, expected",
    [
        ("meminfo only", dict(meminfo_kib=10 * 2**20), 10 * GIB),
        ("cgroup v2 limit", dict(meminfo_kib=10 * 2**20, v2=(4 * GIB, GIB)), 3 * GIB),
        ("cgroup v2 without limit", dict(meminfo_kib=10 * 2**20, v2=("max", GIB)), 10 * GIB),
        (
            "the process's own v2 cgroup",
            dict(meminfo_kib=10 * 2**20, cgroup=["0::/job/7"], v2=(2 * GIB, 0), v2_at="job/7"),
            2 * GIB,
        ),
        ("cgroup v1 limit", dict(meminfo_kib=10 * 2**20, cgroup=["4:memory:/"], v1=(2 * GIB, GIB // 2)), 3 * GIB // 2),
        ("cgroup v1 unlimited", dict(meminfo_kib=10 * 2**20, v1=(9223372036854771712, GIB)), 10 * GIB),
        ("limit below usage", dict(meminfo_kib=10 * 2**20, v2=(GIB, 2 * GIB)), 0),
    ],
)
def test_default_bound_reads_the_cgroup_limit(tmp_path, monkeypatch, case, files, expected):
    for name, value in _host_files(tmp_path, **files).items():
        monkeypatch.setattr(ck, name, value)
    assert ck._default_host_bound() == int(ck.HOST_SHARE * expected), case


def test_unreadable_meminfo_gives_a_conservative_bound_and_a_warning(tmp_path, monkeypatch):
    for name, value in _host_files(tmp_path).items():
        monkeypatch.setattr(ck, name, value)
    pool = ck._HostPool()
    with pytest.warns(UserWarning, match="cannot read MemAvailable"):
        assert pool.take(torch.empty(16)) is not None
    assert pool.limit == ck.CONSERVATIVE_HOST_BYTES
    for name, value in _host_files(tmp_path / "cg", v2=(2 * GIB, 0)).items():
        monkeypatch.setattr(ck, name, value)
    with pytest.warns(UserWarning, match="cannot read MemAvailable"):
        assert ck._default_host_bound() == int(ck.HOST_SHARE * 2 * GIB)  # the cgroup's, when it is lower
