"""The ahead-of-time build on a machine with no GPU: a subset of the prebuilt set for sm_80 and sm_90.

Validates the cubins (CUDA ELF for the right arch), the manifest (ABI, checksums, versions), that every
variant the registry asks for was built, that the loader's index finds them under the keys its launchers
compute, and `python -m fusedlora.build --config` for a model outside the shape lists."""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fusedlora import loader as L
from fusedlora import manifest as M
from fusedlora import registry
from fusedlora.testing import run_module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from build_tools.shapes import CI_SUBSET  # noqa: E402

EM_CUDA = 190


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real GPUs
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("prebuilt")
    r = subprocess.run(
        [sys.executable, "-m", "build_tools.aot", "--family", "ci", "--arch", "80,90", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def check_cubin(path: Path, arch: int):
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path.name}: not a 64-bit ELF"
    assert struct.unpack_from("<H", data, 18)[0] == EM_CUDA, f"{path.name}: not a CUDA ELF"
    assert struct.unpack_from("<I", data, 48)[0] & 0xFF == arch, f"{path.name}: built for another arch"


def test_build_summary_and_cubins(built):
    out, log = built
    assert "variants for sm_80, sm_90" in log and "MB of cubins" in log and "FAILED" not in log
    top = json.loads((out / "manifest.json").read_text())
    assert top["format"] == M.MANIFEST_FORMAT and set(top["kernels"]) == set(registry.all_kernels())
    import triton

    assert top["triton_version"] == triton.__version__
    records = []
    for name, info in top["kernels"].items():
        spec = registry.get(name)
        assert info["source_sha256"] == spec.source_sha256()
        assert [tuple(k) for k in info["arg_kinds"]] == spec.arg_kinds()
        assert set(info["manifests"]) == {"80", "90"}
        entries = []
        for arch, fname in info["manifests"].items():
            part = json.loads((out / fname).read_text())
            assert part["arch"] == int(arch) and all(r["variant"]["arch"] == int(arch) for r in part["entries"])
            entries += part["entries"]
        assert info["variants"] == len(entries) > 0
        records += entries
    for rec in records:
        path = out / rec["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]
        assert rec["bytes"] == path.stat().st_size
        arch = rec["variant"]["arch"]
        check_cubin(path, arch)
        v = registry.Variant.from_string(json.dumps(rec["variant"]))
        assert rec["abi"] == [t for _, t in v.signature if t != "1"] + ["*i8", "*i8"]
        assert rec["num_warps"] == v.num_warps and rec["shared"] >= 0 and rec["name"].endswith("_kernel")
        # sm_90 assembled by the bundled CUDA 12 ptxas: loads on drivers older than R580.
        assert rec["ptxas"] == "bundled" and float(rec["ptx_version"]) < 9.0


def test_every_wanted_variant_was_built(built):
    out, _ = built
    index = M.read_index([out])
    wanted = registry.family_variants(CI_SUBSET, [80, 90])
    top = json.loads((out / "manifest.json").read_text())
    assert len(wanted) == sum(info["variants"] for info in top["kernels"].values())
    for v in wanted:
        assert v.arch in index[v.key], f"missing {v.to_string()}"


def test_loader_finds_the_variant_a_launch_asks_for(built):
    """The key the launcher computes from real tensors equals the key of the prebuilt variant."""
    import torch

    out, _ = built
    ld = L.Loader(dirs=[out], driver=object())
    assert ld.arg_kinds(registry.get("rms_norm_fwd")) == registry.get("rms_norm_fwd").arg_kinds()
    n, rows = CI_SUBSET["hidden_sizes"][0], 9
    x = torch.empty(rows, n, dtype=torch.bfloat16)
    w = torch.empty(n, dtype=torch.bfloat16)
    rstd = torch.empty(rows)
    bind, _ = L.make_binder(registry.get("rms_norm_fwd"))
    sig, _ = bind(x, w, x, rstd, n, n, rows, n, 1e-6, 0.0)
    key = L.constexpr_key(registry.get("rms_norm_fwd").meta(n_cols=n, gemma_cast=False))
    spec = registry.get("rms_norm_fwd")
    assert [e.variant.arch for e in ld.find(spec, 90, sig, key)] == [90]
    assert [e.variant.arch for e in ld.find(spec, 86, sig, key)] == [80]


def test_user_build_from_hf_config(tmp_path):
    cfg = {
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "intermediate_size": 13824,
        "vocab_size": 32003,
        "torch_dtype": "bfloat16",
        "architectures": ["LlamaForCausalLM"],
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "kernels"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedlora.build",
            "--config",
            str(tmp_path / "config.json"),
            "--arch",
            "90",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from fusedlora.build import family_from_config

    family = family_from_config(cfg)
    assert family["hidden_sizes"] == [5120] and family["head_dims"] == [128] and family["dtypes"] == ["bf16"]
    index = M.read_index([out])
    for v in registry.family_variants(family, [90]):
        assert 90 in index[v.key]
    for f in out.glob("*.cubin"):
        check_cubin(f, 90)
    # A second build merges into the same directory instead of replacing it.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedlora.build",
            "--config",
            json.dumps(dict(cfg, hidden_size=3000)),
            "--arch",
            "80",
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    archs = {e.variant.arch for by in M.read_index([out]).values() for e in by.values()}
    assert archs == {80, 90}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with a GPU the local arch is the default")
def test_user_build_needs_an_arch_without_gpu(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fusedlora.build", "--config", '{"hidden_size": 64}'],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "give --arch" in r.stderr


def test_family_from_nested_multimodal_config():
    from fusedlora.build import family_from_config

    fam = family_from_config(
        {
            "text_config": {
                "hidden_size": 2560,
                "head_dim": 256,
                "num_attention_heads": 8,
                "intermediate_size": 10240,
                "vocab_size": 262208,
            },
            "torch_dtype": "float16",
        }
    )
    assert fam["hidden_sizes"] == [2560] and fam["head_dims"] == [256] and fam["dtypes"] == ["fp16"]


def test_build_the_variant_an_aot_only_miss_names(tmp_path):
    """The command printed by a FUSEDLORA_AOT_ONLY miss builds exactly that variant, and the loader then finds it."""
    spec = registry.get("rms_norm_fwd")
    v = registry.make_variant(spec, 86, {"x": "fp16", "w": "bf16", "y": "fp32"}, {"n_cols": 3000, "gemma_cast": True})
    out = tmp_path / "k"
    r = subprocess.run(
        [sys.executable, "-m", "fusedlora.build", "--variant", v.to_string(), "--out", str(out), "--quiet"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ld = L.Loader(dirs=[out], driver=object())
    found = ld.find(spec, 89, tuple(t for _, t in v.signature), v.constexprs)  # an sm_89 GPU uses the sm_86 cubin
    assert [e.variant for e in found] == [v]
    check_cubin(found[0].path, 86)


def test_aot_cli_refuses_unknown_arch():
    r = run_module("build_tools.aot", "--arch", "70", "--out", "/tmp/never")
    assert r.returncode != 0 and "unsupported arch [70]" in r.stderr
