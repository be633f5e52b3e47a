"""Input checks and small helpers shared by the ops."""

from __future__ import annotations

import functools

import torch

from csrc_triton._math import interpreter_on

from ._custom import compiling

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def saved_tensors_writable() -> bool:
    """Whether the backward running now may write over what its Function saved: only when autograd frees the
    graph after this backward (retain_graph=False, create_graph=False). A kernel's write is invisible to
    autograd's version counter, so a retained graph's next backward would read the overwritten tensors
    silently. Where torch cannot tell (its probe is private), never; nor under torch.compile, whose graph owns
    its saved buffers (and AOTAutograd traces a backward outside any graph task, where the probe says yes)."""
    return _KEEP_GRAPH is not None and not compiling() and not _KEEP_GRAPH()


def interpreting() -> bool:
    """TRITON_INTERPRET is on as Triton reads it: kernels run in Triton's CPU interpreter."""
    return interpreter_on()


def check_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, like: torch.Tensor | None = None, like_name: str = ""):
    """Raise a clear error naming the argument if `t` is not a tensor we can hand to a kernel."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: {name} is on {t.device}; fusedlora kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 with CPU tensors for Triton's interpreter)"
        )
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {allowed}")


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast gives t's device type (CUDA or CPU) when it is on there, else None."""
    if t.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


def rows_2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View `t` as [rows, n_cols] with a unit last stride (copies only when it must)."""
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1 and t2.numel() > 0:
        t2 = t2.contiguous()
    return t2


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    if device_index < 0:  # CPU interpreter: programs run one by one, keep grids small
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(n_work: int, per_sm: int, device_index: int) -> int:
    """Grid size of a kernel whose programs walk work items p, p + P, ...: per_sm programs per SM, never
    more than the work (one per item when per_sm is 0), at least one. A symbolic work count (a custom op's
    fake under torch.compile, which launches nothing) is not compared: no guard on the row count."""
    if not isinstance(n_work, int) and per_sm:
        return per_sm * sm_count(device_index)
    return max(1, min(n_work, per_sm * sm_count(device_index)) if per_sm else n_work)


def wide_rows(like: torch.Tensor, rows: int, row_stride: int) -> torch.Tensor:
    """A [rows, row_stride] buffer of like's dtype and device whose column blocks are handed to GEMMs:
    uninitialised on a GPU; zero-filled elsewhere, because torch's CPU bf16 GEMM (torch 2.13, oneDNN) reads a
    column block's row past its last column and a NaN left there by an uninitialised buffer comes out as
    NaN rows (NaN * 0), while finite values there do not change the product."""
    if like.is_cuda:
        return like.new_empty(rows, row_stride)
    return like.new_zeros(rows, row_stride)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the self-checks' measure)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(outs, grads, inputs):
    return torch.autograd.grad(outs, inputs, grads)
