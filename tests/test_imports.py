"""Imports: every module imports on its own in a fresh interpreter, the kernel registry entries import no triton,
and, read from the source with `ast`, no module of fusedlora/ or csrc_triton/ imports one above it in the layer
table of docs/architecture.md (encoded below; the doc's table must list the same layers) and no import circle
exists. An import counts wherever it is written: at module level, inside a function (a lazy import), and as an
`importlib` name (`importlib.import_module`, `importlib.util.find_spec`)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for pkg in ("fusedlora", "csrc_triton", "benchmarks")
    for p in (ROOT / pkg).rglob("*.py")
    if not p.name.startswith("__main__")
)


def test_each_module_imports_alone():
    # one fresh interpreter per module, as many at once as there are cores (each waits mostly on its own imports)
    code = (
        "import os, subprocess, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def run(m):\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
        "    return (m, r.stderr.strip().splitlines()[-1:]) if r.returncode else None\n"
        "with ThreadPoolExecutor(os.cpu_count() or 1) as pool:\n"
        "    print([b for b in pool.map(run, sys.argv[1:]) if b])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
    assert len(MODULES) > 25


@pytest.mark.parametrize(
    "spec_module",
    [m for m in MODULES if m.startswith("csrc_triton.") and m.count(".") == 1 and not m.split(".")[1].startswith("_")],
)
def test_registry_entries_import_no_triton(spec_module):
    code = f"import sys, {spec_module}; assert 'triton' not in sys.modules, 'triton imported'; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------ the layers
# Bottom up, as docs/architecture.md's table writes them: a module may import its own layer (without a circle)
# and any layer below. `<op>` is one kernel folder; a path ending in "/" is everything under it; a path named
# exactly takes its row over a pattern's.
LAYERS = [
    ("kernel sources", ["csrc_triton/__init__.py", "csrc_triton/_*.py", "csrc_triton/<op>/kernel.py"]),
    ("kernel description types", ["fusedlora/kernel_spec.py"]),
    ("registry entries", ["csrc_triton/<op>/__init__.py"]),
    ("registry table, manifest format", ["fusedlora/registry.py", "fusedlora/manifest.py"]),
    ("loader, AOT build", ["fusedlora/_cuda.py", "fusedlora/loader.py", "fusedlora/aot.py", "fusedlora/build.py"]),
    ("ops", ["fusedlora/ops/"]),
    ("dequantisation, base-weight dispatch", ["fusedlora/quant.py"]),
    ("offloaded activation checkpointing", ["fusedlora/checkpoint.py"]),
    ("reading PEFT modules", ["fusedlora/peft_layers.py"]),
    ("fused LoRA", ["fusedlora/lora.py"]),
    ("fused LoRA custom ops", ["fusedlora/lora_ops.py"]),
    ("CUDA graphs", ["fusedlora/cuda_graphs.py"]),
    ("HF model patching, the package's entry points", ["fusedlora/hf/", "fusedlora/__init__.py"]),
    (
        "tools",
        [
            "fusedlora/info.py",
            "fusedlora/selfcheck.py",
            "fusedlora/__main__.py",
            "fusedlora/demo.py",
            "fusedlora/workload.py",
            "fusedlora/bench.py",
            "fusedlora/testing.py",
            "fusedlora/*.py",
        ],
    ),  # (a module of the package no row names: a tool, that nothing below imports)
]

# Imports by a computed name, keyed by (module, the name's expression as written): the paths they can import.
# A new one fails test_every_import_is_known until it is listed here.
DYNAMIC_IMPORTS = {
    # the package's `__getattr__` gives `fusedlora.<submodule>` without an explicit import: the binding Python's
    # import system makes itself once the submodule is imported, not something the package depends on
    ("fusedlora", "f'{__name__}.{name}'"): [],
    ("fusedlora.kernel_spec", "self.module"): ["csrc_triton/<op>/kernel.py"],  # a kernel's @triton.jit source
    ("fusedlora.registry", "module"): ["csrc_triton/<op>/__init__.py"],  # registry.KERNEL_MODULES
    ("fusedlora.selfcheck", "module"): ["fusedlora/ops/", "fusedlora/quant.py"],  # a KernelSpec's `check`
}
IMPORTLIB_FUNCTIONS = ("import_module", "find_spec")


def _path_regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(re.escape("<op>"), r"[^/_][^/]*").replace(r"\*", r"[^/]*")
    return re.compile(body + (".*" if pattern.endswith("/") else ""))


def _files() -> dict[str, str]:
    """module name -> path relative to the root, for every module of fusedlora/ and csrc_triton/."""
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p.relative_to(ROOT).as_posix()
        for pkg in ("fusedlora", "csrc_triton")
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }


FILES = _files()


def _layer(path: str) -> list[int]:
    """The rows of LAYERS that place `path`: those naming it exactly, else those whose patterns match it."""
    exact = [i for i, (_, patterns) in enumerate(LAYERS) if path in patterns]
    return exact or [
        i for i, (_, patterns) in enumerate(LAYERS) if any(_path_regex(p).fullmatch(path) for p in patterns)
    ]


def _modules_at(patterns) -> list[str]:
    return [m for m, path in FILES.items() if any(_path_regex(p).fullmatch(path) for p in patterns)]


def _named_module(name: str) -> str | None:
    """The module of ours an import of `name` runs (for `from a.b import c`, a.b.c when that is a module, else
    a.b), or None for a module of another project. A package counts where it is named: importing a.b.c runs
    a/b/__init__.py too, but only as Python's way to reach a.b.c, which the test checks by itself."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def _package(module: str) -> str:
    return module if FILES[module].endswith("__init__.py") else module.rpartition(".")[0]


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a `from ... import` statement in `package` names."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def imports_of(module: str) -> tuple[list[tuple[str, int]], list[str]]:
    """([(imported module of ours, line)], [problems]) for every import written anywhere in `module`."""
    path, package = ROOT / FILES[module], _package(module)
    found, problems = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, package)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base for a in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called not in IMPORTLIB_FUNCTIONS:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            elif (module, ast.unparse(arg)) in DYNAMIC_IMPORTS:
                names = _modules_at(DYNAMIC_IMPORTS[module, ast.unparse(arg)])
            else:
                problems.append(
                    f"{FILES[module]}:{node.lineno}: {called}({ast.unparse(arg)}) imports a computed "
                    "name: list what it can import in tests/test_imports.py's DYNAMIC_IMPORTS"
                )
        for name in names:
            target = _named_module(name)
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found, problems


GRAPH = {m: imports_of(m) for m in FILES}


def test_every_module_has_one_layer_and_every_import_is_known():
    unplaced = [f"{path} (layers {_layer(path)})" for path in FILES.values() if len(_layer(path)) != 1]
    assert not unplaced, (
        "each module belongs to exactly one layer of LAYERS (and docs/architecture.md's table): " + ", ".join(unplaced)
    )
    problems = [p for _, ps in GRAPH.values() for p in ps]
    assert not problems, "\n".join(problems)
    assert all(_modules_at(targets) or not targets for targets in DYNAMIC_IMPORTS.values())


def test_no_import_runs_up_the_layers():
    upward = [
        f"{FILES[m]}:{line} imports {target} ({LAYERS[_layer(FILES[target])[0]][0]}) from the layer below it "
        f"({LAYERS[_layer(FILES[m])[0]][0]})"
        for m, (deps, _) in GRAPH.items()
        for target, line in deps
        if _layer(FILES[target])[0] > _layer(FILES[m])[0]
    ]
    assert not upward, "\n".join(dict.fromkeys(upward))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    circles = _circles({m: {t for t, _ in deps} for m, (deps, _) in GRAPH.items()})
    assert not circles, "import circles (module and function level, importlib names): " + "; ".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_lazy_and_importlib_imports(tmp_path, monkeypatch):
    """A function-level import and an importlib name count as much as a module-level import."""
    src = tmp_path / "fusedlora" / "x.py"
    src.parent.mkdir()
    src.write_text(
        "import importlib\n\ndef f():\n    from . import loader\n    importlib.import_module('fusedlora.lora')\n"
        "    return importlib.import_module(name)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setitem(FILES, "fusedlora.x", "fusedlora/x.py")
    deps, problems = imports_of("fusedlora.x")
    assert [t for t, _ in deps] == ["fusedlora.loader", "fusedlora.lora"] and "import_module(name)" in problems[0]


# ------------------------------------------------------------------------------- what crosses a module line
# A module takes another's public names only; these private ones stay, each for its reason.
PRIVATE_NAMES_TAKEN = {
    # the eager internal that code inside a custom op must call (the public entry would dispatch to the op
    # again: docs/architecture.md); tests spy on it under this name in both modules
    ("fusedlora.lora", "fusedlora.quant", "_dequantize_nf4"),
    # csrc_triton/_math.py's device helpers: kernel source, part of every prebuilt kernel's fingerprint
    ("csrc_triton.glu.kernel", "csrc_triton._math", "_act_and_grad"),
    ("csrc_triton.glu_lora.kernel", "csrc_triton._math", "_act_and_grad"),
}


def private_names_taken(module: str) -> set[tuple[str, str, str]]:
    """(module, other module of ours, private name) for each `from other import _name` and `other_alias._name`
    in `module`."""
    package = _package(module)
    tree = ast.parse((ROOT / FILES[module]).read_text())
    aliases, taken = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _from_module(node, package)
            for a in node.names:
                if f"{base}.{a.name}" in FILES:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif base in FILES and base != module and a.name.startswith("_") and not a.name.startswith("__"):
                    taken.add((module, base, a.name))
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in FILES})
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            taken.add((module, aliases[node.value.id], node.attr))
    return taken


def test_no_module_takes_another_modules_private_names():
    taken = set().union(*(private_names_taken(m) for m in FILES))
    assert taken - PRIVATE_NAMES_TAKEN == set(), "use (or make) a public name: " + ", ".join(
        f"{m} takes {other}.{name}" for m, other, name in sorted(taken - PRIVATE_NAMES_TAKEN)
    )
    assert PRIVATE_NAMES_TAKEN <= taken, "listed but no longer taken: drop from PRIVATE_NAMES_TAKEN"


def test_a_recomputable_norm_hands_its_source_over_explicitly():
    """rms_norm(recomputable=True) hands its NormSource to the fused LoRA functions through
    `fusedlora.ops.rms_norm.RECOMPUTABLE_OUTPUTS` (which `norm_source` reads), not as an attribute of the output
    tensor; the entry goes with the tensor."""
    code = (
        "import gc, torch\n"
        "from fusedlora.ops.rms_norm import norm_source, rms_norm\n"
        "x = torch.randn(3, 16)\n"
        "y = rms_norm(x, torch.ones(16), recomputable=True)\n"
        "assert not [k for k in vars(y) if 'fusedlora' in k or 'norm' in k], vars(y)\n"
        "from fusedlora.ops.rms_norm import RECOMPUTABLE_OUTPUTS\n"
        "assert norm_source(y) is RECOMPUTABLE_OUTPUTS[y] and norm_source(y).x2d.shape == (3, 16)\n"
        "assert norm_source(rms_norm(x, torch.ones(16))) is None\n"
        "del y; gc.collect(); assert len(RECOMPUTABLE_OUTPUTS) == 0\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_architecture_doc_lists_these_layers():
    """docs/architecture.md's layer table, bottom up, names the same paths as LAYERS: one description."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Layers, bottom up", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("|") and "`" in line.split("|")[2]]
    doc = [re.findall(r"`([^`]+)`", where) for where in rows]
    assert doc == [patterns for _, patterns in LAYERS]


def test_tests_share_helpers_through_fusedlora_testing():
    """A test file (in tests/ or a folder below it) takes shared builders from fusedlora.testing, never from another
    test file or conftest (whose fixtures pytest hands out by name); the subprocess workers import conftest only to
    set TRITON_INTERPRET. Test files have unique basenames."""
    workers = {"fsdp_worker.py", "hf_dist_worker.py"}
    taken = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name in workers or path.name == "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            taken += [
                f"{path.relative_to(ROOT)}: {n}"
                for n in names
                if n == "conftest" or n.split(".")[0] == "tests" or any(p.startswith("test_") for p in n.split("."))
            ]
    assert not taken, taken
    # the test folders have no __init__.py, so pytest imports each test file by its basename ("prepend" import
    # mode): two files of one name in different folders would collide
    files = [p for p in (ROOT / "tests").rglob("test_*.py")]
    names = [p.name for p in files]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not list((ROOT / "tests").rglob("__init__.py"))
