"""Offloaded activation checkpointing: each checkpointed layer keeps only its input, in pinned host memory.

`offloaded_checkpoint(function, *args)` has the signature of HF's `_gradient_checkpointing_func` (and of
`torch.utils.checkpoint.checkpoint` with its first argument), so `fusedlora.patch(model,
offload_checkpoints=True)` hands it to every decoder layer (HF's GradientCheckpointingLayer calls it with the
layer's forward and its positional inputs). In the forward the layer runs without saving activations and its
input tensor goes to a pinned host buffer on a side stream (the copy overlaps the next layers); in the backward
the input comes back (the next-earlier layer's input is prefetched on the side stream while this layer
recomputes), the layer is recomputed with autograd on, under the forward's RNG and autocast state, and
backpropagated. GPU memory for activations is then one layer's working set instead of one input per layer.

Host buffers are pooled by shape and dtype and reused across steps (pinning is slow); a buffer is in use from a
layer's forward until its backward, or until the forward's graph is dropped without a backward.
Host memory is bounded: by `host_limit_bytes` (default: 80 % of the memory Linux reports available when the
first buffer is made) and by what pinning can get. A layer input that finds no host buffer within the bound
stays on its device, as on-GPU checkpointing keeps it (warned once), so a sequence too long for the host's
memory still trains while the GPU has room.
On CPU tensors (tests, the interpreter) the "offload" is a copy into a host buffer and back, with no streams.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch

HOST_SHARE = 0.8  # of MemAvailable, the default bound of pinned checkpoint buffers


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_bytes(like: torch.Tensor) -> int:
    """What one host buffer for `like` costs: torch's pinned allocator rounds blocks up to a power of two."""
    n = like.numel() * like.element_size()
    return 1 << max(0, n - 1).bit_length() if like.is_cuda else n


def _new_host_buffer(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)


class _HostPool:
    """Pinned host buffers by (shape, dtype); one per live checkpoint; at most `limit` bytes of them
    (None: HOST_SHARE of the host's available memory, read at the first buffer)."""

    def __init__(self, limit: int | None = None):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.limit = limit
        self.made = 0                  # bytes of every buffer made (free or in use)
        self.refused: str | None = None  # why the last buffer could not be made

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """A host buffer shaped like `like`, or None when none fits the bound (or pinning failed)."""
        key = (tuple(like.shape), like.dtype)
        with self.lock:
            bufs = self.free.get(key)
            if bufs:
                return bufs.pop()
            if self.limit is None:
                available = _available_host_bytes()
                self.limit = int(HOST_SHARE * available) if available is not None else -1
            cost = _host_bytes(like)
            if 0 <= self.limit < self.made + cost:
                self.refused = (f"the host buffers would pass their bound of {self.limit / 2**30:.1f} GiB "
                                f"({self.made / 2**30:.1f} GiB made)")
                return None
            try:
                buf = _new_host_buffer(like)
            except RuntimeError as e:  # (torch.OutOfMemoryError is one) pinned memory ran out
                self.refused = f"pinning {cost / 2**30:.2f} GiB failed ({type(e).__name__}: {str(e)[:120]})"
                self.limit = self.made  # no further attempts past what exists
                return None
            self.made += cost
            return buf

    def give(self, buf: torch.Tensor):
        with self.lock:
            self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)


class Offloader:
    """The host pool, the side streams, the queue of saved inputs and the anchors of one model
    (`fusedlora.patch(..., offload_checkpoints=True)` makes one per model). host_limit_bytes bounds the pinned
    buffers (None: HOST_SHARE of the host's available memory); inputs past it stay on the GPU."""

    def __init__(self, host_limit_bytes: int | None = None):
        self.pool = _HostPool(host_limit_bytes)
        self.host_limit_bytes = host_limit_bytes
        self.kept_on_device = 0  # layer inputs that found no host buffer
        self.warned = False
        self.streams: dict[int, torch.cuda.Stream] = {}
        self.live: list[weakref.ref] = []  # saved inputs in forward order (for the prefetch of the next backward)
        self.anchors: dict[torch.device, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        """A copied model (TRL's reference model, say) gets its own pool and streams, none of the saved inputs."""
        return Offloader(self.host_limit_bytes)

    def note_kept(self):
        self.kept_on_device += 1
        if not self.warned:
            self.warned = True
            warnings.warn(f"fusedlora offloaded checkpointing: {self.pool.refused}; layer inputs that find no host "
                          "buffer stay on the GPU (as on-GPU checkpointing keeps them)", stacklevel=4)

    def anchor(self, device) -> torch.Tensor:
        """An empty tensor that requires grad: an input of every checkpoint node, so that autograd runs its
        backward even when the layer input needs no gradient (a first layer over frozen embeddings)."""
        if device not in self.anchors:
            self.anchors[device] = torch.empty(0, device=device, requires_grad=True)
        return self.anchors[device]

    def stream(self, device):
        if device.index not in self.streams:
            self.streams[device.index] = torch.cuda.Stream(device)
        return self.streams[device.index]

    @torch.compiler.disable  # (streams, events, weakrefs: host-side bookkeeping Dynamo must not trace)
    def save(self, x: torch.Tensor) -> "_Saved":
        saved = _Saved(self, x)
        self.live = [r for r in self.live if r() is not None]
        self.live.append(weakref.ref(saved))
        return saved

    @torch.compiler.disable
    def previous(self, saved: "_Saved") -> "_Saved | None":
        """The input saved just before `saved` that is still waiting for its backward (the next to come back)."""
        alive = [s for s in (r() for r in self.live) if s is not None and s.waiting]
        i = next((k for k, s in enumerate(alive) if s is saved), None)
        return alive[i - 1] if i else None


class _Saved:
    """One layer input: on its way to the host, on the host, or prefetched back (or kept on its device when
    no host buffer was to be had)."""

    def __init__(self, off: Offloader, x: torch.Tensor):
        self.off, self.device, self.requires_grad = off, x.device, x.requires_grad
        self.host = off.pool.take(x)
        self.back = self.event = None
        self.waiting = True  # until its backward loads it
        if self.host is None:
            self.back = x.detach()
            off.note_kept()
            return
        if x.is_cuda:
            side = off.stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))  # x is complete
            with torch.cuda.stream(side):
                self.host.copy_(x.detach(), non_blocking=True)
                self.event = side.record_event()
            x.record_stream(side)  # x's memory is not reused before the copy has read it
        else:
            self.host.copy_(x.detach())
        self._release = weakref.finalize(self, off.pool.give, self.host)  # dropped without a backward

    @torch.compiler.disable
    def prefetch(self):
        """Start the copy back on the side stream (once)."""
        if self.back is not None or self.host is None:
            return
        if self.device.type == "cuda":
            side = self.off.stream(self.device)
            with torch.cuda.stream(side):
                side.wait_event(self.event)
                self.back = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
                self.back.copy_(self.host, non_blocking=True)
                self.event = side.record_event()
        else:
            self.back = self.host.clone()

    @torch.compiler.disable
    def load(self) -> torch.Tensor:
        """The input on its device (the host buffer goes back to the pool)."""
        self.waiting = False
        if self.host is None:  # kept on its device
            x, self.back = self.back, None
            return x
        self.prefetch()
        x = self.back
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            x.record_stream(current)
        self.back, self.host = None, None
        self._release()  # the host buffer is free once the copy back is ordered before any reuse
        return x


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed(state, device, autocast):
    """The forward's RNG state (dropout masks) and autocast state, restored for the recompute."""
    cpu_state, cuda_state = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        with contextlib.ExitStack() as stack:
            for device_type, (enabled, dtype) in autocast.items():
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, offloader, anchor, x, *rest):
        ctx.function, ctx.rest = function, rest
        ctx.rng = _rng_state(x.device)
        ctx.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")}
        with torch.no_grad():
            out = function(x, *rest)
        ctx.saved = offloader.save(x)
        ctx.offloader = offloader
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved
        before = ctx.offloader.previous(saved)
        x = saved.load().detach().requires_grad_(saved.requires_grad)
        if before is not None:
            before.prefetch()  # the next backward's input comes back while this layer recomputes
        with torch.enable_grad(), _replayed(ctx.rng, x.device, ctx.autocast):
            out = ctx.function(x, *ctx.rest)
        outs = out if ctx.tuple_out else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, x.grad if saved.requires_grad else None) + (None,) * len(ctx.rest)


@torch.compiler.disable(recursive=False)  # Dynamo does not trace the offload (streams, weakrefs): the layer
# function itself is compiled as its own frame when the model is under torch.compile
def offloaded_checkpoint(function, *args, offloader: Offloader | None = None, **_ignored):
    """function(*args) with its first tensor argument kept in pinned host memory and everything else
    recomputed in the backward (see the module docstring). Pass one `Offloader` per model for its buffer
    pool and prefetch (without one, each call has its own: correct, but no reuse and no prefetch). Keyword
    arguments of torch's checkpoint (use_reentrant, preserve_rng_state...) are accepted and ignored: this is
    always RNG-preserving. The parameters the function uses get their gradients in the backward's recompute,
    also when the input needs none."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded_checkpoint: the first argument after the function must be the layer's input "
                        "tensor (HF passes hidden_states positionally)")
    if not torch.is_grad_enabled():
        return function(*args)
    offloader = offloader or Offloader()
    return _OffloadedCheckpoint.apply(function, offloader, offloader.anchor(args[0].device), *args)
