"""The types of the kernel registry: how a kernel is described once, for the JIT path and the AOT build alike.

A `KernelSpec` names a `@triton.jit` function of `csrc_triton` and declares, once:
- the element type of each pointer argument, through *dtype roles* (`"x"`, `"w"`…) or a fixed type;
- which integer arguments Triton specialises (16-divisibility, ==1) — the rest are the kernel's
  `do_not_specialize` list, read from the function itself so the two can never disagree;
- `meta(**shape)`: the constexprs for a problem shape — the op launcher calls it at run time and the
  AOT build calls it for every shape of the shape lists, so both pick the same variant;
- `config(arch, constexprs)`: num_warps / num_stages per GPU architecture;
- `aot_variants(family)`: the (dtypes, shape) combinations worth prebuilding for a model family.

A `Variant` is one fully bound compilation (kernel, arch, argument types with their specialisation,
constexprs, launch config). Its string form names a variant in error messages and on the command line
(`python -m fusedlora.build --variant ...`).

The registry entries (`csrc_triton/<op>/__init__.py`) describe their kernels with these types and `register`
them; `fusedlora.registry` is the collected table (it imports the entries), `fusedlora.loader.launch` launches
a KernelSpec. This module imports triton lazily (a kernel's source, by name) and never imports torch: the
wheel build runs it with triton alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from typing import Any, Callable, Iterable

# Triton element type names used in signatures, keyed by our short dtype names.
DTYPES = ("fp16", "bf16", "fp32", "i32", "i64", "u8", "i8", "i16")
# The one list of archs that fusedlora prebuilds and launches prebuilt: `python -m fusedlora.build`,
# `python -m build_tools.aot` and the loader all read it (another GPU runs triton.jit).
SUPPORTED_ARCHS = (80, 86, 89, 90)
# Triton's argument types of a kernel signature (the loader's binder produces the same).
SIGNATURE_TYPES = frozenset(
    {"1", "fp32", "i32", "i32:16", "i64", "i64:16"} | {f"*{d}{a}" for d in DTYPES for a in ("", ":16")}
)


def compatible_archs(gpu_arch: int) -> tuple[int, ...]:
    """The supported archs whose cubins run on a GPU of `gpu_arch`, best first. A cubin of X.y runs on X.z
    for z >= y, except that Triton builds sm_90 and newer for arch-specific targets (sm_90a): that arch only."""
    return tuple(
        a
        for a in sorted(SUPPORTED_ARCHS, reverse=True)
        if a // 10 == gpu_arch // 10 and a % 10 <= gpu_arch % 10 and (a < 90 or a == gpu_arch)
    )


COMPATIBLE_ARCHS = {g: compatible_archs(g) for g in range(80, 100) if compatible_archs(g)}  # by GPU arch


def parse_archs(text: str) -> list[int]:
    """The build commands' `--arch` ("90", "80,sm_86"): supported archs, or a ValueError saying what is expected."""
    supported = ", ".join(map(str, SUPPORTED_ARCHS))
    archs = []
    for item in str(text).split(","):
        digits = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not digits.isdigit():
            raise ValueError(
                f"expected comma-separated compute capabilities from {supported} (e.g. 90 or 80,86); got {text!r}"
            )
        if int(digits) not in archs:
            archs.append(int(digits))
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHS]
    if unsupported:
        too_old = "fusedlora needs sm_80 or newer; " if min(unsupported) < 80 else ""
        raise ValueError(
            f"unsupported arch {unsupported}: {too_old}kernels are prebuilt and loaded for {supported} "
            "only (other GPUs run fusedlora through triton.jit)"
        )
    return archs


_OVERRIDES: dict[str, dict] = {}  # kernel name -> launch settings of an active KernelSpec.override (tuning only)
REGISTERED: dict[str, "KernelSpec"] = {}  # kernel name -> spec, as the entries `register` them
_CONSTEXPRS: dict[tuple, tuple[dict, tuple]] = {}  # (kernel, shape) -> (constexprs, dispatch key): meta is pure


def _concrete(value):
    """A shape value as a plain Python scalar: torch.compile traces with symbolic sizes (SymInt / SymBool),
    and a kernel's constexprs need the value itself (this specialises the compiled graph on it)."""
    kind = type(value).__name__
    if kind == "SymInt":
        return int(value)
    if kind == "SymBool":
        return bool(value)
    if kind == "SymFloat":
        return float(value)
    return value


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    module: str  # csrc_triton module holding the function
    function: str  # name of the @triton.jit function in it
    pointer_types: dict[str, str]  # pointer arg -> dtype role or fixed dtype ("fp32")
    float_args: tuple[str, ...] = ()  # runtime float scalars (passed as fp32)
    meta: Callable[..., dict[str, Any]] = lambda **_: {}
    config: Callable[[int, dict[str, Any]], tuple[int, int]] = lambda arch, c: (4, 1)
    aot_variants: Callable[[dict[str, Any]], Iterable[tuple[dict[str, str], dict[str, Any]]]] = lambda f: ()
    doc: str = ""
    check: str = ""  # "module:function" of its self-check (fusedlora.selfcheck runs it)

    def constexprs(self, **shape) -> dict:
        """meta(**shape), computed once per shape (the op launchers size their grids from it), with the
        constexprs of an active `override` on top."""
        over = _OVERRIDES.get(self.name)
        if over is not None:
            return {**self.meta(**shape), **over["constexprs"]}
        return self.constexprs_and_key(shape)[0]

    @contextlib.contextmanager
    def override(self, num_warps: int | None = None, num_stages: int | None = None, **constexprs):
        """Inside the block this kernel's launches take `constexprs` over meta's and num_warps / num_stages
        over config's, through triton.jit: build_tools/tune.py sweeps a launch configuration through the op's
        own launcher this way (its arguments and grid are the op's, never hand-written)."""
        previous = _OVERRIDES.get(self.name)
        _OVERRIDES[self.name] = {"constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages}
        try:
            yield
        finally:
            if previous is None:
                _OVERRIDES.pop(self.name, None)
            else:
                _OVERRIDES[self.name] = previous

    def active_override(self) -> dict | None:
        """The launch settings of an enclosing `override` block ("constexprs", "num_warps", "num_stages"), else None."""
        return _OVERRIDES.get(self.name)

    def constexprs_and_key(self, shape: dict) -> tuple[dict, tuple]:
        """(meta(**shape), its dispatch key: the sorted items), cached per shape."""
        try:
            hit = _CONSTEXPRS.get((self.name, tuple(sorted(shape.items()))))
        except TypeError:  # a symbolic size under torch.compile's tracing is unhashable
            hit = None
        if hit is None:  # (plain values: stored under the same key below, so the next call hits above)
            key = (self.name, tuple(sorted((k, _concrete(v)) for k, v in shape.items())))
            hit = _CONSTEXPRS.get(key)
            if hit is None:
                meta = self.meta(**dict(key[1]))
                hit = _CONSTEXPRS[key] = (meta, tuple(sorted(meta.items())))
        return hit

    def source_sha256(self) -> str:
        """Fingerprint of the kernel's source (its module and csrc_triton's shared `_*.py` helpers), read
        without importing triton: prebuilt cubins of other sources are stale and never used."""
        import hashlib
        import importlib.util
        from pathlib import Path

        origin = Path(importlib.util.find_spec(self.module).origin)
        h = hashlib.sha256(origin.read_bytes())
        root = Path(importlib.util.find_spec("csrc_triton").origin).parent  # the shared device helpers live there
        for helper in sorted(root.glob("_*.py")):
            if helper.name != "__init__.py":
                h.update(helper.read_bytes())
        return h.hexdigest()

    @property
    def options(self) -> dict:
        """Extra Triton compile options of this kernel (its module's COMPILE_OPTIONS), for JIT and AOT."""
        return dict(getattr(importlib.import_module(self.module), "COMPILE_OPTIONS", {}).get(self.function, {}))

    @property
    def fn(self):
        """The JITFunction (imported on first use so that `import fusedlora` stays light)."""
        return getattr(importlib.import_module(self.module), self.function)

    def arg_kinds(self) -> list[tuple[str, str]]:
        """[(arg name, kind)] in declaration order; kind is ptr | float | int | int_nospec | constexpr."""
        import inspect

        fn = self.fn  # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
        params = list(inspect.signature(fn.fn).parameters.values())
        names = [p.name for p in params]
        dns = getattr(fn, "do_not_specialize", None)
        if dns is None:
            dns = getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
        nospec = {names[d] if isinstance(d, int) else d for d in dns}
        kinds = []
        for p in params:
            ann = p.annotation
            if ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann)):
                kinds.append((p.name, "constexpr"))
            elif p.name in self.pointer_types:
                kinds.append((p.name, "ptr"))
            elif p.name in self.float_args:
                kinds.append((p.name, "float"))
            else:
                kinds.append((p.name, "int_nospec" if p.name in nospec else "int"))
        return kinds

    def signature(self, dtypes: dict[str, str], int_spec: dict[str, str] | None = None) -> tuple[tuple[str, str], ...]:
        """Argument types for given dtype roles, as Triton's JIT would specialise them.

        Pointers are assumed 16-byte aligned (torch allocations are) and specialised ints 16-divisible
        unless `int_spec` says otherwise: "1", "" or "D", or the int's actual value."""
        int_spec = int_spec or {}
        sig = []
        for name, kind in self.arg_kinds():
            if kind == "constexpr":
                continue
            if kind == "ptr":
                role = self.pointer_types[name]
                dt = dtypes.get(role, role)
                if dt not in DTYPES:
                    raise ValueError(f"{self.name}: no dtype given for role {role!r} of argument {name}")
                sig.append((name, f"*{dt}:16"))
            elif kind == "float":
                sig.append((name, "fp32"))
            elif kind == "int_nospec":
                sig.append((name, "i32"))
            else:
                s = int_spec.get(name, "D")
                if isinstance(s, int):  # an actual value: specialise it as Triton would
                    s = "1" if s == 1 else ("D" if s % 16 == 0 else "")
                sig.append((name, "1" if s == "1" else ("i32:16" if s == "D" else "i32")))
        return tuple(sig)


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    arch: int
    signature: tuple[tuple[str, str], ...]  # non-constexpr args: (name, type) e.g. ("X", "*bf16:16")
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def key(self):
        """Dispatch key without the arch: what the launcher computes from its arguments."""
        return (self.kernel, tuple(t for _, t in self.signature), self.constexprs)

    def to_string(self) -> str:
        return json.dumps(
            {
                "kernel": self.kernel,
                "arch": self.arch,
                "signature": [list(p) for p in self.signature],
                "constexprs": [list(p) for p in self.constexprs],
                "num_warps": self.num_warps,
                "num_stages": self.num_stages,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_string(cls, s: str) -> "Variant":
        """The variant of a string `to_string` wrote; a ValueError saying what is wrong with any other."""
        try:
            d = json.loads(s)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"not JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        """A variant from its JSON form, checked field by field (a ValueError names the first bad one): manifests
        and the command line hand these in."""
        if not isinstance(d, dict):
            raise ValueError(f"a variant is a JSON object, not {type(d).__name__}")
        missing = [f for f in ("kernel", "arch", "signature", "constexprs", "num_warps", "num_stages") if f not in d]
        if missing:
            raise ValueError(f"the variant has no {', '.join(missing)}")
        if not isinstance(d["kernel"], str) or not d["kernel"]:
            raise ValueError(f"the variant's kernel is not a kernel name: {d['kernel']!r}")
        arch, num_warps, num_stages = (_whole(d, f) for f in ("arch", "num_warps", "num_stages"))
        if num_warps not in (1, 2, 4, 8, 16, 32) or num_stages < 1:
            raise ValueError(
                f"the variant's num_warps ({num_warps}) is not one of 1, 2, 4, 8, 16, 32 or its "
                f"num_stages ({num_stages}) is below 1"
            )
        # Lists of pairs, not objects: argument order is part of the ABI and JSON writers may sort keys.
        signature = _pairs(d, "signature", lambda t: t in SIGNATURE_TYPES, f"one of {sorted(SIGNATURE_TYPES)}")
        constexprs = _pairs(d, "constexprs", lambda v: isinstance(v, (int, float, str)), "a number, bool or string")
        return cls(
            kernel=d["kernel"],
            arch=arch,
            signature=signature,
            constexprs=constexprs,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    def file_stem(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.to_string().encode()).hexdigest()[:16]
        return f"{self.kernel}.sm{self.arch}.{digest}"


def _whole(d: dict, field: str) -> int:
    value = d[field]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the variant's {field} is not a whole number: {value!r}")
    return value


def _pairs(d: dict, field: str, value_ok, expected: str) -> tuple:
    """A variant's list of [name, value] pairs as a tuple of tuples."""
    items = d[field]
    bad = not isinstance(items, list)
    for item in [] if bad else items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and value_ok(item[1])):
            bad = True
            break
    if bad:
        raise ValueError(
            f"the variant's {field} is not a list of [name, value] pairs with values {expected}: {items!r}"
        )
    return tuple((n, v) for n, v in items)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in REGISTERED:
        raise ValueError(f"kernel {spec.name!r} registered twice")
    REGISTERED[spec.name] = spec
    return spec
