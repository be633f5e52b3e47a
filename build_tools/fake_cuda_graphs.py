"""CUDA graphs faked on a CPU, so that the tests run fusedlora.cuda_graphs' capture and replay (both graph kinds,
the shared buffers, the checkpointing wiring, the recompute's RNG state) in CI.

A fake graph records what its capture ran: every aten op (through a TorchDispatchMode, which also sees the
backward's ops) and every Triton launch of the loader (the interpreter's CPU path), each with the very tensors it
read and wrote. Replay runs the record again on those tensors: ops that write their arguments (in-place, out=)
and kernel launches run as recorded, views are skipped (they see their base), and every other op's result is
copied into the tensor the capture produced. That is a CUDA graph's contract: the same work on the same memory,
the host's Python not run again. Not faked: the memory pool (each capture allocates fresh CPU memory, so pool
reuse between graphs is not exercised) and streams (no-ops).

Also `python -m build_tools.host_overhead --graphs`: the host time of a graphed step (replays that do nothing)."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from fusedlora import cuda_graphs, loader

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
    original_cpu = loader.KernelLauncher._cpu

    def recorded_cpu(self, grid, args, constexprs):
        with _disable_current_modes():  # (the interpreter's own tensor copies are not the kernel's work)
            result = original_cpu(self, grid, args, constexprs)
        if _capturing:
            _capturing[-1].tape.append(("kernel", original_cpu, (self, grid, args, constexprs), None, None))
        return result
    patches = [(torch.cuda, "CUDAGraph", FakeCUDAGraph), (torch.cuda, "graph", _graph),
               (torch.cuda, "Stream", lambda *a, **k: _Stream()), (torch.cuda, "stream", lambda s: contextlib.nullcontext()),
               (torch.cuda, "current_stream", lambda *a, **k: _Stream()), (torch.cuda, "graph_pool_handle", lambda: None),
               (torch.cuda, "is_current_stream_capturing", lambda: bool(_capturing)),
               (torch.cuda, "synchronize", lambda *a, **k: None), (cuda_graphs, "_graphable", lambda t: True),
               (loader.KernelLauncher, "_cpu", recorded_cpu)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
