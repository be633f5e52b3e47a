"""The kernel manifest format, in one place: what the AOT build writes and the loader reads.

A kernel directory holds cubins, one `<kernel>.sm<arch>.json` per kernel and arch (its entries: variant,
file, sha256, shared memory, warps, scratch) and a top-level `manifest.json` (format, triton version, and per
kernel its source fingerprint, argument kinds and per-arch manifest files). The loader reads the top file
and then only the per-arch manifests of the kernels a job launches.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

from . import registry
from .registry import Variant

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 3


# ------------------------------------------------------------------------------------- reading
class Entry:
    """One prebuilt cubin listed in a manifest."""

    def __init__(self, directory: Path, record: dict):
        self.directory = directory
        self.record = record
        self.variant = Variant.from_dict(record["variant"])
        self.path = directory / record["file"]
        self.sha256 = record["sha256"]
        self.name = record["name"]
        self.shared = int(record["shared"])
        self.num_warps = int(record["num_warps"])
        self.global_scratch_size = int(record.get("global_scratch_size", 0))
        self.global_scratch_align = int(record.get("global_scratch_align", 1))
        self._image = None

    def image(self) -> bytes | None:
        """The cubin bytes if the file exists and matches its checksum, else None (warned)."""
        if self._image is None:
            try:
                data = self.path.read_bytes()
            except OSError as e:
                warnings.warn(f"fusedlora: prebuilt kernel {self.path} unreadable ({e}); using the JIT path",
                              RuntimeWarning, stacklevel=4)
                return None
            if hashlib.sha256(data).hexdigest() != self.sha256:
                warnings.warn(f"fusedlora: prebuilt kernel {self.path} fails its checksum; using the JIT path",
                              RuntimeWarning, stacklevel=4)
                return None
            self._image = data
        return self._image


def read_top_manifests(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """The small top-level manifest of each kernel directory that has one (broken ones warned and skipped)."""
    tops = []
    for d in dirs:
        mpath = d / MANIFEST
        if not mpath.is_file():
            continue
        try:
            top = json.loads(mpath.read_text())
            if top.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {top.get('format')!r}, expected {MANIFEST_FORMAT} (rebuild the kernels)")
            if not isinstance(top.get("kernels"), dict):
                raise ValueError("no kernels table")
        except Exception as e:  # a broken manifest must never break the op
            warnings.warn(f"fusedlora: ignoring kernel manifest {mpath}: {e}", RuntimeWarning, stacklevel=3)
            continue
        tops.append((d, top))
    return tops


def kernel_index(tops: list[tuple[Path, dict]], name: str, archs=None):
    """(key -> {arch: (dir, record)}, arg kinds or None) for one kernel across directories (earlier ones
    win), reading only the manifests of `archs` (all when None).

    A directory whose cubins of this kernel were built from another source (stale) is skipped, warned."""
    index: dict[tuple, dict[int, tuple]] = {}
    kinds = None
    current = None
    for d, top in tops:
        info = top["kernels"].get(name)
        if not info:
            continue
        if current is None:
            current = registry.get(name).source_sha256()
        if info.get("source_sha256") != current:
            warnings.warn(f"fusedlora: prebuilt {name} kernels in {d} were built from another source; ignoring them",
                          RuntimeWarning, stacklevel=3)
            continue
        if kinds is None and info.get("arg_kinds"):
            kinds = [tuple(k) for k in info["arg_kinds"]]
        for arch, fname in info.get("manifests", {}).items():
            if archs is not None and int(arch) not in archs:
                continue
            try:
                records = json.loads((d / fname).read_text())["entries"]
            except Exception as e:
                warnings.warn(f"fusedlora: ignoring kernel manifest {d / fname}: {e}", RuntimeWarning, stacklevel=3)
                continue
            for r in records:  # Entry objects are made only for the records a launch asks for
                v = r["variant"]
                key = (name, tuple(t for _, t in v["signature"]), tuple((n, c) for n, c in v["constexprs"]))
                index.setdefault(key, {}).setdefault(v["arch"], (d, r))
    return index, kinds


def read_index(dirs: list[Path]) -> dict[tuple, dict[int, Entry]]:
    """Every kernel's entries across `dirs` (tools and tests; the loader reads per kernel, lazily)."""
    tops = read_top_manifests(dirs)
    names = {n for _, top in tops for n in top["kernels"]}
    index: dict[tuple, dict[int, Entry]] = {}
    for name in sorted(names):
        if name in registry.all_kernels():
            for key, by_arch in kernel_index(tops, name)[0].items():
                index[key] = {arch: Entry(d, r) for arch, (d, r) in by_arch.items()}
    return index


# ------------------------------------------------------------------------------------- writing
def write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True))  # compact: read at first launch
    tmp.replace(path)


def write_manifests(out: Path, records: list[dict], merge: bool):
    """Write one manifest per kernel and arch (`<kernel>.sm<arch>.json`: the loader reads only those of
    the kernels a job calls, for its GPU's archs) and the top-level `manifest.json` index (build info,
    each kernel's source fingerprint, argument kinds and files). With merge, entries already there are
    kept unless rebuilt or stale."""
    import triton
    top = load_top_manifest(out) if merge else None
    kernels = dict(top["kernels"]) if top else {}
    by_kernel: dict[str, list[dict]] = {}
    for r in records:
        by_kernel.setdefault(r["variant"]["kernel"], []).append(r)
    for name, recs in by_kernel.items():
        source, kinds = recs[0]["source_sha256"], recs[0]["arg_kinds"]
        for r in recs:
            r.pop("source_sha256"), r.pop("arg_kinds")
        old = kernels.get(name)
        prev: list[dict] = []
        if old and old.get("source_sha256") == source:
            for f in old.get("manifests", {}).values():
                try:
                    prev += json.loads((out / f).read_text())["entries"]
                except (OSError, ValueError, KeyError):
                    pass
        new_files = {r["file"] for r in recs}
        entries = [r for r in prev if r["file"] not in new_files and (out / r["file"]).exists()] + recs
        per_arch: dict[int, list[dict]] = {}
        for r in entries:
            per_arch.setdefault(r["variant"]["arch"], []).append(r)
        manifests = {}
        for arch, rs in sorted(per_arch.items()):
            fname = f"{name}.sm{arch}.json"
            write_json(out / fname, {"format": MANIFEST_FORMAT, "kernel": name, "arch": arch,
                                      "entries": sorted(rs, key=lambda r: r["file"])})
            manifests[str(arch)] = fname
        kernels[name] = {"manifests": manifests, "source_sha256": source, "arg_kinds": kinds,
                         "variants": len(entries)}
    write_json(out / MANIFEST, {"format": MANIFEST_FORMAT, "triton_version": triton.__version__,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "kernels": kernels})


def load_top_manifest(out_dir: Path) -> dict | None:
    try:
        m = json.loads((out_dir / MANIFEST).read_text())
        return m if m.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError):
        return None
