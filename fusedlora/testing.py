"""What fusedlora's tests (and the examples and build tools) share: comparison helpers, tiny model builders,
fake CUDA graphs. Installed with the package, so that an installed wheel's user can check a patched model the
same way; nothing here runs at import (no kernel module is imported, TRITON_INTERPRET is left alone: the
tests' conftest sets it first, before any kernel module is imported).

- rel_err, assert_close, kernel_round: compare a kernel's result with a plain-torch reference;
- run_isolated, assert_device_assert: code in a fresh process (a CUDA device-side assert ends the context);
- tiny_config, make_model, add_lora, batch (SMALL, TARGETS, FUSED_TARGETS): tiny random HF models with PEFT
  LoRA on DEVICE, and a batch for them;
- make (Block, Attn, MLP), attn_peft, attn_fused: a tiny decoder block with PEFT LoRA on its seven projections,
  and an attention-shaped use of q, k, v, o through PEFT's layers or fusedlora's;
- fake_cuda_graphs: CUDA graphs faked on a CPU (below).

Fake CUDA graphs: faked on a CPU so that the tests run fusedlora.cuda_graphs' capture and replay (both graph kinds,
the shared buffers, the checkpointing wiring, the recompute's RNG state) in CI.

A fake graph records what its capture ran: every aten op (through a TorchDispatchMode, which also sees the
backward's ops) and every Triton launch of the loader (the interpreter's CPU path), each with the very tensors it
read and wrote. Replay runs the record again on those tensors: ops that write their arguments (in-place, out=)
and kernel launches run as recorded, views are skipped (they see their base), and every other op's result is
copied into the tensor the capture produced. That is a CUDA graph's contract: the same work on the same memory,
the host's Python not run again. Not faked: the memory pool (each capture allocates fresh CPU memory, so pool
reuse between graphs is not exercised) and streams (no-ops).
Also `python -m build_tools.host_overhead --graphs`: the host time of a graphed step (replays that do nothing).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def rel_err(a, b) -> float:
    """||a - b|| / ||b||; the denominator is floored at 1e-2 so an exactly-zero reference (a 1-class
    cross-entropy, say) compares absolutely."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-2)).item()


def run_isolated(code: str):
    """Run `code` in a fresh Python process (a CUDA device-side assert ends the process's context)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent  # (the checkout, or the installed wheel's site folder)
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def assert_device_assert(code: str, message: str):
    """`code` (run in its own process: a device-side assert ends the CUDA context) fails with `message`."""
    r = run_isolated(code)
    assert r.returncode != 0 and (message in r.stderr or "device-side assert" in r.stderr), r.stderr[-2000:]


def assert_close(got, ref, tol: float, name: str = "", floor: float = 1e-2):
    """Norm-wise AND element-wise: ||got - ref|| / ||ref|| <= tol, and every |got - ref| <= tol * max|ref|
    (both scales floored at `floor`), so a fault confined to one row, column or element fails as well."""
    g, r = got.detach().double(), ref.detach().double()
    assert g.shape == r.shape, (name, tuple(g.shape), tuple(r.shape))
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    norm_err = ((g - r).norm() / r.norm().clamp_min(floor)).item()
    scale = max(r.abs().max().item() if r.numel() else 0.0, floor)
    elem_err = ((g - r).abs().max().item() if r.numel() else 0.0) / scale
    assert norm_err <= tol and elem_err <= tol, (
        f"{name}: norm-wise {norm_err:.3e}, element-wise {elem_err:.3e} "
        f"(worst at {tuple(int(i) for i in torch.nonzero((g - r).abs() == (g - r).abs().max())[0])}), tol {tol:.1e}"
    )


def kernel_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values rounded to a 16-bit dtype the way the kernels' casts do it here: CUDA rounds to nearest;
    Triton's interpreter (triton 3.9) truncates fp32 -> bf16 (fp16 it rounds)."""
    t = t.float()
    if dtype == torch.bfloat16 and not HAS_CUDA:
        return (t.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return t.to(dtype)


# ---- tiny HF models with PEFT LoRA ----
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's projections
SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    head_dim=16,
)


def tiny_config(model_type):
    extra = {
        "gemma": dict(hidden_act="gelu_pytorch_tanh"),
        "gemma2": dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=16,
            sliding_window=8,
            final_logit_softcapping=5.0,
            attn_logit_softcapping=10.0,
        ),
        "gemma3_text": dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=16,
            sliding_window=8,
            final_logit_softcapping=5.0,
        ),
        "granite": dict(
            logits_scaling=4.0, attention_multiplier=0.2, residual_multiplier=0.5, embedding_multiplier=2.0
        ),
        "qwen2": dict(use_sliding_window=False),
        "phi3": dict(pad_token_id=0, partial_rotary_factor=0.5),  # (Phi-4-mini rotates part of each head)
        "smollm3": dict(no_rope_layers=[1, 0], pad_token_id=0),  # the second layer without RoPE (NoPE)
        "ministral": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
        ),
        "qwen3_moe": dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[0], decoder_sparse_step=1
        ),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2),
        "gpt_oss": dict(
            num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        ),
    }.get(model_type, {})
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **SMALL, **extra)
    # gemma2: softcap needs eager; gpt_oss: its attention sinks have no sdpa path
    cfg._attn_implementation = "eager" if model_type in ("gemma2", "gpt_oss") else "sdpa"
    return cfg


def make_model(model_type="llama", lora=True, seed=0, dtype=torch.float32, **lora_kwargs):
    torch.manual_seed(seed)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).to(DEVICE, dtype)
    if not lora:
        return model
    return add_lora(model, target_modules=FUSED_TARGETS if model_type == "phi3" else TARGETS, **lora_kwargs)


def add_lora(model, **lora_kwargs):
    """PEFT LoRA (r 4, alpha 8) on `model`, its B matrices random (PEFT starts them at zero: make the adapters count)."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(**dict(dict(r=4, lora_alpha=8), **lora_kwargs)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def batch(seed=1, bsz=2, seq=16, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bsz, seq), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100  # an ignored prefix, as a chat template's prompt
    return ids, labels


# ---- a tiny decoder block with PEFT LoRA on its seven projections ----
class Attn(nn.Module):
    def __init__(self, hidden=64, q_out=64, kv_out=32, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(hidden, q_out, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=bias)


class MLP(nn.Module):
    def __init__(self, hidden=64, inter=176, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        a = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.act]
        return self.down_proj(a(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, bias=False, act="silu", hidden=64, inter=176, q_out=64, kv_out=32):
        super().__init__()
        self.self_attn = Attn(hidden, q_out, kv_out, bias=bias)
        self.mlp = MLP(hidden, inter, act=act)


def attn_peft(attn, x):
    """A small attention-shaped use of q, k, v and o through PEFT's own layers (q * [k, v] feeds o)."""
    return attn.o_proj(attn.q_proj(x) * torch.cat([attn.k_proj(x), attn.v_proj(x)], -1))


def attn_fused(attn, x):
    """attn_peft through fusedlora's LoRA_QKV and LoRA_O."""
    from fusedlora import lora

    q, k, v = lora.apply_lora_qkv(attn, x)
    return lora.apply_lora_o(attn, q * torch.cat([k, v], -1))


def make(r=4, dropout=0.0, bias=False, act="silu", use_dora=False, **sizes):
    """r: an int, or "mixed" for a different rank on each MLP projection (PEFT's rank_pattern); sizes: Block's
    hidden, inter, q_out, kv_out."""
    import peft

    torch.manual_seed(0)
    ranks = {"rank_pattern": {"gate_proj": 2, "up_proj": 4, "down_proj": 24}} if r == "mixed" else {}
    r = 4 if r == "mixed" else r
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=dropout,
        use_dora=use_dora,
        **ranks,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.inject_adapter_in_model(cfg, Block(bias=bias, act=act, **sizes)).to(DEVICE)
    with torch.no_grad():  # PEFT starts B at zero: make the adapter path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.endswith("bias"))
    return model


# ---- fake CUDA graphs ----
_capturing: list = []


def _kind(func) -> str:
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return "rerun"
    if any(r.alias_info is not None for r in schema.returns):
        return "view"
    return "copy"


class _Record(TorchDispatchMode):
    def __init__(self, tape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = _kind(func)
        if kind != "view":
            self.tape.append((kind, func, args, kwargs, out))
        return out


class FakeCUDAGraph:
    def __init__(self):
        self.tape: list = []
        self.replays = 0

    def replay(self):
        self.replays += 1
        with torch.no_grad():
            for kind, func, args, kwargs, out in self.tape:
                if kind == "kernel":
                    func(*args)
                elif kind == "rerun":
                    func(*args, **kwargs)
                else:
                    new = func(*args, **kwargs)
                    for o, n in zip(tree_leaves(out), tree_leaves(new)):
                        if isinstance(o, torch.Tensor):
                            o.copy_(n)


class _Stream:
    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _graph(graph, pool=None, stream=None, capture_error_mode=None):
    _capturing.append(graph)
    try:
        with _Record(graph.tape):
            yield
    finally:
        _capturing.pop()


@contextlib.contextmanager
def fake_cuda_graphs(monkeypatch=None):
    """torch.cuda's graph and stream API replaced by the fakes above, CPU tensors graphable by
    fusedlora.cuda_graphs, and the loader's CPU launches recorded while a capture runs; all restored on exit.
    (`monkeypatch`: pytest's, or None for a plain patcher.)"""
    import peft  # noqa: F401 - imported before torch.cuda is replaced (transformers reads it at import)
    import transformers  # noqa: F401

    from fusedlora import cuda_graphs, loader

    original_cpu = loader.KernelLauncher._cpu

    def recorded_cpu(self, grid, args, constexprs):
        with _disable_current_modes():  # (the interpreter's own tensor copies are not the kernel's work)
            result = original_cpu(self, grid, args, constexprs)
        if _capturing:
            _capturing[-1].tape.append(("kernel", original_cpu, (self, grid, args, constexprs), None, None))
        return result

    patches = [
        (torch.cuda, "CUDAGraph", FakeCUDAGraph),
        (torch.cuda, "graph", _graph),
        (torch.cuda, "Stream", lambda *a, **k: _Stream()),
        (torch.cuda, "stream", lambda s: contextlib.nullcontext()),
        (torch.cuda, "current_stream", lambda *a, **k: _Stream()),
        (torch.cuda, "graph_pool_handle", lambda: None),
        (torch.cuda, "is_current_stream_capturing", lambda: bool(_capturing)),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (cuda_graphs, "_graphable", lambda t: True),
        (loader.KernelLauncher, "_cpu", recorded_cpu),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ------------------------------------------------------------------------------- GPTQ test stand-ins
def pack_int_words(values, bits, dim):
    """Pack non-negative ints (< 2**bits) into int32 words along `dim`, low bits first (GPTQ's layout)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, *([1] * (v.dim() - 2)))
    words = (v << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def random_gptq_tensors(in_f, out_f, bits, group, act_order, scale_dtype=torch.float16):
    """Random GPTQ qweight / qzeros / scales (/ act-order g_idx) of an in_f x out_f layer on DEVICE."""
    per = 32 // bits
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // per, out_f), dtype=torch.int64).to(torch.int32)
    n_groups = 1 if group == -1 else math.ceil(in_f / group)
    qz = torch.randint(-(2**31), 2**31 - 1, (n_groups, math.ceil(out_f / per)), dtype=torch.int64).to(torch.int32)
    sc = (torch.rand(n_groups, out_f) * 0.01 + 1e-3).to(scale_dtype)
    g = (torch.randperm(in_f) // (in_f if group == -1 else group)).to(torch.int32) if act_order else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(qw), to(qz), to(sc), to(g)


def nf4_state_stub(n=128, nested=False, **kw):
    """A bitsandbytes-like NF4 quant state (plain namespaces, no bitsandbytes needed) of an n-element weight and
    its packed bytes (all zero), for the state checks; `kw` overrides its fields."""
    from types import SimpleNamespace

    qs = SimpleNamespace(
        quant_type="nf4",
        blocksize=64,
        dtype=torch.float16,
        shape=torch.Size((2, n // 2)),
        absmax=torch.rand(-(-n // 64), device=DEVICE),
        code=torch.linspace(-1, 1, 16, device=DEVICE),
        nested=nested,
        state2=None,
        offset=0.0,
    )
    if nested:
        qs.absmax = torch.randint(0, 256, (-(-n // 64),), dtype=torch.uint8, device=DEVICE)
        qs.state2 = SimpleNamespace(
            absmax=torch.rand(1, device=DEVICE), code=torch.linspace(-1, 1, 256, device=DEVICE), blocksize=256
        )
    for k, v in kw.items():
        setattr(qs, k, v)
    return torch.zeros(n // 2, 1, dtype=torch.uint8, device=DEVICE), qs


class TorchQuantLinear(nn.Module):
    """Stand-in for gptqmodel's TorchQuantLinear (QUANT_TYPE "torch"; gptqmodel is not installed here): its
    buffers in the GPTQ layout (zeros in the v2 format, as gptqmodel keeps them in memory; act-order g_idx
    or the trivial one), its forward the plain-torch dequantisation. PEFT wraps it in its GPTQLoraLinear."""

    QUANT_TYPE = "torch"

    def __init__(self, in_f, out_f, bits=4, group_size=32, act_order=False):
        super().__init__()
        per, groups = 32 // bits, -(-in_f // group_size)
        self.in_features, self.out_features, self.bits, self.group_size, self.desc_act = (
            in_f,
            out_f,
            bits,
            group_size,
            act_order,
        )
        rnd = lambda *shape: torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64).to(torch.int32)  # noqa: E731
        self.register_buffer("qweight", rnd(in_f // per, out_f))
        self.register_buffer("qzeros", rnd(groups, out_f // per))
        self.register_buffer("scales", ((torch.rand(groups, out_f) * 0.02 + 0.005) * 16 / 2**bits).half())
        g_idx = torch.arange(in_f) // group_size
        self.register_buffer("g_idx", (g_idx[torch.randperm(in_f)] if act_order else g_idx).to(torch.int32))
        self.bias = None

    def qzero_format(self):
        return 2

    def forward(self, x):
        from .quant import naive_dequantize_gptq

        W = naive_dequantize_gptq(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.group_size,
            format="gptq_v2",
            out_dtype=torch.float32,
        )
        return x @ W.to(x.dtype).t()


def gptq_lora_block(r=8, bits=4, act_order=False):
    """Block whose seven projections are PEFT GPTQLoraLinear layers over TorchQuantLinear bases."""
    import peft
    from peft.tuners.lora.gptq import GPTQLoraLinear

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"])
    block = Block()
    for parent in (block.self_attn, block.mlp):
        for name, lin in list(parent.named_children()):
            if isinstance(lin, nn.Linear):
                q = TorchQuantLinear(lin.in_features, lin.out_features, bits=bits, act_order=act_order)
                layer = GPTQLoraLinear(q, "default", config=cfg, r=r, lora_alpha=2 * r)
                with torch.no_grad():
                    layer.lora_B["default"].weight.normal_(0, 0.1)  # PEFT starts B at zero
                setattr(parent, name, layer)
    block = block.to(DEVICE)
    for n, p in block.named_parameters():
        p.requires_grad_("lora_" in n)
    return block


# the losses' gradients: fp32 within fp32 sums. bf16 gradients are made in the forward and rounded again by the
# backward's d loss scale: two roundings of 2^-8 (a full ulp each where the interpreter truncates); fp16's once,
# to 2^-11
LOSS_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-3}


def labels_every_third_ignored(rows, n_cols, ignore_index=-100):
    y = torch.randint(0, n_cols, (rows,), device=DEVICE)
    y[1::3] = ignore_index
    return y


def z_loss_reference(x64, y, reduction, lse_square_scale, label_smoothing=0.0, weight=None, items=None):
    """(loss, z_loss) by hand in fp64: cross-entropy + lse_square_scale * logsumexp^2 per used row, both
    weighted by weight[label] and reduced as torch's (weighted) mean / sum / none."""
    used = y != -100
    w_rows = used.double() if weight is None else torch.where(used, weight.double()[y.clamp(min=0)], 0.0)
    ce = F.cross_entropy(x64, y, reduction="none", label_smoothing=label_smoothing)  # 0 for ignored rows
    z_rows = lse_square_scale * torch.logsumexp(x64, -1) ** 2
    loss_rows, z_rows = w_rows * (ce + z_rows), w_rows * z_rows
    if reduction == "none":
        return loss_rows, z_rows
    divisor = 1.0 if reduction == "sum" else items if items is not None else w_rows.sum()
    return loss_rows.sum() / divisor, z_rows.sum() / divisor


# ------------------------------------------------------------------------------- property tests (hypothesis)
FUZZ_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: sums of up to a few thousand terms; 16-bit: one or two roundings of the output (2^-8 / 2^-11 each)
FUZZ_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def fuzz_settings():
    """The hypothesis settings of every op's property test. Example counts are bounded so CI stays within minutes
    under the interpreter: FUSEDLORA_FUZZ_EXAMPLES (default 15 per test on CPU, 60 on a GPU). CI runs a fixed
    (derandomised) sequence; FUSEDLORA_FUZZ_RANDOM=1 draws fresh ones. (hypothesis is a test requirement, not
    the package's: imported here, when a test module asks.)"""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("FUSEDLORA_FUZZ_EXAMPLES", 60 if HAS_CUDA else 15)),
        deadline=None,
        derandomize=os.environ.get("FUSEDLORA_FUZZ_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
        database=None,
    )


def fuzz_tol(*dtypes):
    return max(FUZZ_TOL[d] for d in dtypes)


def laid_out(t, layout, dim=-1):
    """The same values as `t` in another memory layout: a column slice of a wider buffer, or contiguous."""
    if layout == "slice":
        pad = list(t.shape)
        pad[dim] += 3
        wide = torch.zeros(pad, dtype=t.dtype, device=t.device)
        view = wide.narrow(dim % t.dim(), 1, t.shape[dim])
        view.copy_(t)
        return view
    return t.clone()


def draw_labels(data, rows, vocab, ignore_index):
    """Random class labels with a drawn pattern of ignored rows (none, some, all but one, all)."""
    from hypothesis import strategies as st

    y = torch.randint(0, vocab, (rows,), device=DEVICE)
    pattern = data.draw(st.sampled_from(["none", "some", "all_but_one", "all"]))
    if pattern == "some":
        y[::3] = ignore_index
    elif pattern == "all_but_one":
        y[1:] = ignore_index
    elif pattern == "all":
        y[:] = ignore_index
    return y, pattern


# ------------------------------------------------------------------------------- torch.compile
# On CPU: backend "aot_eager" (AOTAutograd's forward/backward split, eager kernels: the interpreter), which runs
# eager's very kernels, so compiled results equal eager's exactly; on a GPU: inductor, within COMPILE_TOL.
COMPILE_BACKEND = "inductor" if HAS_CUDA else "aot_eager"
COMPILE_TOL = 1e-5 if HAS_CUDA else 0.0


def reset_dynamo():
    """A compile test's fixture body (pytest.fixture(reset_dynamo) in the test module): Dynamo's caches empty
    before and after, so no test sees another's graphs or recompile counts."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn_leaf(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


def seeded_labels(n, v):
    """n labels below v, the same for the same n, the first one ignored (-100)."""
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[0] = -100
    return y


def is_compiling_only_in_dynamo(monkeypatch):
    """torch 2.11 (the GPU machine's) sets is_compiling() only while Dynamo traces, not while AOTAutograd traces
    the backward (2.13 holds it for the compile session): emulate 2.11 here."""
    import contextlib

    if hasattr(torch.compiler, "_compile_session_context"):
        monkeypatch.setattr(torch.compiler, "_compile_session_context", contextlib.nullcontext)


def assert_compiled_matches_eager(fn, inputs, tol=0.0, dynamic=None, seed=None):
    """fn under torch.compile(fullgraph=True): no graph break (fullgraph raises at one, naming its reason), and
    outputs and gradients equal eager's (exactly on CPU, where both run the same kernels; within `tol` under
    inductor). seed: the RNG seed set before each run (dropout)."""

    def run(f):
        if seed is not None:
            torch.manual_seed(seed)
        y = f(*inputs)
        return y if isinstance(y, tuple) else (y,)

    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref = run(fn)
    seeds = [torch.randn_like(o) for o in ref]
    ref_grads = torch.autograd.grad(ref, leaves, seeds, allow_unused=True) if leaves else ()
    # Inductor draws random numbers its own way: eager's generator (fallback_random) gives the same masks
    with torch._inductor.config.patch(fallback_random=seed is not None):
        got = run(torch.compile(fn, backend=COMPILE_BACKEND, fullgraph=True, dynamic=dynamic))
    got_grads = torch.autograd.grad(got, leaves, seeds, allow_unused=True) if leaves else ()
    for a, b in zip(got + got_grads, ref + ref_grads):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) if tol == 0.0 else rel_err(a, b) <= tol, rel_err(a, b)


def assert_compiled_second_backward(fn, inputs):
    """retain_graph through a compiled loss: each backward right, none overwriting a gradient handed out.
    (Inductor's donated buffers, torch's default, refuse any retain_graph through a compiled backward with
    torch's own error naming the switch: off here, so that what runs twice is our ops' backward.)"""
    import torch._functorch.config as functorch_config  # (imported by name: torch imports it lazily)

    leaves = [t for t in inputs if t.is_floating_point()]
    with functorch_config.patch(donated_buffer=False):  # (held over the backwards too: inductor may compile late)
        loss = torch.compile(fn, backend=COMPILE_BACKEND, fullgraph=True)(*inputs)
        ref = fn(*inputs)
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        kept = [g.clone() for g in first]
        second = torch.autograd.grad(3.0 * loss, leaves)
    for g, k, g2, r in zip(first, kept, second, torch.autograd.grad(3.0 * ref, leaves)):
        assert torch.equal(g, k)
        assert rel_err(g2, r) <= max(COMPILE_TOL, 1e-3 if g.dtype == torch.float16 else 0.0)


def op_compile_tests(cases: dict, dynamo_only_case: str, tols: dict | None = None):
    """The two compile tests each op's test file runs over its COMPILE_CASES ({name: () -> (fn, inputs)}), to
    assign at module level under their own names: every case compiles whole and matches eager (within tols[name]
    or COMPILE_TOL), and `dynamo_only_case` also where is_compiling() holds only while Dynamo traces."""
    import pytest

    tols = tols or {}

    @pytest.mark.usefixtures("fresh_dynamo")
    @pytest.mark.parametrize("case", sorted(cases))
    def test_public_op_compiles_whole_and_matches_eager(case):
        assert_compiled_matches_eager(*cases[case](), tols.get(case, COMPILE_TOL))

    @pytest.mark.usefixtures("fresh_dynamo")
    @pytest.mark.parametrize("case", [dynamo_only_case])
    def test_ops_compile_where_is_compiling_holds_only_in_dynamo(case, monkeypatch):
        is_compiling_only_in_dynamo(monkeypatch)  # (torch 2.11's is_compiling: the launchers still custom ops)
        assert_compiled_matches_eager(*cases[case](), COMPILE_TOL)

    return test_public_op_compiles_whole_and_matches_eager, test_ops_compile_where_is_compiling_holds_only_in_dynamo


# ------------------------------------------------------------------------------- command lines
def run_module(*args):
    """`python -m <args>` from the checkout, with TRITON_INTERPRET unset (as a user's shell has it)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
