"""Dispatch of registered kernels: prebuilt cubin through the CUDA driver, else Triton's JIT.

Lookup order for a call (kernel, argument types with Triton's specialisation, constexprs) on a GPU of
arch `sm_XY`: a prebuilt cubin for exactly that arch -> one for a compatible arch (same major, lower
minor) -> the normal `@triton.jit` call, logged once per key at debug level.

- `FUSEDLORA_JIT=1` forces the JIT path; `FUSEDLORA_AOT_ONLY=1` turns a miss into an error naming the
  variant and the command that builds it. Both are read when the loader is created (`reset()` re-reads).
- Kernel directories searched, first match wins: each entry of `FUSEDLORA_KERNEL_PATH` (os.pathsep
  separated, absolute paths only), the user kernel directory (`fusedlora.build`'s default output), the
  wheel's prebuilt set.
- A folder, manifest or cubin that breaks the contract of `fusedlora.manifest` (checksum, source hash, ABI,
  Triton version, arch, schema, paths inside the folder), or a cubin the driver refuses, is skipped with one
  warning per folder and reason and the call goes to the JIT path: never a crash, never a wrong kernel.
- The resolved launcher is memoised per (device, key); per-thread argument slots are prepared once and
  only their values change per launch. Launches go on torch's current stream, so CUDA graph capture
  works. This memo, the loaded modules and the warnings given are the loader's only state (`reset()` drops
  them).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import operator
import os
import struct
import threading
from pathlib import Path
from typing import Any

from . import registry
from .kernel_spec import SUPPORTED_ARCHS, KernelSpec, Variant, compatible_archs
from .manifest import Entry, FolderRefused, FolderWarnings, current_kernel_folders, kernel_index, read_top_manifests

log = logging.getLogger("fusedlora")

PREBUILT_DIR = Path(__file__).parent / "_prebuilt"


def user_kernel_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG rule: a relative XDG_CACHE_HOME is invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedlora" / "kernels"


def kernel_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("FUSEDLORA_KERNEL_PATH", "").split(os.pathsep) if p]
    return dirs + [user_kernel_dir(), PREBUILT_DIR]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class MissingKernelError(RuntimeError):
    """Raised under FUSEDLORA_AOT_ONLY=1 when no prebuilt cubin matches a call."""


# ----------------------------------------------------------------------------- argument binding
_TORCH_DTYPE_NAMES = None


def _dtype_tables():
    global _TORCH_DTYPE_NAMES
    if _TORCH_DTYPE_NAMES is None:
        import torch

        names = {
            torch.float16: "fp16",
            torch.bfloat16: "bf16",
            torch.float32: "fp32",
            torch.int32: "i32",
            torch.int64: "i64",
            torch.uint8: "u8",
            torch.int8: "i8",
            torch.int16: "i16",
        }
        _TORCH_DTYPE_NAMES = ({d: f"*{n}:16" for d, n in names.items()}, {d: f"*{n}" for d, n in names.items()})
    return _TORCH_DTYPE_NAMES


def _spec_int(v: int) -> str:
    if v == 1:
        return "1"
    if -(2**31) <= v < 2**31:
        return "i32" if v % 16 else "i32:16"
    return "i64" if v % 16 else "i64:16"


def make_binder(spec: KernelSpec, arg_kinds=None):
    """Generate `bind(*args) -> (signature types, values)` for the kernel's non-constexpr arguments.

    Generated code (as Triton does) keeps the per-launch cost to one pass with no loops. `arg_kinds`
    comes from the manifest when prebuilt kernels exist, so the prebuilt path never imports triton."""
    kinds = [(n, k) for n, k in (arg_kinds or spec.arg_kinds()) if k != "constexpr"]
    aligned, unaligned = _dtype_tables()
    params = ", ".join(f"a{i}" for i in range(len(kinds)))
    pre, types, vals = [], [], []
    for i, (name, kind) in enumerate(kinds):
        if kind == "ptr":
            pre.append(f"    p{i} = a{i}.data_ptr()")
            types.append(f"(U if p{i} & 15 else A)[a{i}.dtype]")
            vals.append(f"p{i}")
        elif kind == "float":
            types.append("'fp32'")
            vals.append(f"a{i}")
        elif kind == "int":  # inline _spec_int: no function call per argument
            types.append(
                f"(('1' if a{i} == 1 else 'i32' if a{i} & 15 else 'i32:16') "
                f"if -2147483648 <= a{i} <= 2147483647 else S(a{i}))"
            )
            vals.append(f"a{i}")
        else:
            types.append(f"('i32' if -2147483648 <= a{i} <= 2147483647 else 'i64')")
            vals.append(f"a{i}")
    src = (
        f"def bind({params}):\n"
        + "\n".join(pre)
        + ("\n" if pre else "")
        + f"    return ({', '.join(types)},), ({', '.join(vals)},)\n"
    )
    scope = {"A": aligned, "U": unaligned, "S": _spec_int}
    exec(compile(src, f"<fusedlora bind {spec.name}>", "exec"), scope)
    return scope["bind"], [n for n, _ in kinds]


# ----------------------------------------------------------------------------- launchers
# Kernel parameter packing: (struct code, size/alignment) per ABI type.
_PACK = {"fp32": ("f", 4), "i32": ("i", 4), "i32:16": ("i", 4), "i64": ("q", 8), "i64:16": ("q", 8)}


class _AotLaunch:
    """A loaded cubin. Per thread, one buffer holds every kernel parameter at its offset and a pointer
    array addresses them (prepared once); a launch packs the values in one `struct.pack_into` call."""

    def __init__(self, loader: "Loader", func, entry: Entry, device: int, sig):
        self.loader = loader
        self.cuLaunchKernel = loader.driver().cuLaunchKernel
        self.func = func
        self.entry = entry
        self.device = device
        self.block = 32 * entry.num_warps
        self.shared = entry.shared
        positions = [i for i, t in enumerate(sig) if t != "1"]  # ints equal to 1 are not parameters
        self.pick = None if len(positions) == len(sig) else operator.itemgetter(*positions)
        fmt, offsets, off = "<", [], 0
        for t in [sig[i] for i in positions] + ["*scratch", "*scratch"]:
            code, size = ("Q", 8) if t.startswith("*") else _PACK[t]
            pad = -off % size
            fmt += "x" * pad + code
            off += pad
            offsets.append(off)
            off += size
        self.packer = struct.Struct(fmt[:-2])  # the values only: the two scratch slots stay null
        self.offsets = offsets
        self.size = off
        self.scratch_offset = offsets[-2]
        self.pack_into = self.packer.pack_into
        self.raw_stream = loader.raw_stream
        self.needs_scratch = bool(entry.global_scratch_size)
        self.single_value = len(positions) == 1
        self.tls = threading.local()

    def _thread_state(self):
        self.loader.driver().ensure_context(self.device)  # a new thread may have no current context
        buf = ctypes.create_string_buffer(self.size)
        base = ctypes.addressof(buf)
        params = (ctypes.c_void_p * len(self.offsets))(*[base + o for o in self.offsets])
        state = self.tls.state = (buf, params, ctypes.c_void_p())
        return state

    def __call__(self, grid, args, values):
        try:
            buf, params, stream = self.tls.state
        except AttributeError:
            buf, params, stream = self._thread_state()
        if self.pick is None:
            self.pack_into(buf, 0, *values)
        else:
            picked = self.pick(values)
            self.pack_into(buf, 0, *((picked,) if self.single_value else picked))
        gx, gy, gz = grid
        if self.needs_scratch:
            self._scratch(buf, gx * gy * gz)
        stream.value = self.raw_stream(self.device)
        err = self.cuLaunchKernel(self.func, gx, gy, gz, self.block, 1, 1, self.shared, stream, params, None)
        if err:
            self.loader.driver().check(err, f"cuLaunchKernel({self.entry.name})")

    def _scratch(self, buf, n_programs):
        import torch

        e = self.entry
        t = torch.empty(
            n_programs * e.global_scratch_size + e.global_scratch_align, dtype=torch.uint8, device=self.device
        )  # stream-ordered, so safe under graph capture
        ptr = (t.data_ptr() + e.global_scratch_align - 1) // e.global_scratch_align * e.global_scratch_align
        struct.pack_into("<Q", buf, self.scratch_offset, ptr)
        self._scratch_keepalive = t


def _callers(depth: int = 6) -> str:
    """The innermost frames above the launch path (once per JIT-compiled variant, never on a hot path), so a
    report can say which module asked for a variant the wheel lacks."""
    import traceback

    skip = (os.sep + "loader.py", os.sep + "_custom.py", os.sep + "torch" + os.sep)
    frames = [
        f for f in traceback.extract_stack()[:-2] if not f.filename.endswith(skip[:2]) and skip[2] not in f.filename
    ]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


@functools.lru_cache(maxsize=None)
def _fake_tensor_type():
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def launches_nothing(first) -> bool:
    """A fake or meta tensor (torch.compile's tracing, the custom ops' fakes): the outputs are allocated
    already and there is nothing to compute."""
    return isinstance(first, _fake_tensor_type()) or getattr(first, "is_meta", False)


class _JitLaunch:
    def __init__(self, spec: KernelSpec, constexprs: dict, num_warps: int, num_stages: int):
        self.fn = spec.fn
        self.kwargs = dict(constexprs, num_warps=num_warps, num_stages=num_stages, **spec.options)

    def __call__(self, grid, args, values=None):
        self.fn[grid](*args, **self.kwargs)


class KernelLauncher:
    """Launches one registered kernel: `launcher(grid, args, constexprs)`.

    args: the kernel's non-constexpr arguments in order (tensors, ints, floats); grid: 3 ints;
    constexprs: a tuple of sorted (name, value) pairs, as `constexpr_key(spec.meta(...))` gives them."""

    def __init__(self, loader: "Loader", spec: KernelSpec):
        self.loader = loader
        self.spec = spec
        self.bind, self.arg_names = make_binder(spec, loader.arg_kinds(spec))
        self.memo: dict[tuple, Any] = {}
        self.lock = threading.Lock()
        self.get_device = loader.cuda_getDevice

    def __call__(self, grid, args, constexprs):
        """grid: a 3-tuple of ints. Fake or meta tensors (torch.compile's tracing, the custom ops' fake
        implementations in fusedlora.ops._custom) launch nothing: their outputs are already allocated."""
        if launches_nothing(args[0]):
            return
        device = args[0].get_device()
        if device < 0:
            return self._cpu(grid, args, constexprs)
        try:
            sig, values = self.bind(*args)
        except KeyError as e:
            raise TypeError(f"{self.spec.name}: unsupported tensor dtype {e.args[0]}") from None
        launch = self.memo.get((device, sig, constexprs))
        if launch is None:
            launch = self._resolve(device, sig, constexprs)
        if not (grid[0] and grid[1] and grid[2]):
            return
        if self.get_device() == device:
            launch(grid, args, values)
        else:
            with self.loader.device_guard(device):
                launch(grid, args, values)

    def _cpu(self, grid, args, constexprs):
        from csrc_triton._math import interpreter_on

        if not interpreter_on():
            raise ValueError(
                f"{self.spec.name}: argument {self.arg_names[0]} is a CPU tensor; fusedlora kernels "
                "need CUDA tensors (set TRITON_INTERPRET=1 to run them in Triton's CPU interpreter)"
            )
        num_warps, num_stages = self.spec.config(80, dict(constexprs))
        _JitLaunch(self.spec, dict(constexprs), num_warps, num_stages)(grid, args)

    def _resolve(self, device, sig, constexprs):
        with self.lock:
            key = (device, sig, constexprs)
            if key in self.memo:
                return self.memo[key]
            launch = self.loader.resolve(self.spec, device, sig, constexprs)
            self.memo[key] = launch
            return launch


class Loader:
    def __init__(self, dirs: list[Path] | None = None, driver=None):
        self.dirs = kernel_dirs() if dirs is None else list(dirs)
        self.force_jit = _env_flag("FUSEDLORA_JIT")
        self.aot_only = _env_flag("FUSEDLORA_AOT_ONLY")
        if self.force_jit and self.aot_only:
            raise ValueError("FUSEDLORA_JIT=1 and FUSEDLORA_AOT_ONLY=1 contradict each other")
        self._driver = driver
        self._tops = None
        self._folders: dict[str, list] = {}  # kernel -> its current-source folders (manifest.current_kernel_folders)
        self._kernels: dict[tuple, dict] = {}
        self.warn = FolderWarnings()  # one warning per kernel folder and reason, for this loader's lifetime
        self._launchers: dict[str, KernelLauncher] = {}
        self._archs: dict[int, int] = {}
        self._lock = threading.RLock()
        self.stats = {"aot": 0, "jit": 0}  # resolved keys per path, for info/tests
        self.paths: dict[str, str] = {}  # kernel -> how its latest new key was resolved (selfcheck)
        self.jit_variants: list[str] = []  # the variants triton.jit compiled: what a wheel lacked (benchmarks)
        self.jit_callers: list[str] = []  # where each of them was asked for (the model's and fusedlora's frames)
        import torch

        # Fast accessors (Triton uses the same); absent from CPU-only torch builds.
        self.cuda_getDevice = getattr(torch._C, "_cuda_getDevice", None)
        self.raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self.device_guard = torch.cuda.device

    # -- plumbing
    def driver(self):
        if self._driver is None:
            from ._cuda import driver

            self._driver = driver()
        return self._driver

    def _top(self):
        if self._tops is None:
            with self._lock:
                if self._tops is None:
                    self._tops = read_top_manifests(self.dirs, self.warn)
        return self._tops

    def kernel_folders(self, name: str) -> list:
        """(folder, kernel record) of the folders holding `name` built from its current source, read on first use."""
        got = self._folders.get(name)
        if got is None:
            with self._lock:
                got = self._folders.get(name)
                if got is None:
                    got = self._folders[name] = current_kernel_folders(self._top(), name, self.warn)
        return got

    def kernel_entries(self, name: str, archs: tuple[int, ...]):
        """key -> {arch: Entry} of one kernel for these archs, read and checked on first use."""
        got = self._kernels.get((name, archs))
        if got is None:
            with self._lock:
                got = self._kernels.get((name, archs))
                if got is None:
                    got = self._kernels[(name, archs)] = kernel_index(self.kernel_folders(name), name, archs, self.warn)
        return got

    def arg_kinds(self, spec: KernelSpec):
        """The kernel's argument kinds from a manifest of its current source (so the prebuilt path never imports
        triton); a stale folder's are another argument list."""
        if self.force_jit:
            return None
        folders = self.kernel_folders(spec.name)
        return [tuple(k) for k in folders[0][1]["arg_kinds"]] if folders else None

    def arch(self, device: int) -> int:
        arch = self._archs.get(device)
        if arch is None:
            import torch

            major, minor = torch.cuda.get_device_capability(device)
            arch = major * 10 + minor
            if arch < 80:
                raise RuntimeError(
                    f"fusedlora needs a GPU of compute capability 8.0 or newer; "
                    f"cuda:{device} is sm_{arch} ({torch.cuda.get_device_name(device)})"
                )
            self._archs[device] = arch
        return arch

    def launcher(self, name_or_spec) -> KernelLauncher:
        launcher = self._launchers.get(name_or_spec if isinstance(name_or_spec, str) else name_or_spec.name)
        if launcher is None:
            spec = registry.get(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
            with self._lock:
                launcher = self._launchers.setdefault(spec.name, KernelLauncher(self, spec))
        return launcher

    def launch_jit(self, spec: KernelSpec, grid, args, constexprs: dict, num_warps=None, num_stages=None):
        """One launch through triton.jit with explicit constexprs (and num_warps / num_stages, else the spec's
        config for this GPU): KernelSpec.override's path, for tuning sweeps."""
        if launches_nothing(args[0]):
            return
        device = args[0].get_device()
        arch = 80 if device < 0 else self.arch(device)
        warps, stages = spec.config(arch, dict(constexprs))
        _JitLaunch(spec, dict(constexprs), num_warps or warps, num_stages or stages)(grid, args)

    # -- resolution
    def find(self, spec: KernelSpec, arch: int, sig, constexprs):
        """Manifest entries matching the key, best first (exact arch, then compatible archs)."""
        archs = compatible_archs(arch)
        by_arch = self.kernel_entries(spec.name, archs).get((spec.name, sig, constexprs), {})
        return [by_arch[a] for a in archs if a in by_arch]

    def wanted_variant(self, spec: KernelSpec, arch: int, sig, constexprs) -> Variant:
        num_warps, num_stages = spec.config(arch, dict(constexprs))
        names = [n for n, k in (self.arg_kinds(spec) or spec.arg_kinds()) if k != "constexpr"]
        return Variant(spec.name, arch, tuple(zip(names, sig)), constexprs, num_warps, num_stages)

    def resolve(self, spec: KernelSpec, device: int, sig, constexprs):
        arch = self.arch(device)
        if not self.force_jit:
            for entry in self.find(spec, arch, sig, constexprs):
                launch = self._load(entry, device, sig)
                if launch is not None:
                    self.stats["aot"] += 1
                    self.paths[spec.name] = f"prebuilt sm_{entry.variant.arch}"
                    log.debug("fusedlora: %s on cuda:%d uses prebuilt %s", spec.name, device, entry.path.name)
                    return launch
        variant = self.wanted_variant(spec, arch, sig, constexprs)
        if self.aot_only and not compatible_archs(arch):
            raise MissingKernelError(
                f"FUSEDLORA_AOT_ONLY=1, but kernels are prebuilt for sm_{', sm_'.join(map(str, SUPPORTED_ARCHS))} "
                f"only and cuda:{device} is sm_{arch}: unset FUSEDLORA_AOT_ONLY to run {spec.name} through triton.jit"
            )
        if self.aot_only:
            raise MissingKernelError(
                f"FUSEDLORA_AOT_ONLY=1 and no prebuilt kernel matches {spec.name} on sm_{arch} "
                f"(searched {', '.join(map(str, self.dirs))}). Missing variant: {variant.to_string()}\n"
                f"Build it with: python -m fusedlora.build --variant '{variant.to_string()}'"
            )
        self.stats["jit"] += 1
        self.jit_variants.append(variant.to_string())
        self.jit_callers.append(_callers())
        self.paths[spec.name] = "triton.jit"
        log.debug("fusedlora: no prebuilt kernel for %s; using triton.jit (%s)", spec.name, variant.to_string())
        return _JitLaunch(spec, dict(constexprs), variant.num_warps, variant.num_stages)

    def _load(self, entry: Entry, device: int, sig):
        # The entry's ABI was checked against its signature when its manifest was read, and that is `sig`.
        image = entry.image(self.warn)
        if image is None:
            return None
        drv = self.driver()
        try:
            with self.device_guard(device):
                drv.ensure_context(device)
                func = drv.load_function(image, entry.name, entry.shared)
        except Exception as e:
            self.warn(
                entry.directory,
                FolderRefused(f"the driver could not load a cubin on cuda:{device}", f"{entry.file}: {e}"),
            )
            return None
        return _AotLaunch(self, func, entry, device, sig)


_loader: Loader | None = None
_loader_lock = threading.Lock()


def get_loader() -> Loader:
    global _loader
    if _loader is None:
        with _loader_lock:
            if _loader is None:
                _loader = Loader()
    return _loader


def reset(loader: Loader | None = None):
    """Drop the module cache and re-read the environment (tests; after building new kernels)."""
    global _loader
    with _loader_lock:
        _loader = loader


def launcher(name: str) -> KernelLauncher:
    return get_loader().launcher(name)


def constexpr_key(meta: dict) -> tuple:
    return tuple(sorted(meta.items()))


def launch(spec: KernelSpec, grid, args: tuple, **shape):
    """Launch `spec`'s kernel on torch's current stream: the constexprs of `shape`, the prebuilt cubin for this
    GPU when there is one, else triton.jit. Inside `spec.override(...)` (tuning) always triton.jit, with its
    settings."""
    over = spec.active_override()
    if over is not None:
        get_loader().launch_jit(spec, grid, args, spec.constexprs(**shape), over["num_warps"], over["num_stages"])
        return
    get_loader().launcher(spec.name)(grid, args, spec.constexprs_and_key(shape)[1])
