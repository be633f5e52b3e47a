"""Dispatch logic of the loader, with a fake CUDA driver and fake CUDA tensors (runs anywhere).

Covers: the dispatch key (dtypes, alignment, integer specialisation, constexprs), lookup order (exact
arch -> compatible arch -> JIT), FUSEDLORA_JIT / FUSEDLORA_AOT_ONLY, broken cubins and manifests,
launch parameters, per-thread argument slots and the arch check."""

import contextlib
import ctypes
import hashlib
import json
import logging
import threading

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
