"""The kernel manifest format, in one place: what the AOT build writes and the loader reads.

A kernel directory holds cubins, one `<kernel>.sm<arch>.json` per kernel and arch (its entries: variant,
file, sha256, shared memory, warps, scratch, ABI) and a top-level `manifest.json` (format, triton version, and
per kernel its source fingerprint, argument kinds and per-arch manifest files). The loader reads the top file
and then only the per-arch manifests of the kernels a job launches.

The contract of a kernel folder: its cubin is launched only when the entry's checksum, source hash, ABI,
Triton version and arch all match; anything else is left to triton.jit with one warning per folder and
reason. Each manifest is checked against the schema once, when read (never per launch); files are plain
names inside the folder, regular files of bounded size, neither links nor world-writable, and so is the folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

from . import registry
from .kernel_spec import Variant

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 3
SCRATCH_ABI = ["*i8", "*i8"]  # global scratch, profile scratch: appended by Triton to every kernel
# Triton releases whose cubins take the launch convention the loader packs (the arguments, then the two scratch
# pointers): 3.6 is fusedlora's oldest Triton, and a new major may change it. The installed Triton plays no part
# in a prebuilt launch, so it need not be the one that built the cubins.
TRITON_ABI_VERSIONS = ((3, 6), (4, 0))
TRITON_ABI_TEXT = (
    "a Triton release from {0[0]}.{0[1]} to before {1[0]}.{1[1]}, whose cubins the loader launches".format(
        *TRITON_ABI_VERSIONS
    )
)
MAX_FILE_BYTES = 64 << 20  # far above any manifest or cubin: a bound on a file that never ends
MAX_SHARED_BYTES = 256 << 10  # above the per-block shared memory of every supported GPU (227 KiB)
ARG_KINDS = ("ptr", "float", "int", "int_nospec", "constexpr")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ------------------------------------------------------------------------------------- checking
class FolderRefused(ValueError):
    """Why (part of) a kernel folder is not used: `reason`, one warning per folder and reason, and `detail`,
    where it was seen first."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f" ({detail})" if detail else ""))
        self.reason = reason


class FolderWarnings:
    """Warns once per (kernel folder, reason); the loader keeps one for its lifetime."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, folder, problem: FolderRefused):
        key = (str(folder), problem.reason)
        if key not in self.seen:
            self.seen.add(key)
            warnings.warn(
                f"fusedlora: kernel folder {folder}: {problem}; those kernels run through triton.jit",
                RuntimeWarning,
                stacklevel=2,
            )


def expected_abi(variant: Variant) -> list[str]:
    """The kernel parameters of a variant's cubin: its arguments but ints equal to 1, then the scratch pointers."""
    return [t for _, t in variant.signature if t != "1"] + SCRATCH_ABI


def triton_abi_ok(version) -> bool:
    numbers = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if numbers is None:
        return False
    low, high = TRITON_ABI_VERSIONS
    return low <= (int(numbers.group(1)), int(numbers.group(2))) < high


def plain_name(value, what: str, where: str = "") -> str:
    """`value` if it names a file directly inside the folder (no directory part, not absolute)."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or os.path.isabs(value)
    ):
        raise FolderRefused(
            f"{what} file name is not a plain name inside the folder", f"{where}: {value!r}" if where else repr(value)
        )
    return value


def read_inside(folder: Path, name, what: str) -> bytes:
    """The bytes of file `name` directly in `folder`: a regular file (no link, device or pipe), not
    world-writable, at most MAX_FILE_BYTES."""
    path = folder / plain_name(name, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderRefused(f"{what} is a symbolic link (it may lead outside the folder)", name) from None
        raise FolderRefused(f"{what} is unreadable", f"{name}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FolderRefused(f"{what} is not a regular file", name)
        if st.st_mode & stat.S_IWOTH:
            raise FolderRefused(f"{what} is world-writable (anyone could change it)", name)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise FolderRefused(f"{what} is larger than {MAX_FILE_BYTES >> 20} MiB", name)
    return data


def read_json(folder: Path, name: str) -> dict:
    data = read_inside(folder, name, "a kernel manifest")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise FolderRefused(f"ignoring kernel manifest {name}: not JSON", str(e)) from None
    if not isinstance(doc, dict):
        raise FolderRefused(f"ignoring kernel manifest {name}: not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise FolderRefused(
            f"ignoring kernel manifest {name}: format {doc.get('format')!r}, expected "
            f"{MANIFEST_FORMAT} (rebuild the kernels)"
        )
    return doc


def _checked(record: dict, field: str, ok, expected: str, where: str, default=None):
    """record[field] if `ok` accepts it (bools are no numbers here), else FolderRefused naming the field."""
    if field not in record and default is not None:
        return default
    if field not in record:
        raise FolderRefused(f"an entry has no {field}", where)
    value = record[field]
    if isinstance(value, bool) or not ok(value):
        raise FolderRefused(f"an entry's {field} is not {expected}", f"{where}: {value!r}")
    return value


def _whole_in(low: int, high: int):
    return lambda v: isinstance(v, int) and low <= v <= high


class Entry:
    """One prebuilt cubin listed in a manifest, its record checked against the schema."""

    def __init__(self, directory: Path, record: dict, kernel: str, arch: int, where: str = ""):
        """`where`: the manifest file and the entry's place in it, for the messages."""
        if not isinstance(record, dict):
            raise FolderRefused("an entry is not a JSON object", where)
        if "variant" not in record:
            raise FolderRefused("an entry has no variant", where)
        try:
            self.variant = Variant.from_dict(record["variant"])
        except ValueError as e:
            raise FolderRefused("an entry's variant is malformed", f"{where}: {e}") from None
        if (self.variant.kernel, self.variant.arch) != (kernel, arch):
            raise FolderRefused(
                f"an entry's variant is not of {kernel} for sm_{arch}",
                f"{where}: {self.variant.kernel}, sm_{self.variant.arch}",
            )
        self.directory = directory
        self.record = record
        self.file = plain_name(_checked(record, "file", lambda v: True, "", where), "an entry's", where)
        self.path = directory / self.file
        self.sha256 = _checked(
            record, "sha256", lambda v: isinstance(v, str) and _SHA256.match(v), "64 lower-case hex digits", where
        )
        self.name = _checked(
            record, "name", lambda v: isinstance(v, str) and _SYMBOL.match(v), "a kernel symbol", where
        )
        self.shared = _checked(
            record, "shared", _whole_in(0, MAX_SHARED_BYTES), f"a byte count from 0 to {MAX_SHARED_BYTES}", where
        )
        self.num_warps = _checked(
            record,
            "num_warps",
            lambda v: v in (1, 2, 4, 8, 16, 32) and isinstance(v, int),
            "one of 1, 2, 4, 8, 16, 32",
            where,
        )
        self.global_scratch_size = _checked(
            record, "global_scratch_size", _whole_in(0, 2**31), "a byte count", where, default=0
        )
        self.global_scratch_align = _checked(
            record,
            "global_scratch_align",
            lambda v: isinstance(v, int) and 1 <= v <= 4096 and not v & (v - 1),
            "a power of two up to 4096",
            where,
            default=1,
        )
        # The launch passes a null profile-scratch pointer and one CTA per program; a cubin from another Triton
        # release may want otherwise.
        _checked(record, "profile_scratch_size", lambda v: v == 0, "0 (no profiling build)", where, default=0)
        _checked(record, "num_ctas", lambda v: v == 1, "1", where, default=1)
        _checked(record, "triton_version", triton_abi_ok, TRITON_ABI_TEXT, where, default="3.6")
        abi = _checked(record, "abi", lambda v: isinstance(v, list), "a list", where)
        if abi != expected_abi(self.variant):
            raise FolderRefused(
                "an entry has ABI other than its signature's parameters and 2 scratch pointers",
                f"{where}: {abi}, expected {expected_abi(self.variant)}",
            )
        self._image = None

    def image(self, warn) -> bytes | None:
        """The cubin bytes if the file is sound and matches its checksum, else None (warned through `warn`)."""
        if self._image is None:
            try:
                data = read_inside(self.directory, self.file, "a cubin")
                if hashlib.sha256(data).hexdigest() != self.sha256:
                    raise FolderRefused("a cubin fails its checksum", self.file)
                self._image = data
            except FolderRefused as problem:
                warn(self.directory, problem)
                self._image = b""  # refused for good: not read again
        return self._image or None


def _top_manifest(folder: Path) -> dict | None:
    """The folder's checked top-level manifest, None where there is none."""
    if not folder.is_absolute():
        raise FolderRefused(
            "a relative path, not searched (it would load kernels from whatever the current "
            "directory is): give an absolute path"
        )
    try:
        st = os.stat(folder)
    except OSError:
        return None  # no such folder: nothing prebuilt there
    if not stat.S_ISDIR(st.st_mode) or not os.path.lexists(folder / MANIFEST):
        return None
    if st.st_mode & stat.S_IWOTH:
        raise FolderRefused("the folder is world-writable (anyone could put kernels in it)")
    top = read_json(folder, MANIFEST)
    if not triton_abi_ok(top.get("triton_version")):
        raise FolderRefused(
            f"ignoring kernel manifest {MANIFEST}: its triton_version is not {TRITON_ABI_TEXT} (rebuild the kernels)",
            repr(top.get("triton_version")),
        )
    if not isinstance(top.get("kernels"), dict):
        raise FolderRefused(f"ignoring kernel manifest {MANIFEST}: no kernels table")
    return top


def read_top_manifests(dirs: list[Path], warn=None) -> list[tuple[Path, dict]]:
    """The checked top-level manifest of each kernel directory that has one (refused ones warned and skipped)."""
    warn = warn or FolderWarnings()
    tops = []
    for d in map(Path, dirs):
        try:
            top = _top_manifest(d)
        except FolderRefused as problem:
            warn(d, problem)
            continue
        if top is not None:
            tops.append((d, top))
    return tops


def _kernel_table_entry(top: dict, name: str) -> dict | None:
    """The top manifest's checked record of kernel `name`, None if it lists none."""
    info = top["kernels"].get(name)
    if info is None:
        return None
    if not isinstance(info, dict):
        raise FolderRefused(f"ignoring kernel manifest {MANIFEST}: a kernels record is not an object", name)
    if not (isinstance(info.get("source_sha256"), str) and _SHA256.match(info["source_sha256"])):
        raise FolderRefused(f"ignoring kernel manifest {MANIFEST}: a kernel has no source_sha256", name)
    kinds = info.get("arg_kinds")
    if not (
        isinstance(kinds, list)
        and kinds
        and all(isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and k[1] in ARG_KINDS for k in kinds)
    ):
        raise FolderRefused(
            f"ignoring kernel manifest {MANIFEST}: a kernel's arg_kinds is not a list of [argument, "
            f"kind] pairs with kinds {', '.join(ARG_KINDS)}",
            f"{name}: {kinds!r}",
        )
    manifests = info.get("manifests")
    if not (isinstance(manifests, dict) and all(isinstance(a, str) and a.isdigit() for a in manifests)):
        raise FolderRefused(
            f"ignoring kernel manifest {MANIFEST}: a kernel's manifests is not a table of arch -> file", name
        )
    for fname in manifests.values():
        plain_name(fname, "a kernel manifest", name)
    return info


def current_kernel_folders(tops: list[tuple[Path, dict]], name: str, warn) -> list[tuple[Path, dict]]:
    """(folder, checked record of kernel `name`) of the folders whose `name` cubins were built from its current
    source, in search order; the others are warned (stale cubins and their argument lists are never used)."""
    current = None
    folders = []
    for d, top in tops:
        try:
            info = _kernel_table_entry(top, name)
            if info is None:
                continue
            if current is None:
                current = registry.get(name).source_sha256()
            if info["source_sha256"] != current:
                raise FolderRefused(
                    "kernels built from another source, not used (rebuild them with python -m fusedlora.build)", name
                )
        except FolderRefused as problem:
            warn(d, problem)
            continue
        folders.append((d, info))
    return folders


def kernel_index(folders: list[tuple[Path, dict]], name: str, archs, warn) -> dict[tuple, dict[int, Entry]]:
    """key -> {arch: Entry} of one kernel across `current_kernel_folders` (earlier ones win), reading only the
    manifests of `archs` (all when None). Each manifest and entry is checked here, once; a bad entry is warned
    and skipped, its neighbours kept."""
    index: dict[tuple, dict[int, Entry]] = {}
    for d, info in folders:
        for arch_text, fname in info["manifests"].items():
            arch = int(arch_text)
            if archs is not None and arch not in archs:
                continue
            try:
                doc = read_json(d, fname)
                if doc.get("kernel") != name or doc.get("arch") != arch:
                    raise FolderRefused(f"ignoring kernel manifest {fname}: it is not {name}'s for sm_{arch}")
                if not isinstance(doc.get("entries"), list):
                    raise FolderRefused(f"ignoring kernel manifest {fname}: its entries are not a list")
            except FolderRefused as problem:
                warn(d, problem)
                continue
            for i, record in enumerate(doc["entries"]):
                try:
                    entry = Entry(d, record, name, arch, f"{fname} entry {i}")
                except FolderRefused as problem:
                    warn(d, problem)
                    continue
                index.setdefault(entry.variant.key, {}).setdefault(arch, entry)
    return index


def read_index(dirs: list[Path]) -> dict[tuple, dict[int, Entry]]:
    """Every kernel's entries across `dirs` (tools and tests; the loader reads per kernel, lazily)."""
    warn = FolderWarnings()
    tops = read_top_manifests(dirs, warn)
    names = {n for _, top in tops for n in top["kernels"]}
    index: dict[tuple, dict[int, Entry]] = {}
    for name in sorted(names & set(registry.all_kernels())):
        index.update(kernel_index(current_kernel_folders(tops, name, warn), name, None, warn))
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
            write_json(
                out / fname,
                {
                    "format": MANIFEST_FORMAT,
                    "kernel": name,
                    "arch": arch,
                    "entries": sorted(rs, key=lambda r: r["file"]),
                },
            )
            manifests[str(arch)] = fname
        kernels[name] = {"manifests": manifests, "source_sha256": source, "arg_kinds": kinds, "variants": len(entries)}
    write_json(
        out / MANIFEST,
        {
            "format": MANIFEST_FORMAT,
            "triton_version": triton.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernels": kernels,
        },
    )


def load_top_manifest(out_dir: Path) -> dict | None:
    try:
        m = json.loads((out_dir / MANIFEST).read_text())
        return m if m.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError):
        return None
