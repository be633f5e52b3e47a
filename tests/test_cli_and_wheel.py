"""The command-line entry points and the wheel, as a user meets them (no GPU needed).

- `python -m fusedlora.info` and `python -m fusedlora.selfcheck` run and report;
- `pip wheel .` (small AOT family, sm_80 + sm_90) yields one wheel holding cubins, per-kernel manifests and
  the kernel sources; installed into an empty target directory it imports, and its loader index finds
  the prebuilt variants the registry asks for."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fusedlora
from fusedlora.testing import HAS_CUDA, run_module

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, cwd=ROOT, timeout=900):
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(env or {})
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def test_info_runs():
    r = _run([sys.executable, "-m", "fusedlora.info"])
    assert r.returncode == 0, r.stderr
    assert (
        f"fusedlora {fusedlora.__version__}" in r.stdout
        and "kernel directories" in r.stdout
        and "prebuilt variants per arch" in r.stdout
    )


def test_selfcheck_reports_every_kernel():
    r = _run([sys.executable, "-m", "fusedlora.selfcheck"])
    assert r.returncode == 0, r.stdout + r.stderr
    from fusedlora import registry

    for name in registry.all_kernels():
        assert any(line.startswith(name + " ") and "PASS" in line for line in r.stdout.splitlines()), name
    assert f"{len(registry.all_kernels())} passed, 0 failed" in r.stdout


@pytest.mark.slow
def test_wheel_carries_cubins_and_works_installed(tmp_path):
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "-w",
            str(tmp_path / "dist"),
            "--no-deps",
            "--no-build-isolation",
            "-q",
        ],
        env={"FUSEDLORA_AOT_FAMILY": "ci", "FUSEDLORA_AOT_ARCHS": "80,90"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("fusedlora-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fusedlora/_prebuilt/manifest.json" in names and "csrc_triton/rms_norm/kernel.py" in names
    assert any(n.endswith(".sm90.json") for n in names) and sum(n.endswith(".cubin") for n in names) > 10
    target = tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheels[0])])
    assert r.returncode == 0, r.stderr[-2000:]
    code = (
        "import json, fusedlora, fusedlora.loader as L, fusedlora.manifest as M, fusedlora.registry as R\n"
        "from build_tools_shapes import CI\n"
        "assert fusedlora.__file__.startswith(%r)\n"
        "idx = M.read_index([L.PREBUILT_DIR])\n"
        "want = R.family_variants(CI, [80, 90])\n"
        "missing = [v.to_string() for v in want if v.arch not in idx.get(v.key, {})]\n"
        "print(json.dumps({'variants': len(want), 'missing': missing}))\n"
    ) % str(target)
    (tmp_path / "build_tools_shapes.py").write_text(
        "import sys\nsys.path.append(%r)\nfrom build_tools.shapes import CI_SUBSET as CI\n" % str(ROOT)
    )
    r = _run([sys.executable, "-c", code], env={"PYTHONPATH": f"{target}{os.pathsep}{tmp_path}"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["variants"] > 10 and out["missing"] == []


@pytest.mark.parametrize(
    "out, markdown, raw",
    [
        ("run.v2/e2e", "run.v2/e2e", "run.v2/e2e.json"),  # a dot in a folder name is no suffix
        ("run.v2/e2e.md", "run.v2/e2e.md", "run.v2/e2e.json"),
        ("e2e.json", "e2e.md", "e2e.json"),  # never the Markdown overwritten by the JSON
    ],
)
def test_bench_out_writes_markdown_and_json_beside_it(tmp_path, out, markdown, raw):
    from benchmarks import report as bench_report

    (tmp_path / "run.v2").mkdir()
    bench_report.write(str(tmp_path / out), "| report |", [{"variant": "hf"}], quiet=True)
    assert (tmp_path / markdown).read_text() == "| report |\n"
    assert json.loads((tmp_path / raw).read_text()) == [{"variant": "hf"}]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        {markdown, raw}
    )


def _wheel_names(src: Path, out: Path, env: dict) -> list[str]:
    r = _run(
        [sys.executable, "-m", "pip", "wheel", ".", "-w", str(out), "--no-deps", "--no-build-isolation", "-q"],
        env=env,
        cwd=src,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list(out.glob("fusedlora-*.whl"))
    assert len(wheels) == 1
    return zipfile.ZipFile(wheels[0]).namelist()


def test_wheel_holds_only_the_kernels_its_build_asked_for(tmp_path):
    """Prebuilt kernels left in the build dir by an earlier build (pip builds in the checkout's build/) or in
    the source tree's fusedlora/_prebuilt (build_tools.aot's default) never ride along: a JIT-only build gives a
    wheel without any, a small AOT build one with exactly its own."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "_prebuilt", "__pycache__", "*.egg-info", ".pytest_cache", ".benchmarks"
        ),
    )
    for stale in (src / "build" / "lib" / "fusedlora" / "_prebuilt", src / "fusedlora" / "_prebuilt"):
        stale.mkdir(parents=True)
        (stale / "rms_norm_fwd.sm86.0123456789abcdef.cubin").write_bytes(b"\0" * 4096)
        (stale / "manifest.json").write_text('{"stale": true}')
    names = _wheel_names(src, tmp_path / "jit", {"FUSEDLORA_SKIP_AOT": "1"})
    assert "fusedlora/lora.py" in names and not [n for n in names if "_prebuilt" in n]
    names = _wheel_names(
        src,
        tmp_path / "aot",
        {"FUSEDLORA_AOT_FAMILY": "ci", "FUSEDLORA_AOT_ARCHS": "80", "FUSEDLORA_AOT_KERNELS": "scale_by_scalar"},
    )
    prebuilt = sorted(n.removeprefix("fusedlora/_prebuilt/") for n in names if "_prebuilt" in n)
    cubins = [n for n in prebuilt if n.endswith(".cubin")]
    assert cubins and all(n.startswith("scale_by_scalar.sm80.") for n in cubins), prebuilt
    assert set(prebuilt) == set(cubins) | {"manifest.json", "scale_by_scalar.sm80.json"}


HARNESS = (
    "fusedlora/bench_e2e.py",
    "fusedlora/bench_context.py",
    "fusedlora/bench_report.py",
    "fusedlora/step_profile.py",
)  # moved to the repository's benchmarks/ (issue 35)


def test_wheel_holds_the_library_and_its_demo_runs_installed(tmp_path):
    """The wheel is the library, the demo and fusedlora.testing: no benchmark harness (benchmarks/, the e2e and
    context benchmarks, the step profile, the peers' Unsloth and Liger code), not even a module an earlier
    build left in the build dir; installed apart from the checkout, `python -m fusedlora.demo --help` and a tiny
    demo run (two fresh processes, the interpreter) work from a clean folder."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "_prebuilt", "__pycache__", "*.egg-info", ".pytest_cache", ".benchmarks"
        ),
    )
    stale = src / "build" / "lib" / "fusedlora"
    stale.mkdir(parents=True)
    (stale / "bench_e2e.py").write_text("# left by an earlier build\n")
    names = _wheel_names(src, tmp_path / "dist", {"FUSEDLORA_SKIP_AOT": "1"})
    assert "fusedlora/demo.py" in names and "fusedlora/workload.py" in names and "fusedlora/testing.py" in names
    assert not [n for n in names if n.startswith("benchmarks/") or n in HARNESS], names
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("fusedlora-*.whl")))
    workload_source = wheel.read("fusedlora/workload.py").decode()
    assert "unsloth" not in workload_source.lower() and "liger" not in workload_source.lower()
    target, clean = tmp_path / "site", tmp_path / "clean"
    clean.mkdir()
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(next((tmp_path / "dist").glob("fusedlora-*.whl"))),
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"PYTHONPATH": str(target)}
    r = _run([sys.executable, "-c", "import fusedlora; print(fusedlora.__file__)"], env=env, cwd=clean)
    assert r.returncode == 0 and r.stdout.startswith(str(target)), r.stdout + r.stderr
    r = _run([sys.executable, "-m", "fusedlora.demo", "--help"], env=env, cwd=clean)
    assert r.returncode == 0 and "--cuda-graphs" in r.stdout, r.stderr[-2000:]
    r = _run([sys.executable, "-m", "fusedlora.bench", "e2e"], env=env, cwd=clean)
    assert r.returncode == 2 and "python -m benchmarks.e2e" in r.stderr, r.stderr[-2000:]
    if not HAS_CUDA:  # (on a GPU the demo is the 1B shape: ci/gpu_e2e.sh runs it from the wheel)
        r = _run(
            [
                sys.executable,
                "-m",
                "fusedlora.demo",
                "--lora",
                "--steps",
                "2",
                "--batch",
                "1",
                "--seq",
                "16",
                "--log-every",
                "1",
                "--out",
                "out",
            ],
            env=env,
            cwd=clean,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        results = json.loads((clean / "out" / "demo.json").read_text())
        assert [x["variant"] for x in results] == ["hf", "fusedlora"] and len(results[1]["losses"]) == 2


def _project():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


LOCAL_MODULES = {
    "conftest",
    "fusedlora",
    "csrc_triton",
    "build_tools",
    "benchmarks",
    "hf_dist_worker",
    "fsdp_worker",
    "build_tools_shapes",
}
PROVIDED_BY = {"tokenizers": "transformers", "packaging": "pytest"}  # installed as a requirement of another
INDIRECT = {
    "matplotlib": "fusedlora.demo's plot (tests/test_demo.py)",
    "pytest-benchmark": "pyproject's addopts pass --benchmark-disable",
}


def _third_party_test_imports() -> dict[str, set]:
    """Top-level third-party modules the test files import or importorskip -> the files."""
    import ast

    found: dict[str, set] = {}
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL_MODULES and not top.startswith("test_"):
                    found.setdefault(top.replace("_", "-"), set()).add(path.name)
    return found


def test_test_extra_lists_what_the_tests_import():
    """`pip install fusedlora[test]` then pytest: no test may be skipped for a package the extra left out
    (the property tests without hypothesis, test_demo without matplotlib)."""
    project = _project()
    declared = {_dist_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    needed = {PROVIDED_BY.get(m, m) for m in _third_party_test_imports()} | set(INDIRECT)
    assert needed <= declared, f"the [test] extra lacks {sorted(needed - declared)}"


def test_declared_ranges_are_the_tested_ones():
    """The wheel's torch / triton / transformers ranges hold what ci/install.sh installs (CI) and what the GPU
    machine runs (torch 2.11, triton 3.6, transformers 5.17), and nothing newer than tested (torch 2.14.1 was
    pulled by the open range)."""
    from packaging.requirements import Requirement

    project = _project()
    specs = {
        Requirement(r).name: Requirement(r).specifier
        for r in project["dependencies"] + project["optional-dependencies"]["test"]
    }
    install = (ROOT / "ci" / "install.sh").read_text()
    ci = {name: re.search(rf'"{name}==([0-9.]+)"', install).group(1) for name in ("torch", "triton")}
    gpu = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}
    for name, version in list(ci.items()) + list(gpu.items()) + [("transformers", "5.25.0")]:
        assert specs[name].contains(version), (name, version, specs[name])
    for name, untested in (("torch", "2.14.1"), ("triton", "3.10.0"), ("transformers", "5.26.0")):
        assert not specs[name].contains(untested), (name, untested, specs[name])


def test_selfcheck_help_prints_help_and_runs_nothing():
    r = run_module("fusedlora.selfcheck", "--help")
    assert r.returncode == 0 and "usage: python -m fusedlora.selfcheck" in r.stdout and "PASS" not in r.stdout
