"""Offloaded activation checkpointing: each checkpointed layer keeps only its input, in pinned host memory.

`offloaded_checkpoint(function, *args)` has the signature of HF's `_gradient_checkpointing_func` (and of
`torch.utils.checkpoint.checkpoint` with its first argument), so `fusedlora.patch(model,
offload_checkpoints=True)` hands it to every decoder layer (HF's GradientCheckpointingLayer calls it with the
layer's forward and its positional inputs). In the forward the layer runs without saving activations and its
input tensor goes to a pinned host buffer on a side stream (the copy overlaps the next layers); in the backward
the input comes back (the next-earlier layer's input is prefetched on the side stream while this layer
recomputes), the layer is recomputed with autograd on, under the forward's RNG and autocast state, and
backpropagated. GPU memory for activations is then one layer's working set instead of one input per layer.

Host buffers are pooled by size class (powers of two of bytes, viewed to each input's shape and dtype) and
reused across steps and across input sizes (pinning is slow; with dynamic padding every step's length differs);
a buffer is in use from a layer's forward until its backward, or until the forward's graph is dropped without a
backward. Host memory is bounded: by `host_limit_bytes` (default: 80 % of what the host leaves this process when
the first buffer is made, the lesser of Linux's MemAvailable and the memory cgroup's limit minus its usage; 4 GiB,
warned, when /proc/meminfo cannot be read) and by what pinning can get. At the bound, idle buffers of other sizes
are freed for the new size; a layer input that still finds no host buffer stays on its device, as on-GPU
checkpointing keeps it (warned once), so a sequence too long for the host's memory still trains while the GPU
has room.
On CPU tensors (tests, the interpreter) the "offload" is a copy into a host buffer and back, with no streams.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref

import torch

HOST_SHARE = 0.8  # of the memory the host leaves this process, the default bound of pinned checkpoint buffers
CONSERVATIVE_HOST_BYTES = 4 << 30  # the default bound when the host's available memory cannot be read
MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_MOUNT = "/sys/fs/cgroup"
NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63 (v2 writes "max")


def _read_int(path: str) -> int | None:
    """The integer in a one-value kernel file, or None when it is unreadable or not a number ("max")."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What this process's memory cgroup still allows (limit minus usage; v2 memory.max / memory.current, v1
    memory.limit_in_bytes / memory.usage_in_bytes), or None without a limit. Each is looked up at the process's
    cgroup path under the mount, then at the mount's root (what a container sees of its own cgroup)."""
    own = {"v2": "", "v1": ""}
    try:
        with open(PROC_CGROUP) as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0":
                    own["v2"] = path
                elif "memory" in controllers.split(","):
                    own["v1"] = path
    except (OSError, ValueError):
        pass
    files = []
    for base, limit_name, usage_name, version in (
        (CGROUP_MOUNT, "memory.max", "memory.current", "v2"),
        (os.path.join(CGROUP_MOUNT, "unified"), "memory.max", "memory.current", "v2"),  # hybrid hosts
        (os.path.join(CGROUP_MOUNT, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "v1"),
    ):
        for rel in dict.fromkeys((own[version].lstrip("/"), "")):
            files.append((os.path.join(base, rel, limit_name), os.path.join(base, rel, usage_name)))
    for limit_file, usage_file in files:
        limit = _read_int(limit_file)
        if limit is not None and limit < NO_CGROUP_LIMIT:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def _default_host_bound() -> int:
    """HOST_SHARE of what the host leaves this process: the lesser of MemAvailable and its cgroup's remaining
    memory. Without a readable /proc/meminfo, not "no bound": CONSERVATIVE_HOST_BYTES (or less, by the cgroup),
    warned."""
    available, cgroup = _meminfo_available(), _cgroup_available()
    if available is None:
        bound = min(
            CONSERVATIVE_HOST_BYTES, int(HOST_SHARE * cgroup) if cgroup is not None else CONSERVATIVE_HOST_BYTES
        )
        warnings.warn(
            f"fusedlora offloaded checkpointing: cannot read MemAvailable from {MEMINFO}; the pinned host "
            f"buffers are bounded to {bound / 2**30:.1f} GiB (pass patch(offload_host_limit_gib=...) to "
            "choose)",
            stacklevel=5,
        )
        return bound
    return int(HOST_SHARE * (available if cgroup is None else min(available, cgroup)))


def _size_class(nbytes: int) -> int:
    """Host buffers come in powers of two of bytes (what torch's pinned allocator rounds a block up to anyway):
    one buffer serves every input of its class, so inputs whose length changes per step (dynamic padding)
    reuse the buffers of earlier steps."""
    return 1 << max(0, nbytes - 1).bit_length()


def _new_host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A flat byte buffer of `like`'s size class, pinned for a CUDA tensor."""
    return torch.empty(_size_class(like.numel() * like.element_size()), dtype=torch.uint8, pin_memory=like.is_cuda)


def _empty_host_cache():
    """torch's call that hands cached pinned blocks back to the driver (dropping a pinned tensor only caches its
    block, for a later request of the same size), or None where this torch has none (the private name: older torch)."""
    return getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None
    )


class _HostPool:
    """Flat host buffers by (size class, pinned); one per live checkpoint, viewed to its input's shape and dtype;
    at most `limit` bytes of them (None: _default_host_bound(), read at the first buffer). A request takes an
    idle buffer of its class, else the smallest larger idle one, else a new one; at the bound, idle buffers
    of other classes are freed to make room before the input is left on its device."""

    def __init__(self, limit: int | None = None):
        self.free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.limit = limit
        self.made = 0  # bytes of every buffer held (free or in use)
        self.refused: str | None = None  # why the last buffer could not be made

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, tuple, torch.Tensor] | None:
        """(a host tensor shaped like `like`, its buffer's key and the buffer, both for `give`), or None when
        none fits the bound (or pinning failed)."""
        nbytes = like.numel() * like.element_size()
        key = (_size_class(nbytes), like.is_cuda)
        with self.lock:
            taken = self._idle(key)
            if taken is None:
                taken = self._new(like, key)
            if taken is None:
                return None
        key, buf = taken
        return buf[:nbytes].view(like.dtype).view(like.shape), key, buf

    def give(self, key: tuple, buf: torch.Tensor):
        with self.lock:
            self.free.setdefault(key, []).append(buf)

    def _idle(self, key):
        """An idle buffer of the class, else of the smallest larger class with the same pinning: (key, buffer)."""
        fits = [k for k, bufs in self.free.items() if bufs and k[1] == key[1] and k[0] >= key[0]]
        if not fits:
            return None
        best = min(fits)
        return best, self.free[best].pop()

    def _new(self, like, key):
        if self.limit is None:
            self.limit = _default_host_bound()
        cost = key[0]
        if self.made + cost > self.limit and not self._free_idle(self.made + cost - self.limit):
            self.refused = (
                f"the host buffers would pass their bound of {self.limit / 2**30:.1f} GiB "
                f"({self.made / 2**30:.1f} GiB in use)"
            )
            return None
        try:
            buf = _new_host_buffer(like)
        except RuntimeError as e:  # (torch.OutOfMemoryError is one) pinned memory ran out
            self.refused = f"pinning {cost / 2**30:.2f} GiB failed ({type(e).__name__}: {str(e)[:120]})"
            self.limit = self.made  # no further attempts past what exists
            return None
        self.made += cost
        return key, buf

    def _free_idle(self, needed: int) -> bool:
        """Drop idle buffers, largest first, until `needed` bytes are freed; False (nothing dropped) when the
        idle ones are too few, or pinned and this torch cannot hand their blocks back."""
        idle = sum(k[0] * len(bufs) for k, bufs in self.free.items())
        release = _empty_host_cache()
        if idle < needed or (release is None and any(k[1] and bufs for k, bufs in self.free.items())):
            return False
        freed, dropped_pinned = 0, False
        for k in sorted(self.free, reverse=True):
            bufs = self.free[k]
            while bufs and freed < needed:
                bufs.pop()
                freed += k[0]
                dropped_pinned |= k[1]
        self.made -= freed
        if dropped_pinned:
            release()
        return True


class Offloader:
    """The host pool, the side streams, the queue of saved inputs and the anchors of one model
    (`fusedlora.patch(..., offload_checkpoints=True)` makes one per model). host_limit_bytes bounds the pinned
    buffers (None: HOST_SHARE of what the host leaves this process, _default_host_bound); inputs past it stay on
    the GPU."""

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
            warnings.warn(
                f"fusedlora offloaded checkpointing: {self.pool.refused}; layer inputs that find no host "
                "buffer stay on the GPU (as on-GPU checkpointing keeps them)",
                stacklevel=4,
            )

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
        taken = off.pool.take(x)
        self.host = None if taken is None else taken[0]
        self.back = self.event = None
        self.waiting = True  # until its backward loads it
        if taken is None:
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
        self._release = weakref.finalize(self, off.pool.give, *taken[1:])  # (also when dropped without a backward)

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


def rng_state(device):
    """The RNG state a recompute must start from (CPU, and the CUDA device's on a GPU): `replayed_rng`'s `state`."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state, device, autocast):
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
        ctx.rng = rng_state(x.device)
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
        with torch.enable_grad(), replayed_rng(ctx.rng, x.device, ctx.autocast):
            out = ctx.function(x, *ctx.rest)
        outs = out if ctx.tuple_out else (out,)
        pairs = [
            (o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
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
        raise TypeError(
            "offloaded_checkpoint: the first argument after the function must be the layer's input "
            "tensor (HF passes hidden_states positionally)"
        )
    if not torch.is_grad_enabled():
        return function(*args)
    offloader = offloader or Offloader()
    return _OffloadedCheckpoint.apply(function, offloader, offloader.anchor(args[0].device), *args)
