"""Build the prebuilt kernel set: every registered variant of a shape family for each arch.

    python -m build_tools.aot                       # common models, sm_80/86/89/90 -> fusedlora/_prebuilt
    python -m build_tools.aot --family ci --arch 80,90 --out /tmp/k

Runs on a machine with no GPU, on all cores; `pip wheel .` calls it (see setup.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from build_tools.shapes import ARCHS, FAMILIES  # noqa: E402


def parse_archs(s: str) -> list[int]:
    archs = [int(a.strip().removeprefix("sm_").removeprefix("sm")) for a in s.split(",") if a.strip()]
    from fusedlora.registry import SUPPORTED_ARCHS
    bad = [a for a in archs if a not in SUPPORTED_ARCHS]
    if bad:
        raise SystemExit(f"unsupported arch {bad}; prebuilt archs are {SUPPORTED_ARCHS}")
    return archs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_tools.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="common", choices=sorted(FAMILIES))
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated, e.g. 80,86,89,90")
    ap.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "fusedlora" / "_prebuilt"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--ptxas13", action="store_true",
                    help="assemble sm_90 with triton's CUDA 13 ptxas (cubins then need driver >= R580)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from fusedlora import aot, registry
    kernels = args.kernels.split(",") if args.kernels else None
    variants = registry.family_variants(FAMILIES[args.family], parse_archs(args.arch), kernels)
    summary = aot.build(variants, args.out, jobs=args.jobs, ptxas13=args.ptxas13, quiet=args.quiet, merge=False)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
