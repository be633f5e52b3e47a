"""CUDA-graph replay of whole decoder layers (forward and backward) in eager training.

A patched step is host-bound: its kernels take ~85 ms on an H200 (1B shape, 4 x 2048) while Python and torch's
dispatch take ~120 ms to issue them. Replaying each layer's forward and backward as two CUDA graphs issues a
layer in a handful of launches. `GraphedModule` wraps one module's forward:

- A call is graphable when it trains (grad mode on, module in training mode, not under torch.compile or
  another capture), its arguments are CUDA tensors, None, plain scalars
  or tuples of these, and no earlier replay of the same graph still waits for its backward.
- Calls are keyed by their arguments' shapes, dtypes, strides and requires_grad flags, the plain arguments'
  values and the autocast state. A key seen `warmup` times (those calls run eagerly and initialise what capture
  must not) is captured on its next call, up to `max_shapes` keys per module: each captured key keeps its own
  activation buffers, so a run of ever-changing shapes stays eager.
- Capture records the forward and the backward (torch.autograd.grad of the outputs with respect to the
  tensor inputs and trainable parameters) into a `LayerGraph`, whose graphs share one memory pool with the
  other layers.
  Everything a graph leaves for later (inputs, outputs, saved activations, parameter gradients) stays
  referenced; its temporaries go back to the pool, where a later capture (a later layer) may place its own
  blocks. That is safe because layers replay forward in order and backward in reverse order: an earlier
  layer's graphs run again only after the later layer's backward.
- The incoming gradient and the input gradient pass through buffers the model's layers share (copied in
  before, out after a replay), and a layer whose input is the previous layer's graph output reads that
  output in place (it runs eagerly when its input comes from elsewhere), so a layer's graphs add little
  to eager memory beyond the pool's own layout. The model's first capture runs a warm-up off the capture (lazy
  initialisations); later ones are sized from their key's eager calls.
- Replay copies the call's tensors into the graph's inputs; the backward returns fresh (cloned) gradients,
  so gradient accumulation and hooks see ordinary tensors. Parameters are checked by address at each call:
  a moved or replaced parameter (model.to, FSDP) drops the module's graphs and the call runs eagerly.
- Any failure while capturing (a host sync in the layer, an unsupported op) leaves that key eager for good,
  with a warning saying why.

Gradient checkpointing (HF's, or fusedlora's offloaded one): a checkpointed layer is captured as a
`CheckpointGraph`, a forward graph that saves nothing and a backward graph that recomputes the forward and
backpropagates. Its inputs and outputs
go through buffers the whole model shares (`_SharedPool.exchange`), the output is cloned out of its buffer, and
every temporary stays in the pool, so all layers share one layer's working set: the memory of checkpointing at
the speed of a replay. The layer's input is kept for the backward as the checkpointing function would keep it:
on the GPU (HF's checkpointing) or in pinned host memory (`offloaded_checkpoint`, prefetched one layer ahead).
HF calls the layer's `_gradient_checkpointing_func`; the wrapper installs `_GraphedCheckpoint` there (around
the function HF or fusedlora set) when it wraps a checkpointed layer, and again at a checkpointed call after
`gradient_checkpointing_enable` replaced it.

Both kinds are captured through `_Capture` (the forward on static inputs with parameter aliases, its backward
into the shared gradient buffers, the recording into the pool) and selected by a `GraphKey`; `_GraphCache`
decides when a key is captured.

Random numbers (dropout) are drawn in the graph from torch's CUDA generator, advanced at each replay, so masks
differ per step as in eager (not the same masks as an eager run). A checkpointed layer's recompute replays
under the generator state of its forward, so it draws the forward's masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
import weakref
from typing import NamedTuple

import torch

from .checkpoint import offloaded_checkpoint, replayed_rng, rng_state
from .peft_layers import adapter_state, lora_layers


def _flatten(obj, tensors: list):
    """The tensors of a nested (tuple/list/dict) argument in order, and a hashable description of the rest;
    raises TypeError for anything a graph cannot take."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("T", tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device, obj.requires_grad)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        return ("V", type(obj), obj)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_flatten(o, tensors) for o in obj))
    if isinstance(obj, dict):
        return ("D", type(obj), tuple((k, _flatten(v, tensors)) for k, v in sorted(obj.items())))
    raise TypeError(f"an argument of type {type(obj).__name__}")


def _rebuild(desc, tensors):
    """The argument `_flatten` described, with its tensors taken in order from the iterator `tensors`."""
    if desc[0] == "T":
        return next(tensors)
    if desc[0] == "V":
        return desc[2]
    if desc[0] == "D":
        return desc[1](**{k: _rebuild(v, tensors) for k, v in desc[2]})
    return desc[0](_rebuild(d, tensors) for d in desc[1])


def _addresses(module, params=None) -> tuple:
    """Where a module's parameters (`params`: module.parameters() already listed) and buffers live: a graph
    reads them at these addresses."""
    params = module.parameters() if params is None else params
    return tuple(p.data_ptr() for p in params) + tuple(b.data_ptr() for b in module.buffers())


def _graphable(t: torch.Tensor) -> bool:
    """A tensor a CUDA graph can read (the CPU tests' fake graphs replace this)."""
    return t.is_cuda


def _sharded(module) -> bool:
    """FSDP2 keeps a module's parameters as DTensors between its calls: their memory is re-allocated."""
    p = next(module.parameters(), None)
    return p is not None and type(p).__name__ == "DTensor"


def _output_tensors(out):
    tensors: list = []
    return tensors, _flatten(out, tensors)


def _differentiable(outputs) -> list:
    """Indices of the outputs (tensors or layouts) that carry a gradient; without one there is no backward."""
    found = [i for i, o in enumerate(outputs) if o.requires_grad]
    if not found:
        raise RuntimeError("nothing in the layer's output needs a gradient")
    return found


def _check_outputs(got, expected):
    if [o.shape for o in got] != [o.shape for o in expected]:
        raise RuntimeError("the layer's outputs changed between two identical calls")


class GraphKey(NamedTuple):
    """What a graph bakes in of a call, so what selects it (a tuple: hashed and compared in C at every layer call)."""

    args: tuple  # the arguments' description (`_flatten`): shapes, strides, dtypes, requires_grad, plain values
    autocast: tuple  # (enabled, dtype) on the arguments' device type
    params: tuple  # ids of the layer's trainable parameters
    adapters: tuple  # the PEFT adapter state (GraphedModule.adapter_state)
    kind: type  # LayerGraph, or CheckpointGraph for a call through the layer's checkpointing function


class _Call(NamedTuple):
    """A call graphs may serve: its key, its tensor arguments in order, the layer's trainable parameters."""

    key: GraphKey
    tensors: list
    params: list


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A tensor's shape, strides, dtype and device: what a shared buffer is made from."""

    shape: tuple
    strides: tuple
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    def stride(self):
        return self.strides

    @staticmethod
    def of(t, requires_grad: bool | None = None) -> _Layout:
        """The layout of a tensor (or of a _Layout)."""
        return _Layout(
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            t.device,
            t.requires_grad if requires_grad is None else requires_grad,
        )


@torch.no_grad()
def _copy_in(statics, tensors):
    for static, t in zip(statics, tensors):
        if static.data_ptr() != t.data_ptr():
            static.copy_(t)


@dataclasses.dataclass(eq=False)
class _CapturedGraphs:
    """One captured key, either kind: the forward and backward graphs and the static tensors they read and write."""

    inputs: list  # what the forward reads the call's tensor arguments from
    params: list  # trainable parameters the backward differentiates
    outputs: list  # the forward's output tensors (static)
    out_desc: tuple  # the output's structure (`_flatten`)
    grad_outputs: list  # static incoming gradients of the differentiable outputs
    grad_inputs: list  # static gradients of (inputs requiring grad, params), None where unused
    diff_outputs: list  # indices of outputs that carry a gradient
    wants_grad: list  # indices of inputs requiring grad
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    module_ref: object  # weakref to the module, and the addresses of its parameters and buffers at
    ptrs: tuple  # capture (checked again before each backward replay)

    def non_differentiable(self, outs) -> list:
        return [o for i, o in enumerate(outs) if i not in self.diff_outputs]

    def check_weights(self):
        module = self.module_ref() if self.module_ref is not None else None
        if module is not None and _addresses(module) != self.ptrs:
            raise RuntimeError(
                "fusedlora.cuda_graph_layers: a layer's weights moved between its forward and its "
                "backward (FSDP re-gathering them, say): its backward graph would read the old "
                "memory. CUDA-graph layers do not work with sharded or re-allocated weights; "
                "fusedlora.unpatch(model) and patch it without cuda_graphs"
            )

    def replay_backward(self, grads, rng=None) -> list:
        """Incoming gradients into the backward graph, a replay (under `rng`, (device, a forward's generator
        states), when given), fresh copies of the gradients out: the (per tensor input, per parameter)
        gradients autograd expects."""
        for i, static in zip(self.diff_outputs, self.grad_outputs):
            g = grads[i]
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        with contextlib.nullcontext() if rng is None else replayed_rng(rng[1], rng[0], {}):
            self.bwd.replay()
        fresh = _fresh_copies(self.grad_inputs)
        n_in = len(self.wants_grad)
        per_input = [None] * len(self.inputs)
        for slot, g in zip(self.wants_grad, fresh[:n_in]):
            per_input[slot] = g
        return per_input + fresh[n_in:]


@dataclasses.dataclass(eq=False)
class LayerGraph(_CapturedGraphs):
    """Graphs of a plain training call: the forward's saved activations stay in the graph's memory until its
    backward replays, so one replay at a time may wait for its backward (`_Replay`)."""

    aliased: tuple = ()  # inputs that are another graph's static output (the previous layer's): read
    #                              in place, never copied into
    generation: int = 0  # forward replays so far: a backward checks that its forward is the latest
    pending: object = None  # weakref to the ctx of the replay that waits for its backward

    @classmethod
    def capture(cls, wrapper: GraphedModule, call: _Call, forward) -> LayerGraph:
        # static inputs of its own (its saved activations may be these very tensors), or, for an input that is
        # another graph's static output (the previous layer's graph fed this call), that output itself: one
        # copy and one buffer less per layer
        produced = [wrapper.shared.static_output(t) for t in call.tensors]
        static_in = [
            (t.detach().clone() if o is None else o.detach()).requires_grad_(t.requires_grad)
            for t, o in zip(call.tensors, produced)
        ]
        cap = _Capture(wrapper, call, forward, static_in)
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with cap.recording(fwd):
            out, aliases = cap.run()
        # the outputs keep the forward's autograd graph, so its saved activations, alive: they are the graph's
        # until its backward replays
        outputs, out_desc = _output_tensors(out)
        _check_outputs(outputs, cap.out_like)
        with cap.recording(bwd):
            grad_inputs = cap.backward(out, aliases, retain=True)
        wrapper.shared.register_outputs(outputs)
        return cls(
            **cap.fields(fwd, bwd, outputs, out_desc, grad_inputs),
            aliased=tuple(i for i, o in enumerate(produced) if o is not None),
        )

    def awaiting_backward(self) -> bool:
        return self.pending is not None and self.pending() is not None

    def input_moved(self, tensors) -> bool:
        """Whether an input this graph reads in place (the previous layer's graph output) no longer feeds the call
        (that layer runs eagerly now, or was captured again)."""
        return any(tensors[i].data_ptr() != self.inputs[i].data_ptr() for i in self.aliased)


@dataclasses.dataclass(eq=False)
class CheckpointGraph(_CapturedGraphs):
    """Graphs of a checkpointed call: the forward saves nothing and leaves its outputs in the model's shared
    buffers; the backward recomputes the forward and backpropagates. Any number of replays may wait for their
    backwards (`_CheckpointReplay` keeps each one's inputs)."""

    @classmethod
    def capture(cls, wrapper: GraphedModule, call: _Call, forward) -> CheckpointGraph:
        shared = wrapper.shared
        # inputs and outputs in buffers all layers share: the graphs read them only while they replay
        static_in = [shared.exchange(("in", i), t) for i, t in enumerate(call.tensors)]
        cap = _Capture(wrapper, call, forward, static_in, warm_up_without_grad=True)
        outputs = [shared.exchange(("out", i), o) for i, o in enumerate(cap.out_like)]
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # forward: nothing saved, the outputs copied into the shared buffers, every temporary freed after the
        # capture; backward: the forward again with autograd, then its backward
        with torch.no_grad(), cap.recording(fwd):
            out, _ = cap.run()
            produced, out_desc = _output_tensors(out)
            _check_outputs(produced, outputs)
            for o, buffer in zip(produced, outputs):
                buffer.copy_(o)
        del out, produced
        with cap.recording(bwd):
            out, aliases = cap.run()
            grad_inputs = cap.backward(out, aliases, retain=False)
        del out, aliases
        return cls(**cap.fields(fwd, bwd, outputs, out_desc, grad_inputs))


class _Capture:
    """What capturing either kind of graph takes, made before its recordings: the layer's trainable parameters by
    slot, the outputs' layouts (from this key's eager calls, or a warm-up run) and the model's shared gradient
    buffers sized from them. Then `run` (the forward on the static inputs), `backward` (into those buffers) and
    `recording` (a CUDA graph into the model's pool)."""

    def __init__(self, wrapper: GraphedModule, call: _Call, forward, static_in: list, warm_up_without_grad=False):
        self.shared, self.call, self.forward, self.static_in = wrapper.shared, call, forward, static_in
        self.module_ref = wrapper.module_ref
        self.wants_grad = [i for i, t in enumerate(static_in) if t.requires_grad]
        self.slots = [
            (m, n)
            for m in wrapper.module_ref().modules()
            for n, p in m._parameters.items()
            if p is not None and p.requires_grad
        ]
        if len(self.slots) != len(call.params) or any(
            m._parameters[n] is not p for (m, n), p in zip(self.slots, call.params)
        ):
            raise RuntimeError("the layer's trainable parameters are not its own (shared or tied elsewhere)")
        layouts = wrapper.cache.out_layouts.get(call.key)
        if self.shared.warmed and layouts is not None:
            # an earlier capture in this pool ran the warm-up (lazy initialisations off the capture), and this
            # key's eager calls loaded its kernels: the buffers are sized from their outputs (a warm-up here
            # would hold a layer's activations beside the pool's)
            self.out_like = [_Layout.of(o, requires_grad=False) for o in layouts]
            self.diff_outputs = _differentiable(layouts)
        else:
            self.out_like, self.diff_outputs = self._warm_up(warm_up_without_grad)
        # the buffers every layer shares, made outside the captures
        self.grad_in = {i: self.shared.exchange(("grad_in", i), static_in[i].detach()) for i in self.wants_grad}
        self.grad_outputs = [self.shared.exchange(("grad_out", i), self.out_like[i]) for i in self.diff_outputs]

    def run(self):
        """The forward on the static inputs, each input needing a gradient and each trainable parameter read
        through an alias (a view made now, on the stream that runs it); returns (output, aliases).
        Differentiating with respect to the aliases keeps the backward off the leaves' gradient accumulators,
        which an autograd graph still alive from an earlier step (the last loss, say) ties to the default
        stream: reaching them from the capture stream joins the two streams and invalidates the capture (seen
        on an H200, torch 2.11)."""
        inputs = [t.view_as(t) if t.requires_grad else t for t in self.static_in]
        args, kwargs = _rebuild(self.call.key.args, iter(inputs))
        saved = [m._parameters[n] for m, n in self.slots]
        aliases = [inputs[i] for i in self.wants_grad] + [p.view_as(p) for p in saved]
        for (m, n), alias in zip(self.slots, aliases[len(self.wants_grad) :]):
            m._parameters[n] = alias
        try:
            return self.forward(*args, **kwargs), aliases
        finally:
            for (m, n), p in zip(self.slots, saved):
                m._parameters[n] = p

    def backward(self, out, aliases, retain: bool) -> list:
        """The backward of `out` into the shared input-gradient buffers; returns the graph's grad_inputs (per
        input requiring grad its shared buffer, None where unused; then the parameters' gradients)."""
        outs, _ = _output_tensors(out)
        grads = torch.autograd.grad(
            [outs[i] for i in self.diff_outputs], aliases, self.grad_outputs, retain_graph=retain, allow_unused=True
        )
        shared_in = []
        for i, g in zip(self.wants_grad, grads):
            if g is not None:
                self.grad_in[i].copy_(g)
            shared_in.append(None if g is None else self.grad_in[i])
        return shared_in + list(grads[len(self.wants_grad) :])

    @contextlib.contextmanager
    def recording(self, graph):
        """Capture into `graph`, in the model's pool. A failure inside leaves the pool marked as capturing: the
        caller then marks it broken (the allocator may still be recording into it)."""
        self.shared.capturing = True
        with torch.cuda.graph(graph, pool=self.shared.pool, capture_error_mode="thread_local"):
            yield
        self.shared.capturing = False

    def fields(self, fwd, bwd, outputs, out_desc, grad_inputs) -> dict:
        """The fields both kinds of graph record, once both graphs are captured."""
        module = self.module_ref()
        return {
            "inputs": self.static_in,
            "params": self.call.params,
            "outputs": outputs,
            "out_desc": out_desc,
            "grad_outputs": self.grad_outputs,
            "grad_inputs": grad_inputs,
            "diff_outputs": self.diff_outputs,
            "wants_grad": self.wants_grad,
            "fwd": fwd,
            "bwd": bwd,
            "module_ref": self.module_ref,
            "ptrs": _addresses(module),
        }

    def _warm_up(self, without_grad_first: bool):
        """The layer's call and backward on a side stream, off the capture (cuBLAS workspaces and other lazy
        initialisations happen here; first a no-grad call, as a checkpoint graph's forward runs); returns the
        outputs' layouts and which outputs carry a gradient."""
        self.shared.warm_ups += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if without_grad_first:
                with torch.no_grad():
                    self.run()
            out, aliases = self.run()
            outs, _ = _output_tensors(out)
            diff_outputs = _differentiable(outs)
            torch.autograd.grad(
                [outs[i] for i in diff_outputs],
                aliases,
                [torch.ones_like(outs[i]) for i in diff_outputs],
                allow_unused=True,
            )
            out_like = [_Layout.of(o, requires_grad=False) for o in outs]
            del out, outs, aliases
        torch.cuda.current_stream().wait_stream(side)
        return out_like, diff_outputs


def _fresh_copies(tensors):
    """New copies of the graph's gradient buffers (autograd keeps what a backward returns; the next replay
    overwrites the buffers): one foreach op per dtype (x * 1.0 = x bit for bit, strides kept; a list of one
    dtype takes the foreach kernels' fast route, a launch or two) instead of a clone and a copy kernel per
    parameter (~15 per decoder layer: the fp32 adapters' gradients and the 16-bit input gradient)."""
    out = [None] * len(tensors)
    groups: dict = {}
    for i, g in enumerate(tensors):
        if g is not None:
            groups.setdefault((g.device, g.dtype), []).append(i)
    for slots in groups.values():
        for i, copy in zip(slots, torch._foreach_mul([tensors[i] for i in slots], 1.0)):
            out[i] = copy
    return out


class _Replay(torch.autograd.Function):
    """A layer call replayed from its LayerGraph (`tensors`: the call's tensor arguments, then the trainable
    parameters): the forward's activations stay in the graph's memory until this backward."""

    @staticmethod
    def forward(ctx, graph: LayerGraph, *tensors):
        _copy_in(graph.inputs, tensors[: len(graph.inputs)])
        graph.fwd.replay()
        graph.generation += 1
        ctx.graph, ctx.generation = graph, graph.generation
        graph.pending = weakref.ref(ctx)
        outs = tuple(o.detach() for o in graph.outputs)
        ctx.mark_non_differentiable(*graph.non_differentiable(outs))
        return outs

    @staticmethod
    def backward(ctx, *grads):
        graph = ctx.graph
        if ctx.generation != graph.generation:
            raise RuntimeError(
                "fusedlora.cuda_graph_layers: a layer's graph was replayed again before this backward "
                "(backward through an older forward, e.g. retain_graph=True across steps); "
                "its saved activations are gone"
            )
        graph.check_weights()
        out = graph.replay_backward(grads)
        graph.pending = None
        return (None, *out)


class _CheckpointReplay(torch.autograd.Function):
    """A checkpointed layer call replayed from its CheckpointGraph (`tensors`: the call's tensor arguments, then
    the trainable parameters): the forward graph keeps nothing, its outputs are cloned out of the shared
    buffers; the call's inputs are kept (the first one offloaded to the host when an Offloader is given) and
    copied back into the graph's inputs for the recompute-and-backward replay. Any number of forwards may wait
    for their backwards."""

    @staticmethod
    def forward(ctx, graph: CheckpointGraph, offloader, *tensors):
        inputs = tensors[: len(graph.inputs)]
        ctx.rng = (inputs[0].device, rng_state(inputs[0].device))  # (the recompute draws the same masks)
        _copy_in(graph.inputs, inputs)
        graph.fwd.replay()
        outs = tuple(o.clone() for o in graph.outputs)
        ctx.graph, ctx.offloader = graph, offloader
        if offloader is not None:
            ctx.offloaded = offloader.save(inputs[0])
            ctx.save_for_backward(*inputs[1:])
        else:
            ctx.offloaded = None
            ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(*graph.non_differentiable(outs))
        return outs

    @staticmethod
    def backward(ctx, *grads):
        graph = ctx.graph
        graph.check_weights()
        inputs = list(ctx.saved_tensors)
        if ctx.offloaded is not None:
            before = ctx.offloader.previous(ctx.offloaded)
            inputs.insert(0, ctx.offloaded.load())
            if before is not None:
                before.prefetch()  # the next backward's input comes back while this layer replays
        _copy_in(graph.inputs, inputs)
        out = graph.replay_backward(grads, ctx.rng)
        return (None, None, *out)


class _GraphCache:
    """A wrapper's graphs by key, and what decides when a key is captured: after `warmup` eager calls, at most
    `max_shapes` keys (each keeps its own activation memory), never again once its capture failed. Also the
    output layouts of eager calls (a capture sized from them needs no warm-up run) and the parameter addresses
    the graphs read."""

    BOUND = 4096  # keys that never recur (packed batches' lengths): the eager calls' bookkeeping stays bounded

    def __init__(self, warmup: int, max_shapes: int):
        self.warmup, self.max_shapes = warmup, max_shapes
        self.graphs: dict = {}  # GraphKey -> LayerGraph or CheckpointGraph
        self.failed: dict = {}  # GraphKey -> why its capture failed
        self.seen: dict = {}  # GraphKey -> eager calls so far
        self.out_layouts: dict = {}  # GraphKey -> the output layouts of its eager calls
        self.addresses = None  # of the layer's parameters and buffers, as the graphs read them

    def due(self, key: GraphKey) -> bool:
        """Whether a key without graphs is captured now; if not, its eager call is counted."""
        if key in self.failed or len(self.graphs) >= self.max_shapes or self.seen.get(key, 0) < self.warmup:
            if len(self.seen) >= self.BOUND:
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            return False
        return True

    def note_layouts(self, key: GraphKey, out):
        """Keep the output layout of an eager call a graph may later capture: the capture then needs no warm-up
        run of its own to size the shared buffers (see _Capture)."""
        if key in self.graphs or len(self.graphs) >= self.max_shapes:
            return
        try:
            tensors, _ = _output_tensors(out)
        except TypeError:
            return
        if len(self.out_layouts) >= self.BOUND:
            self.out_layouts.clear()
        self.out_layouts[key] = [_Layout.of(t) for t in tensors]

    def reset(self, addresses: tuple):
        """The parameters moved: every graph and count goes (failed keys stay eager)."""
        self.graphs.clear()
        self.seen.clear()
        self.out_layouts.clear()
        self.addresses = addresses


class GraphedModule:
    """The instance-level forward that replays `module`'s calls as CUDA graphs where it can (module docs);
    `original` is the forward it replaces and calls for everything else."""

    def __init__(self, module, original, shared: _SharedPool, warmup: int = 2, max_shapes: int = 1):
        self.module_ref = weakref.ref(module)
        self.original = original
        self.shared = shared
        self.cache = _GraphCache(warmup, max_shapes)
        self._lora_modules = None  # the layer's PEFT LoRA projections: listed at first use and again when its
        #                            parameters change (an adapter added)
        self.replays = self.eager_calls = 0
        self.inside_checkpoint = False  # running the layer's forward for the checkpointing function
        self._warned: set = set()

    @property
    def graphs(self) -> dict:
        return self.cache.graphs

    @property
    def failed(self) -> dict:
        return self.cache.failed

    # ------------------------------------------------------------------ call
    def __call__(self, *args, **kwargs):
        module = self.module_ref()
        if self.inside_checkpoint or (
            module is not None
            and module.training
            and torch.is_grad_enabled()
            and getattr(module, "gradient_checkpointing", False)
        ):
            # checkpointed: HF's layer call goes through its _gradient_checkpointing_func, which is ours
            # (_GraphedCheckpoint) from now on; inside it the layer's own forward runs
            if not self.inside_checkpoint:
                self.install_checkpointing(module)
            return self.original(*args, **kwargs)
        call = self._graphable_call(module, args, kwargs, LayerGraph)
        graph = None if call is None else self._graph_for(call, self.original)
        if graph is not None and graph.awaiting_backward():
            graph = None  # a replay whose backward has not run yet owns the saved activations: this call is eager
        elif graph is not None and graph.input_moved(call.tensors):
            del self.cache.graphs[call.key]  # capture this call afresh, reading a copy of its input
            graph = self._graph_for(call, self.original)
        if graph is None:
            self.eager_calls += 1
            return self._note_layouts(call, self.original(*args, **kwargs))
        self.replays += 1
        return _rebuild(graph.out_desc, iter(_Replay.apply(graph, *call.tensors, *call.params)))

    def call_checkpointed(self, function, args, inner, offloader):
        """A checkpointed layer call (`function(*args)`, function = functools.partial of the layer's forward
        with its keyword arguments) replayed from its CheckpointGraph, or `inner` (the checkpointing function
        HF or fusedlora set) where no graph serves it."""
        call = self._graphable_call(self.module_ref(), args, function.keywords, CheckpointGraph)
        graph = None if call is None else self._graph_for(call, self._checkpointed_forward(function))
        if graph is None:
            self.eager_calls += 1
            with self._in_checkpoint():
                return self._note_layouts(call, inner(function, *args))
        self.replays += 1
        outs = _CheckpointReplay.apply(graph, offloader, *call.tensors, *call.params)
        return _rebuild(graph.out_desc, iter(outs))

    def _checkpointed_forward(self, function):
        """The layer's forward that a checkpoint graph records: `function` without its keyword arguments (the
        graph's key holds them), run as inside the checkpointing function (this wrapper passes it through)."""
        body = functools.partial(function.func, *function.args)

        def forward(*args, **kwargs):
            with self._in_checkpoint():
                return body(*args, **kwargs)

        return forward

    @contextlib.contextmanager
    def _in_checkpoint(self):
        self.inside_checkpoint = True
        try:
            yield
        finally:
            self.inside_checkpoint = False

    def _note_layouts(self, call: _Call | None, out):
        if call is not None:
            self.cache.note_layouts(call.key, out)
        return out

    def install_checkpointing(self, module):
        """Put _GraphedCheckpoint around the layer's checkpointing function (again after HF's
        gradient_checkpointing_enable replaced it)."""
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or (isinstance(func, _GraphedCheckpoint) and func.wrapper is self):
            return
        if isinstance(func, _GraphedCheckpoint):
            func = func.inner
        module._gradient_checkpointing_func = _GraphedCheckpoint(self, func)

    def warn_once(self, topic: str, message: str, stacklevel: int):
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, stacklevel=stacklevel + 1)

    def _graph_for(self, call: _Call, forward):
        """The key's graphs: captured after `warmup` eager calls (None while warming up, past max_shapes, or
        when its capture failed)."""
        graph = self.cache.graphs.get(call.key)
        if graph is None and self.cache.due(call.key):
            graph = self._capture(call, forward)
        return graph

    def _graphable_call(self, module, args, kwargs, kind: type) -> _Call | None:
        """The call (for graphs of `kind`) when graphs may serve it, else None."""
        if (
            module is None
            or not torch.is_grad_enabled()
            or not module.training
            or torch.compiler.is_compiling()
            or kwargs.get("past_key_values") is not None
            or kwargs.get("past_key_value") is not None
        ):
            return None
        tensors: list = []
        try:
            desc = _flatten((args, kwargs), tensors)
        except TypeError:
            return None
        if not tensors or not all(_graphable(t) for t in tensors) or torch.cuda.is_current_stream_capturing():
            return None  # (another capture in progress: torch.compile's CUDA graphs, the caller's own)
        if _sharded(module):
            self.warn_once(
                "sharded",
                "fusedlora.cuda_graph_layers: the layer's parameters are FSDP-sharded "
                "(DTensors, re-gathered into new memory at each call): it runs eagerly",
                stacklevel=3,
            )
            return None
        return self._cache_key(module, desc, tensors, kind)

    def _cache_key(self, module, desc, tensors, kind: type) -> _Call:
        """The graphable call's key, tensors and parameters; drops the graphs when the parameters moved."""
        every = list(module.parameters())  # (one walk of the module tree per call: this runs per layer per step)
        params = [p for p in every if p.requires_grad]
        ptrs = _addresses(module, every)
        if self.cache.addresses != ptrs:
            if self.cache.graphs:
                warnings.warn(
                    "fusedlora.cuda_graph_layers: a layer's parameters moved (model.to, a swapped "
                    "weight); its CUDA graphs are dropped and re-captured",
                    stacklevel=3,
                )
            self.cache.reset(ptrs)
            self._lora_modules = None
        device = tensors[0].device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return _Call(
            GraphKey(desc, autocast, tuple(id(p) for p in params), self.adapter_state(), kind), tensors, params
        )

    def adapter_state(self) -> tuple:
        """What a graph bakes in of the layer's PEFT adapters and the forward cannot see in its tensors
        (`peft_layers.adapter_state` of each LoRA projection). Switching adapters, disable_adapter(),
        merge_adapter() or a new scale changes the key (a new graph, or the eager forward), never a replay of
        the old one."""
        return tuple(adapter_state(m) for m in self.lora_modules)

    @property
    def lora_modules(self) -> list:
        if self._lora_modules is None:
            self._lora_modules = lora_layers(self.module_ref())
        return self._lora_modules

    # ------------------------------------------------------------------ capture
    def _capture(self, call: _Call, forward):
        """The key's graphs of its kind, captured now; or None, the key left eager for good with a warning."""
        amp_on, amp_dtype = call.key.autocast
        try:
            if self.shared.broken:
                raise RuntimeError(self.shared.broken)
            with torch.autocast(call.tensors[0].device.type, dtype=amp_dtype, enabled=amp_on, cache_enabled=False):
                graph = call.key.kind.capture(self, call, forward)
        except Exception as e:  # noqa: BLE001 - any capture failure: this key stays eager
            why = f"{type(e).__name__}: {str(e)[:300]}"
            self.cache.failed[call.key] = why
            if self.shared.capturing:
                # a failure inside a capture can leave the allocator recording into the pool: no further
                # capture in this model
                self.shared.broken = f"an earlier capture failed ({why})"
                self.shared.capturing = False
            warnings.warn(
                f"fusedlora.cuda_graph_layers: {type(self.module_ref()).__name__} could not be captured "
                f"as a CUDA graph ({why}); it runs eagerly",
                stacklevel=4,
            )
            torch.cuda.synchronize()
            return None
        self.shared.warmed = True
        self.cache.graphs[call.key] = graph
        return graph

    def __deepcopy__(self, memo):
        """A copy of the model (TRL's reference model, say) gets wrappers of its own: bound to the copied
        module, no graphs yet, one new shared pool per copied model."""
        import copy

        module = copy.deepcopy(self.module_ref(), memo)
        shared = memo.setdefault(id(self.shared), _SharedPool())
        return GraphedModule(
            module, copy.deepcopy(self.original, memo), shared, self.cache.warmup, self.cache.max_shapes
        )

    def __reduce__(self):
        raise TypeError("a model under fusedlora.cuda_graph_layers cannot be pickled; fusedlora.unpatch(model) first")


class _SharedPool:
    """What the wrapped modules of one model share: the graphs' memory pool, and whether a failed capture has
    left it unusable."""

    def __init__(self):
        self._pool = None
        self.capturing = False
        self.broken: str | None = None
        self.buffers: dict = {}
        self.warmed = False  # a capture succeeded: the lazy initialisations are done
        self.warm_ups = 0
        self.outputs = weakref.WeakValueDictionary()  # data_ptr -> a saved-activation graph's static output

    def register_outputs(self, outputs):
        for o in outputs:
            self.outputs[o.data_ptr()] = o

    def static_output(self, t: torch.Tensor):
        """The static output of one of the model's graphs that `t` is (same memory and layout), or None."""
        o = self.outputs.get(t.data_ptr())
        if o is None or o.shape != t.shape or o.stride() != t.stride() or o.dtype != t.dtype:
            return None
        return o

    def exchange(self, tag, like) -> torch.Tensor:
        """The model's one buffer for `tag` (("in", 0): a checkpointed layer's first input, ("grad_out", 0): its
        first output's incoming gradient...) with `like`'s layout. Layers run one after another, and a graph
        reads these only while it replays (its caller copies in just before, out just after), so one buffer
        serves every layer instead of one per layer."""
        key = (
            tag,
            tuple(like.shape),
            tuple(like.stride()),
            like.dtype,
            like.device,
            like.requires_grad,
        )  # (a tensor or
        # a _Layout)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
            buffer = self.buffers[key] = buffer.requires_grad_(like.requires_grad)
        return buffer

    @property
    def pool(self):
        if self._pool is None:  # made at the first capture (a wrapped model on a CPU never asks)
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


class _GraphedCheckpoint:
    """A layer's `_gradient_checkpointing_func` under cuda_graph_layers: HF calls it with
    functools.partial(the layer's forward, **keyword arguments) and the positional arguments. Graphable calls
    replay the layer's checkpoint graphs (the input kept as `inner` would keep it: on the GPU, or offloaded
    when `inner` is fusedlora's offloaded_checkpoint); the rest go to `inner`."""

    def __init__(self, wrapper: GraphedModule, inner):
        self.wrapper, self.inner = wrapper, inner
        offloaded = isinstance(inner, functools.partial) and inner.func is offloaded_checkpoint
        self.offloader = inner.keywords.get("offloader") if offloaded else None
        self.offloaded = offloaded
        self.replayable = offloaded or _plain_torch_checkpoint(inner)

    def __call__(self, function, *args, **kwargs):
        if (
            kwargs
            or not isinstance(function, functools.partial)
            or not args
            or not isinstance(args[0], torch.Tensor)
            or (self.offloaded and self.offloader is None)
        ):
            return self.inner(function, *args, **kwargs)
        if not self.replayable:
            self.wrapper.warn_once(
                "checkpointing",
                f"fusedlora.cuda_graph_layers: the layers' checkpointing function ({self.inner!r:.120}) "
                "is neither torch's checkpoint nor fusedlora's offloaded checkpointing (transformers' "
                "activation_checkpointing_enable(offload=True), say): those layers run eagerly under it, keeping "
                "what it keeps where it keeps it",
                stacklevel=2,
            )
            return self.inner(function, *args, **kwargs)
        return self.wrapper.call_checkpointed(function, args, self.inner, self.offloader)

    def __deepcopy__(self, memo):
        import copy  # a copied model gets the plain function; its own wrapper installs itself again

        return copy.deepcopy(self.inner, memo)


# torch.utils.checkpoint.checkpoint's keywords that change neither what it computes nor where it keeps the
# layer input (a checkpoint graph keeps that input on the GPU and recomputes everything)
_PLAIN_CHECKPOINT_KEYWORDS = frozenset({"use_reentrant", "preserve_rng_state", "determinism_check", "debug"})


def _plain_torch_checkpoint(func) -> bool:
    """Whether a layer's checkpointing function is torch's checkpoint (HF's default: functools.partial of it
    with use_reentrant...), whose calls a checkpoint graph may replace; not a function that also moves saved
    tensors (transformers' offload=True wraps checkpoint in save_on_cpu) or selects what to save (context_fn)."""
    from torch.utils.checkpoint import checkpoint

    if isinstance(func, functools.partial):
        return func.func is checkpoint and not func.args and set(func.keywords) <= _PLAIN_CHECKPOINT_KEYWORDS
    return func is checkpoint


def graph_modules(modules, **options) -> list:
    """Wrap each module's forward in a GraphedModule sharing one CUDA graph memory pool; returns the wrappers."""
    pool = _SharedPool()
    wrappers = []
    for m in modules:
        if "forward" in m.__dict__ and not isinstance(m.__dict__["forward"], GraphedModule):
            original = m.__dict__["forward"]
        elif isinstance(m.__dict__.get("forward"), GraphedModule):
            original = m.__dict__["forward"].original
        else:
            original = type(m).forward.__get__(m)
        w = GraphedModule(m, original, pool, **options)
        m.__dict__["forward"] = w
        if getattr(m, "gradient_checkpointing", False):
            # now, not at the first call: with transformers < 5.2x that call is already inside HF's function
            w.install_checkpointing(m)
        wrappers.append(w)
    return wrappers


def ungraph_modules(modules) -> int:
    """Restore the forwards graph_modules replaced (dropping their graphs); returns how many."""
    n = 0
    for m in modules:
        func = m.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _GraphedCheckpoint):
            m.__dict__["_gradient_checkpointing_func"] = func.inner
        w = m.__dict__.get("forward")
        if isinstance(w, GraphedModule):
            if getattr(w.original, "__self__", None) is m and getattr(w.original, "__func__", None) is type(m).forward:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = w.original
            n += 1
    return n
