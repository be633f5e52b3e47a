"""Every module imports on its own in a fresh interpreter (an import cycle shows up as an error there), and the
kernel registry entries import no triton."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for pkg in ("fusedlora", "csrc_triton", "benchmarks") for p in (ROOT / pkg).rglob("*.py")
    if not p.name.startswith("__main__"))


def test_each_module_imports_alone():
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for m in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append((m, r.stderr.strip().splitlines()[-1:]))\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
    assert len(MODULES) > 25


@pytest.mark.parametrize("spec_module", [m for m in MODULES if m.startswith("csrc_triton.") and m.count(".") == 1
                                         and not m.split(".")[1].startswith("_")])
def test_registry_entries_import_no_triton(spec_module):
    code = f"import sys, {spec_module}; assert 'triton' not in sys.modules, 'triton imported'; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
