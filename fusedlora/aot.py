"""Ahead-of-time compilation of registered kernel variants into cubins plus a JSON manifest.

Runs with no GPU (Triton compiles for a `GPUTarget`). Used by `python -m build_tools.aot` (the wheel's
prebuilt set) and by `python -m fusedlora.build` (a user's kernel directory for new shapes).

sm_90: triton >= 3.7 assembles sm_90 with its CUDA 13.x ptxas (`ptxas-blackwell`), whose cubins need a
driver >= R580. We point it at the bundled CUDA 12.x ptxas instead (unless `ptxas13=True`), so that the
prebuilt sm_90 cubins load on the R525+ drivers that sm_80..89 cubins need too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

from . import registry
from .kernel_spec import Variant
from .manifest import expected_abi, write_manifests


def _bundled_ptxas() -> str | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else None


def compile_variant(variant_str: str, ptxas13: bool = False) -> dict:
    """Compile one variant; returns the manifest record plus the cubin bytes under "cubin"."""
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    from triton.compiler import ASTSource

    v = Variant.from_string(variant_str)
    spec = registry.get(v.kernel)
    fn = spec.fn
    if v.arch >= 90 and not ptxas13:
        bundled = _bundled_ptxas()
        if bundled:
            os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = bundled
    else:
        os.environ.pop("TRITON_PTXAS_BLACKWELL_PATH", None)
    sig_types = dict(v.signature)
    constexprs = dict(v.constexprs)
    signature, consts, attrs = {}, {}, {}
    for i, (name, kind) in enumerate(spec.arg_kinds()):
        if kind == "constexpr":
            if name not in constexprs:
                raise KeyError(
                    f"{v.kernel}: meta() gives no value for constexpr {name} (defaults are not "
                    "used: the launcher and the AOT build must name every constexpr)"
                )
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
            continue
        t = sig_types[name]
        if t == "1":  # an int equal to 1 is a constexpr to Triton: it leaves the ABI
            signature[name] = "constexpr"
            consts[(i,)] = 1
            continue
        base, _, div = t.partition(":")
        signature[name] = base
        if div == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(fn, signature, consts, attrs),
        target=GPUTarget("cuda", v.arch, 32),
        options={"num_warps": v.num_warps, "num_stages": v.num_stages, **spec.options},
    )
    md = k.metadata
    if (
        getattr(md, "num_ctas", 1) != 1
        or getattr(md, "launch_cooperative_grid", False)
        or getattr(md, "launch_pdl", False)
    ):
        raise RuntimeError(f"{v.kernel}: clusters, cooperative or PDL launches are not supported by the loader")
    cubin = k.asm["cubin"]
    ptx_version = re.search(r"^\.version (\d+\.\d+)", k.asm["ptx"], re.M)
    return {
        "variant": json.loads(v.to_string()),
        "file": v.file_stem() + ".cubin",
        "sha256": hashlib.sha256(cubin).hexdigest(),
        "bytes": len(cubin),
        "name": md.name,
        "shared": int(md.shared),
        "num_warps": int(md.num_warps),
        "num_stages": int(v.num_stages),
        "num_ctas": 1,
        "global_scratch_size": int(getattr(md, "global_scratch_size", 0) or 0),
        "global_scratch_align": int(getattr(md, "global_scratch_align", 1) or 1),
        "profile_scratch_size": int(getattr(md, "profile_scratch_size", 0) or 0),
        "abi": expected_abi(v),
        "triton_version": triton.__version__,
        "ptx_version": ptx_version.group(1) if ptx_version else None,
        "ptxas": "cuda13" if (v.arch >= 90 and ptxas13) else "bundled",
        "compile_s": round(time.perf_counter() - t0, 3),
        "source_sha256": spec.source_sha256(),
        "arg_kinds": [list(k) for k in spec.arg_kinds()],
        "cubin": cubin,
    }


def _worker(args):
    variant_str, ptxas13 = args
    try:
        return compile_variant(variant_str, ptxas13), None
    except Exception as e:  # reported with the variant, the build goes on and fails at the end
        return None, f"{variant_str}: {type(e).__name__}: {e}"


def _progress(total: int, quiet: bool):
    try:
        if quiet:
            raise ImportError
        from tqdm import tqdm

        return tqdm(total=total, unit="kernel", file=sys.stderr, dynamic_ncols=True)
    except ImportError:

        class Plain:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                if not quiet and (self.n % 25 == 0 or self.n == total):
                    print(f"  compiled {self.n}/{total}", file=sys.stderr, flush=True)

            def close(self):
                pass

        return Plain()


def build(
    variants: Iterable[Variant],
    out_dir: str | os.PathLike,
    jobs: int | None = None,
    ptxas13: bool = False,
    quiet: bool = False,
    merge: bool = True,
) -> dict:
    """Compile `variants` into `out_dir` (cubins + manifest.json). Returns a summary dict.

    With merge, entries already in the directory's manifest are kept unless rebuilt (the user dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(variants)
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    records, errors = [], []
    bar = _progress(len(variants), quiet)
    tasks = [(v.to_string(), ptxas13) for v in variants]
    if jobs == 1 or len(tasks) <= 1:
        results = map(_worker, tasks)
        pool = None
    else:
        import multiprocessing as mp

        # fork is fastest, but not from a process whose CUDA runtime has started threads (GPU tests).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") and "torch" not in sys.modules else "spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
        results = pool.map(_worker, tasks, chunksize=1)
    try:
        for rec, err in results:
            bar.update(1)
            if err:
                errors.append(err)
                continue
            (out / rec["file"]).write_bytes(rec.pop("cubin"))
            records.append(rec)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    write_manifests(out, records, merge)
    summary = {
        "variants": len(records),
        "errors": errors,
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes": sum(r["bytes"] for r in records),
        "out": str(out),
        "jobs": jobs,
        "archs": sorted({r["variant"]["arch"] for r in records}),
    }
    if not quiet:
        print(
            f"fusedlora AOT: {summary['variants']} variants for sm_{', sm_'.join(map(str, summary['archs']))} "
            f"in {summary['seconds']} s, {summary['bytes'] / 1e6:.2f} MB of cubins -> {out}"
            + (f"; {len(errors)} FAILED" if errors else ""),
            file=sys.stderr,
        )
        for e in errors:
            print("  failed: " + e, file=sys.stderr)
    return summary
