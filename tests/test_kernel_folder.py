"""The kernel-folder contract (issue 34, item 9), with test_loader's fake CUDA driver.

A folder's cubin is launched only when its entry's checksum, source hash, ABI, Triton version and arch all
match; anything else falls back to triton.jit with one warning naming the folder and the reason; never a
path outside the folder, never a crash. Each manifest is checked once, when it is read."""

import json
import os
import sys
import warnings

import pytest
import torch
from test_loader import SPEC, fwd_args, jit_calls, launch, make_dir, make_loader  # noqa: F401 (fixture)

from fusedlora import loader as L
from fusedlora import registry

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
