"""Build: a pure-Python package whose wheel carries prebuilt cubins.

`build_py` runs the ahead-of-time kernel build (`python -m build_tools.aot`) into the build tree, so
`pip wheel .` / `python -m build` produce one wheel with cubins for sm_80, sm_86, sm_89 and sm_90.
Environment knobs: FUSEDLORA_SKIP_AOT=1 (no cubins: JIT only), FUSEDLORA_AOT_FAMILY (common | ci),
FUSEDLORA_AOT_ARCHS (default 80,86,89,90), FUSEDLORA_AOT_KERNELS (comma list of kernel names; default all).
The wheel holds exactly the kernels and modules its build asked for: the packages' folders already in the build
dir (pip builds in the checkout's build/, which outlives a build) are cleared first, so neither an earlier build's
prebuilt kernels nor a module since moved out of the package (the benchmarks, say) ride along.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernels(build_py):
    def run(self):
        editable = getattr(self, "editable_mode", False)
        if not editable:
            for top in sorted({package.split(".")[0] for package in self.packages or ()}):
                shutil.rmtree(Path(self.build_lib) / top, ignore_errors=True)
        super().run()
        if editable:
            return
        out = Path(self.build_lib) / "fusedlora" / "_prebuilt"
        # (also what package data copied from a source-tree fusedlora/_prebuilt, which build_tools.aot fills)
        shutil.rmtree(out, ignore_errors=True)
        if os.environ.get("FUSEDLORA_SKIP_AOT") == "1":
            return
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.check_call(
            [
                sys.executable,
                "-m",
                "build_tools.aot",
                "--out",
                str(out),
                "--family",
                os.environ.get("FUSEDLORA_AOT_FAMILY", "common"),
                "--arch",
                os.environ.get("FUSEDLORA_AOT_ARCHS", "80,86,89,90"),
            ]
            + (["--kernels", os.environ["FUSEDLORA_AOT_KERNELS"]] if os.environ.get("FUSEDLORA_AOT_KERNELS") else []),
            cwd=ROOT,
            env=env,
        )


setup(cmdclass={"build_py": BuildPyWithKernels})
