"""Dispatch logic of the loader, with a fake CUDA driver and fake CUDA tensors (runs anywhere).

Covers: the dispatch key (dtypes, alignment, integer specialisation, constexprs), lookup order (exact
arch -> compatible arch -> JIT), FUSEDLORA_JIT / FUSEDLORA_AOT_ONLY, broken cubins and manifests,
launch parameters, per-thread argument slots and the arch check."""

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import sys
import threading
import warnings

import pytest
import torch

from fusedlora import loader as L
from fusedlora import registry
from fusedlora.aot import write_manifests
from fusedlora.loader import Loader, MissingKernelError, _JitLaunch

SPEC = registry.get("rms_norm_fwd")
N = 4096


class FakeTensor:
    def __init__(self, dtype, ptr=1 << 20, device=0):
        self.dtype, self.ptr, self.device = dtype, ptr, device

    def get_device(self):
        return self.device

    def data_ptr(self):
        return self.ptr


class FakeDriver:
    def __init__(self):
        self.loaded, self.launches, self.fail_load = [], [], False
        self.lock = threading.Lock()

    def ensure_context(self, device):
        pass

    def load_function(self, image, name, shared):
        if self.fail_load:
            raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU")
        self.loaded.append((image, name, shared))
        return ctypes.c_void_p(len(self.loaded))

    def check(self, code, call):
        raise RuntimeError(f"{call} failed {code}")

    def cuLaunchKernel(self, func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        n = len(params)
        vals = []
        for i in range(n):  # read each slot back through the pointer array the kernel would see
            addr = params[i]
            vals.append(addr)
        with self.lock:
            self.launches.append(
                {
                    "func": func.value,
                    "grid": (gx, gy, gz),
                    "block": bx,
                    "shared": shared,
                    "stream": stream.value,
                    "params": params,
                    "n": n,
                }
            )
        return 0


def fwd_args(dtype=torch.bfloat16, rows=37, ptr=1 << 20, stride=N):
    x = FakeTensor(dtype, ptr)
    return (
        x,
        FakeTensor(dtype, ptr + 4096 * 64),
        FakeTensor(dtype, ptr + 4096 * 128),
        FakeTensor(torch.float32, ptr + 4096 * 256),
        stride,
        stride,
        rows,
        N,
        1e-6,
        0.0,
    )


def meta_key(n=N, gemma=False):
    return L.constexpr_key(SPEC.meta(n_cols=n, gemma_cast=gemma))


def make_dir(tmp_path, archs, dtype="bf16", corrupt=False, name="k", source=None):
    d = tmp_path / name
    d.mkdir()
    records = []
    for arch in archs:
        v = registry.make_variant(SPEC, arch, {"x": dtype, "w": dtype, "y": dtype}, {"n_cols": N, "gemma_cast": False})
        image = f"\x7fELF fake cubin sm_{arch} from {name}".encode()
        (d / (v.file_stem() + ".cubin")).write_bytes(image)
        records.append(
            {
                "variant": json.loads(v.to_string()),
                "file": v.file_stem() + ".cubin",
                "sha256": hashlib.sha256(b"other" if corrupt else image).hexdigest(),
                "name": "rms_norm_fwd_kernel",
                "shared": 64,
                "num_warps": v.num_warps,
                "abi": [t for _, t in v.signature if t != "1"] + ["*i8", "*i8"],
            }
        )
    for r in records:
        r["source_sha256"] = source or SPEC.source_sha256()
        r["arg_kinds"] = [list(k) for k in SPEC.arg_kinds()]
    write_manifests(d, records, merge=False)
    return d


@pytest.fixture
def jit_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(_JitLaunch, "__call__", lambda self, grid, args, values=None: calls.append((grid, args)))
    return calls


def make_loader(dirs, arch, monkeypatch=None):
    ld = Loader(dirs=dirs, driver=FakeDriver())
    ld._archs[0] = arch
    ld.cuda_getDevice = lambda: 0  # read by launchers created after this
    ld.raw_stream = lambda device: 0xABC
    ld.device_guard = lambda device: contextlib.nullcontext()
    return ld


def launch(ld, args=None, key=None, grid=(37, 1, 1)):
    ld.launcher(SPEC)(grid, args or fwd_args(), key or meta_key())


def test_variant_string_round_trip_keeps_argument_order():
    v = registry.make_variant(SPEC, 90, {"x": "bf16", "w": "bf16", "y": "bf16"}, {"n_cols": 5120, "gemma_cast": True})
    again = registry.Variant.from_string(json.loads(json.dumps(v.to_string())))
    assert again == v and [n for n, _ in again.signature][:4] == ["X", "W", "Y", "RSTD"]


def test_binder_follows_triton_specialisation():
    bind, names = L.make_binder(SPEC)
    sig, vals = bind(*fwd_args())
    assert sig == ("*bf16:16", "*bf16:16", "*bf16:16", "*fp32:16", "i32:16", "i32:16", "i32", "i32:16", "fp32", "fp32")
    sig, vals = bind(*fwd_args(ptr=(1 << 20) + 2, stride=1, rows=2**31))
    assert sig[:4] == ("*bf16", "*bf16", "*bf16", "*fp32")  # every fake pointer shares the +2 offset
    assert sig[4] == "1" and sig[6] == "i64"  # an int equal to 1 leaves the ABI; huge row counts are i64
    assert names[0] == "X" and vals[6] == 2**31


def test_launcher_key_matches_the_aot_variant(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    launch(ld)
    assert ld.stats == {"aot": 1, "jit": 0} and not jit_calls
    rec = ld.driver().launches[0]
    assert rec["grid"] == (37, 1, 1) and rec["shared"] == 64 and rec["stream"] == 0xABC
    assert rec["block"] == 32 * SPEC.config(90, dict(meta_key()))[0]
    assert rec["n"] == 10 + 2  # ten kernel arguments and the two scratch pointers


def _params(state):
    """Decode the kernel parameters a launch passes, through the pointer array as the driver reads it."""
    buf, params, _ = state
    return params


def test_launch_passes_argument_values(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    args = fwd_args(rows=12345)
    launch(ld, args)
    params = ld.driver().launches[0]["params"]
    read = [ctypes.c_uint64.from_address(params[i]).value for i in range(4)]
    read += [ctypes.c_int32.from_address(params[i]).value for i in range(4, 8)]
    read += [ctypes.c_float.from_address(params[i]).value for i in range(8, 10)]
    read += [ctypes.c_uint64.from_address(params[i]).value for i in range(10, 12)]
    assert read[:4] == [a.ptr for a in args[:4]]
    assert read[4:8] == [N, N, 12345, N]
    assert read[8] == pytest.approx(1e-6) and read[9] == 0.0
    assert read[10:] == [0, 0]  # no scratch needed: null pointers
    assert all(params[i] % 4 == 0 for i in range(12)) and all(params[i] % 8 == 0 for i in range(4))


def test_int_equal_to_one_leaves_the_abi(tmp_path, jit_calls):
    """A prebuilt variant with a specialised int == 1 gets one parameter fewer, and the others shift."""
    d = tmp_path / "one"
    d.mkdir()
    v = registry.make_variant(
        SPEC,
        90,
        {"x": "bf16", "w": "bf16", "y": "bf16"},
        {"n_cols": N, "gemma_cast": False},
        int_spec={"y_row_stride": "1"},
    )
    image = b"\x7fELF one"
    (d / "one.cubin").write_bytes(image)
    rec = {
        "variant": json.loads(v.to_string()),
        "file": "one.cubin",
        "sha256": hashlib.sha256(image).hexdigest(),
        "name": "rms_norm_fwd_kernel",
        "shared": 0,
        "num_warps": v.num_warps,
        "abi": [t for _, t in v.signature if t != "1"] + ["*i8", "*i8"],
    }
    rec["source_sha256"] = SPEC.source_sha256()
    rec["arg_kinds"] = [list(k) for k in SPEC.arg_kinds()]
    write_manifests(d, [rec], merge=False)
    ld = make_loader([d], 90)
    args = list(fwd_args(rows=77))
    args[5] = 1
    launch(ld, tuple(args))
    assert ld.stats["aot"] == 1
    rec = ld.driver().launches[0]
    params = rec["params"]
    assert rec["n"] == 9 + 2
    assert ctypes.c_int32.from_address(params[4]).value == N  # x_row_stride
    assert ctypes.c_int32.from_address(params[5]).value == 77  # n_rows (y_row_stride is gone)


@pytest.mark.parametrize(
    "gpu_arch,available,expected",
    [
        (89, [80, 86, 89], 89),
        (89, [80, 86], 86),
        (86, [80], 80),
        (89, [80], 80),
        (90, [80, 86, 89, 90], 90),
        (90, [80, 86, 89], None),
        (80, [86, 89, 90], None),
        (120, [80, 90], None),
    ],
)
def test_lookup_order(tmp_path, jit_calls, gpu_arch, available, expected):
    ld = make_loader([make_dir(tmp_path, available)], gpu_arch)
    launch(ld)
    if expected is None:
        assert ld.stats == {"aot": 0, "jit": 1} and len(jit_calls) == 1
    else:
        image = ld.driver().loaded[0][0]
        assert f"sm_{expected}".encode() in image and ld.stats["aot"] == 1 and not jit_calls


def test_first_directory_wins(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90], name="user"), make_dir(tmp_path, [90], name="wheel")], 90)
    launch(ld)
    assert b"from user" in ld.driver().loaded[0][0]


def test_miss_falls_back_to_jit_logged_once(tmp_path, jit_calls, caplog):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    caplog.set_level(logging.DEBUG, logger="fusedlora")
    for _ in range(3):
        launch(ld, fwd_args(dtype=torch.float16))  # no fp16 variant in the directory
    assert len(jit_calls) == 3 and ld.stats["jit"] == 1
    assert sum("no prebuilt kernel for rms_norm_fwd" in r.message for r in caplog.records) == 1


def test_misaligned_pointer_is_a_different_key(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    launch(ld, fwd_args(ptr=(1 << 20) + 8))
    assert ld.stats == {"aot": 0, "jit": 1}


def test_aot_only_miss_names_variant_and_command(tmp_path, monkeypatch, jit_calls):
    monkeypatch.setenv("FUSEDLORA_AOT_ONLY", "1")
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    with pytest.raises(MissingKernelError) as e:
        launch(ld, fwd_args(dtype=torch.float16))
    msg = str(e.value)
    assert "rms_norm_fwd on sm_90" in msg and "python -m fusedlora.build --variant" in msg
    variant = registry.Variant.from_string(msg.split("--variant '")[1].rstrip("'"))
    assert variant.arch == 90 and dict(variant.signature)["X"] == "*fp16:16"
    assert variant == registry.make_variant(
        SPEC, 90, {"x": "fp16", "w": "fp16", "y": "fp16"}, {"n_cols": N, "gemma_cast": False}
    )
    launch(ld)  # the prebuilt bf16 variant still works under AOT_ONLY
    assert ld.stats["aot"] == 1


def test_force_jit(tmp_path, monkeypatch, jit_calls):
    monkeypatch.setenv("FUSEDLORA_JIT", "1")
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    launch(ld)
    assert ld.stats == {"aot": 0, "jit": 1} and not ld.driver().loaded


def test_contradicting_flags(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_JIT", "1")
    monkeypatch.setenv("FUSEDLORA_AOT_ONLY", "1")
    with pytest.raises(ValueError, match="contradict"):
        Loader(dirs=[])


def test_checksum_mismatch_warns_and_uses_jit(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90], corrupt=True)], 90)
    with pytest.warns(RuntimeWarning, match="fails its checksum"):
        launch(ld)
    assert ld.stats == {"aot": 0, "jit": 1} and len(jit_calls) == 1
    # the report names who asked for the variant: this test's frame, innermost the launch helper's caller
    assert len(ld.jit_callers) == 1 and "test_checksum_mismatch_warns_and_uses_jit" in ld.jit_callers[0], ld.jit_callers


def test_missing_cubin_file_warns_and_uses_jit(tmp_path, jit_calls):
    d = make_dir(tmp_path, [90])
    for f in d.glob("*.cubin"):
        f.unlink()
    ld = make_loader([d], 90)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        launch(ld)
    assert ld.stats["jit"] == 1


def test_driver_refusing_the_cubin_warns_and_uses_jit(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    ld.driver().fail_load = True
    with pytest.warns(RuntimeWarning, match="could not load"):
        launch(ld)
    assert ld.stats["jit"] == 1


def test_corrupt_manifest_is_ignored_with_a_warning(tmp_path, jit_calls):
    d = make_dir(tmp_path, [90])
    (d / "manifest.json").write_text("{not json")
    ld = make_loader([d], 90)
    with pytest.warns(RuntimeWarning, match="ignoring kernel manifest"):
        launch(ld)
    assert ld.stats["jit"] == 1


def test_abi_mismatch_is_refused(tmp_path, jit_calls):
    d = make_dir(tmp_path, [90])
    m = json.loads((d / "rms_norm_fwd.sm90.json").read_text())
    m["entries"][0]["abi"] = m["entries"][0]["abi"][1:]
    (d / "rms_norm_fwd.sm90.json").write_text(json.dumps(m))
    ld = make_loader([d], 90)
    with pytest.warns(RuntimeWarning, match="has ABI"):
        launch(ld)
    assert ld.stats["jit"] == 1


def test_empty_grid_launches_nothing(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    launch(ld, grid=(0, 1, 1))
    assert not ld.driver().launches


def test_unsupported_dtype_is_named(tmp_path):
    ld = make_loader([], 90)
    args = list(fwd_args())
    args[0] = FakeTensor(torch.complex64)
    with pytest.raises(TypeError, match="unsupported tensor dtype torch.complex64"):
        launch(ld, tuple(args))


def test_old_gpu_is_refused(monkeypatch):
    ld = Loader(dirs=[], driver=FakeDriver())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer; cuda:0 is sm_75 \\(Tesla T4\\)"):
        ld.arch(0)


def test_threads_get_their_own_slots(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90])], 90)
    seen, errors = {}, []

    def worker(i):
        try:
            for _ in range(50):
                launch(ld, fwd_args(rows=1000 + i))
            aot = next(iter(ld.launcher(SPEC).memo.values()))
            seen[i] = ctypes.c_int32.from_address(aot.tls.state[1][6]).value
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and seen == {i: 1000 + i for i in range(4)}
    assert len(ld.driver().loaded) == 1 and len(ld.driver().launches) == 200


def test_stale_cubins_are_ignored(tmp_path, jit_calls):
    ld = make_loader([make_dir(tmp_path, [90], source="0" * 64)], 90)
    with pytest.warns(RuntimeWarning, match="built from another source"):
        launch(ld)
    assert ld.stats == {"aot": 0, "jit": 1}


PREBUILT_PATH_WITHOUT_TRITON = r"""
import sys, contextlib, torch
sys.path.insert(0, {tests!r})
import test_loader as T
from pathlib import Path
assert "triton" not in sys.modules
d = Path({tmp!r})
ld = T.make_loader([d], 90)
T.launch(ld)
assert ld.stats == {{"aot": 1, "jit": 0}}, ld.stats
assert "triton" not in sys.modules, "the prebuilt path imported triton"
print("ok")
"""


def test_prebuilt_path_does_not_import_triton(tmp_path):
    """Importing triton costs 100+ ms: the first call of a prebuilt kernel must not pay it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    d = make_dir(tmp_path, [90])
    tests = str(Path(__file__).parent)
    code = PREBUILT_PATH_WITHOUT_TRITON.format(tests=tests, tmp=str(d))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_JIT")}
    env["PYTHONPATH"] = str(Path(tests).parent) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_only_the_gpus_arch_manifests_are_read(tmp_path, jit_calls):
    d = make_dir(tmp_path, [80, 86, 90])
    (d / "rms_norm_fwd.sm80.json").write_text("{broken")  # never opened on an sm_90 GPU
    ld = make_loader([d], 90)
    launch(ld)
    assert ld.stats == {"aot": 1, "jit": 0}


# ----------------------------------------------------------------------------------------------------
# The kernel-folder contract (issue 34, item 9), with the fake CUDA driver above.
#
# A folder's cubin is launched only when its entry's checksum, source hash, ABI, Triton version and arch all
# match; anything else falls back to triton.jit with one warning naming the folder and the reason; never a
# path outside the folder, never a crash. Each manifest is checked once, when it is read.

ARCH_MANIFEST = "rms_norm_fwd.sm90.json"


def edit_json(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def edit_entry(folder, change):
    edit_json(folder / ARCH_MANIFEST, lambda m: change(m["entries"][0]))


def launch_refused(ld, folder, *reason_words):
    """Launch once: the JIT path runs, with exactly one RuntimeWarning naming `folder` and the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launch(ld)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "fusedlora" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert str(folder) in message, message
    for word in reason_words:
        assert word in message, message
    assert ld.stats == {"aot": 0, "jit": 1}, ld.stats
    assert not ld.driver().loaded
    return message


# ------------------------------------------------------------------ paths stay inside the folder
@pytest.mark.parametrize("place", ["parent", "absolute"])
def test_cubin_outside_the_folder_is_refused(tmp_path, jit_calls, place):
    folder = make_dir(tmp_path, [90])
    inside = json.loads((folder / ARCH_MANIFEST).read_text())["entries"][0]["file"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.cubin").write_bytes((folder / inside).read_bytes())  # same checksum as the listed cubin
    target = "../outside/evil.cubin" if place == "parent" else str(outside / "evil.cubin")
    edit_entry(folder, lambda e: e.update(file=target))
    (folder / inside).unlink()
    launch_refused(make_loader([folder], 90), folder, "file name")


def test_device_file_is_never_read(tmp_path, jit_calls):
    """`"file": "/dev/zero"` (or a link to it inside the folder) must not be read: it never ends."""
    folder = make_dir(tmp_path, [90])
    edit_entry(folder, lambda e: e.update(file="/dev/zero"))
    launch_refused(make_loader([folder], 90), folder, "file name")


def test_link_to_a_device_inside_the_folder_is_never_read(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    inside = json.loads((folder / ARCH_MANIFEST).read_text())["entries"][0]["file"]
    (folder / inside).unlink()
    os.symlink("/dev/zero", folder / inside)
    launch_refused(make_loader([folder], 90), folder, inside)


def test_arch_manifest_outside_the_folder_is_refused(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / ARCH_MANIFEST).rename(elsewhere / ARCH_MANIFEST)
    edit_json(
        folder / "manifest.json",
        lambda top: top["kernels"]["rms_norm_fwd"]["manifests"].update({"90": f"../elsewhere/{ARCH_MANIFEST}"}),
    )
    launch_refused(make_loader([folder], 90), folder, "file name")


# ------------------------------------------------------------------ the schema, checked once per manifest
ENTRY_DEFECTS = {
    "no sha256": (lambda e: e.pop("sha256"), "sha256"),
    "no name": (lambda e: e.pop("name"), "name"),
    "no shared": (lambda e: e.pop("shared"), "shared"),
    "no num_warps": (lambda e: e.pop("num_warps"), "num_warps"),
    "no file": (lambda e: e.pop("file"), "file"),
    "no variant": (lambda e: e.pop("variant"), "variant"),
    "no abi": (lambda e: e.pop("abi"), "abi"),
    "sha256 a number": (lambda e: e.update(sha256=12), "sha256"),
    "name a list": (lambda e: e.update(name=["rms_norm_fwd_kernel"]), "name"),
    "shared a word": (lambda e: e.update(shared="lots"), "shared"),
    "num_warps a word": (lambda e: e.update(num_warps="four"), "num_warps"),
    "file a number": (lambda e: e.update(file=7), "file"),
    "variant a string": (lambda e: e.update(variant="rms_norm_fwd"), "variant"),
    "variant without signature": (lambda e: e["variant"].pop("signature"), "signature"),
    "num_warps 0": (lambda e: e.update(num_warps=0), "num_warps"),
    "shared -5": (lambda e: e.update(shared=-5), "shared"),
    "scratch size -1": (lambda e: e.update(global_scratch_size=-1), "global_scratch_size"),
    "profiling build": (lambda e: e.update(profile_scratch_size=64), "profile_scratch_size"),
    "two CTAs": (lambda e: e.update(num_ctas=2), "num_ctas"),
    "entry from triton 2.0.0": (lambda e: e.update(triton_version="2.0.0"), "triton_version"),
}


@pytest.mark.parametrize("defect", sorted(ENTRY_DEFECTS))
def test_bad_entry_is_refused_with_its_field_named(tmp_path, jit_calls, defect):
    change, field = ENTRY_DEFECTS[defect]
    folder = make_dir(tmp_path, [90])
    edit_entry(folder, change)
    launch_refused(make_loader([folder], 90), folder, field)


def test_entries_not_a_list_is_refused(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    edit_json(folder / ARCH_MANIFEST, lambda m: m.update(entries={"0": m["entries"][0]}))
    launch_refused(make_loader([folder], 90), folder, "entries")


@pytest.mark.parametrize("version", ["2.0.0", "4.1.0", "three", None])
def test_triton_version_outside_the_launch_abi_is_refused(tmp_path, jit_calls, version):
    folder = make_dir(tmp_path, [90])
    edit_json(folder / "manifest.json", lambda top: top.update(triton_version=version))
    launch_refused(make_loader([folder], 90), folder, "triton_version")


def test_arg_kinds_mistyped_is_refused(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    edit_json(folder / "manifest.json", lambda top: top["kernels"]["rms_norm_fwd"].update(arg_kinds=[["X", 3]]))
    launch_refused(make_loader([folder], 90), folder, "arg_kinds")


def test_one_warning_per_folder_and_reason(tmp_path, jit_calls):
    """Two bad entries and several launches: the manifest is checked once and warned about once."""
    folder = make_dir(tmp_path, [90])
    fp16 = make_dir(tmp_path, [90], dtype="fp16", name="fp16")
    entries = json.loads((folder / ARCH_MANIFEST).read_text())["entries"]
    extra = json.loads((fp16 / ARCH_MANIFEST).read_text())["entries"]
    for e in entries + extra:
        e.pop("abi")
    edit_json(folder / ARCH_MANIFEST, lambda m: m.update(entries=entries + extra))
    ld = make_loader([folder], 90)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            launch(ld)
            launch(ld, fwd_args(dtype=torch.float16))
    assert [str(w.message).count("abi") > 0 for w in caught] == [True]
    assert ld.stats == {"aot": 0, "jit": 2}


def test_a_valid_entry_beside_a_bad_one_still_loads(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    good = json.loads((folder / ARCH_MANIFEST).read_text())["entries"][0]
    bad = dict(good, file="../x.cubin", variant=dict(good["variant"], constexprs=[["BLOCK", 1]]))
    edit_json(folder / ARCH_MANIFEST, lambda m: m.update(entries=[bad, good]))
    ld = make_loader([folder], 90)
    with pytest.warns(RuntimeWarning, match="file name"):
        launch(ld)
    assert ld.stats == {"aot": 1, "jit": 0}


# ------------------------------------------------------------------ argument kinds only from current sources
def test_stale_folder_does_not_give_the_argument_list(tmp_path, jit_calls):
    """A folder built from an older kernel source (another argument list) comes first: its arg_kinds must not
    shape the launcher's binder (`bind() takes 4 positional arguments but 5 were given` on every launch)."""
    stale = make_dir(tmp_path, [90], source="0" * 64, name="old")
    older_kinds = [k for k in SPEC.arg_kinds() if k[0] != "offset"]  # one runtime argument fewer
    edit_json(stale / "manifest.json", lambda top: top["kernels"]["rms_norm_fwd"].update(arg_kinds=older_kinds))
    current = make_dir(tmp_path, [90], name="new")
    ld = make_loader([stale, current], 90)
    with pytest.warns(RuntimeWarning, match="built from another source"):
        launch(ld)
    assert ld.stats == {"aot": 1, "jit": 0} and b"from new" in ld.driver().loaded[0][0]
    ld = make_loader([stale], 90)
    launch_refused(ld, stale, "built from another source")


# ------------------------------------------------------------------ which folders are searched
def test_relative_kernel_path_entry_is_not_searched(tmp_path, jit_calls, monkeypatch):
    """`FUSEDLORA_KERNEL_PATH=kernels` must not load whatever `kernels/manifest.json` the working directory has."""
    make_dir(tmp_path, [90], name="kernels")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSEDLORA_KERNEL_PATH", "kernels")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "PREBUILT_DIR", tmp_path / "no_prebuilt")
    launch_refused(make_loader(None, 90), "kernels", "relative")


def test_relative_cache_home_is_ignored(tmp_path, monkeypatch):
    """The XDG base-directory rule: a relative XDG_CACHE_HOME is invalid and ignored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    assert L.user_kernel_dir().is_absolute()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_world_writable_folder_is_refused(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    folder.chmod(0o777)
    launch_refused(make_loader([folder], 90), folder, "world-writable")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_world_writable_manifest_is_refused(tmp_path, jit_calls):
    folder = make_dir(tmp_path, [90])
    (folder / ARCH_MANIFEST).chmod(0o666)
    launch_refused(make_loader([folder], 90), folder, "world-writable")


# ------------------------------------------------------------------ one supported-arch list
def test_every_supported_arch_is_served_by_its_own_cubins():
    for arch in registry.SUPPORTED_ARCHS:
        assert registry.compatible_archs(arch)[0] == arch
    for arch in (75, 100, 103, 120, 121):
        assert all(a in registry.SUPPORTED_ARCHS for a in registry.compatible_archs(arch))
    assert registry.compatible_archs(89) == (89, 86, 80) and registry.compatible_archs(90) == (90,)
    assert registry.compatible_archs(100) == () and registry.compatible_archs(120) == ()


@pytest.mark.parametrize("arch", [100, 120])
def test_aot_only_on_an_arch_without_prebuilt_kernels_says_so(tmp_path, jit_calls, monkeypatch, arch):
    """No build can serve sm_100 / sm_120: the error must not tell the user to build one."""
    monkeypatch.setenv("FUSEDLORA_AOT_ONLY", "1")
    ld = make_loader([make_dir(tmp_path, [90])], arch)
    with pytest.raises(L.MissingKernelError) as e:
        launch(ld)
    msg = str(e.value)
    assert f"sm_{arch}" in msg and "fusedlora.build" not in msg and "FUSEDLORA_AOT_ONLY" in msg
    for supported in registry.SUPPORTED_ARCHS:
        assert f"sm_{supported}" in msg


@pytest.mark.parametrize("arch", ["100", "120", "75", "sm_100"])
def test_both_build_commands_refuse_an_arch_the_loader_cannot_use(tmp_path, monkeypatch, capsys, arch):
    from fusedlora import aot, build

    sys.path.insert(0, str(L.Path(__file__).resolve().parent.parent))
    from build_tools import aot as build_tools_aot

    built = []
    monkeypatch.setattr(aot, "build", lambda *a, **k: built.append(a) or {"errors": []})
    for main, argv in (
        (build.main, ["--config", '{"hidden_size": 64}', "--out", str(tmp_path / "k")]),
        (build_tools_aot.main, ["--family", "ci", "--out", str(tmp_path / "w")]),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--arch", f"90,{arch}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--arch" in err and "80, 86, 89, 90" in err, err
    assert not built


def test_both_build_commands_accept_every_supported_arch(tmp_path, monkeypatch):
    from fusedlora import aot, build

    sys.path.insert(0, str(L.Path(__file__).resolve().parent.parent))
    from build_tools import aot as build_tools_aot

    built = []
    monkeypatch.setattr(
        aot, "build", lambda variants, *a, **k: built.append({v.arch for v in variants}) or {"errors": []}
    )
    archs = ",".join(f"sm_{a}" for a in registry.SUPPORTED_ARCHS)
    assert build.main(["--config", '{"hidden_size": 64}', "--arch", archs, "--out", str(tmp_path / "k")]) == 0
    assert build_tools_aot.main(["--family", "ci", "--arch", archs, "--out", str(tmp_path / "w")]) == 0
    assert build_tools_aot.main(["--family", "ci", "--out", str(tmp_path / "w")]) == 0  # the default: all of them
    assert built == [set(registry.SUPPORTED_ARCHS)] * 3
