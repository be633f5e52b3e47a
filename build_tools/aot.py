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

from build_tools.shapes import FAMILIES  # noqa: E402
from fusedlora.registry import SUPPORTED_ARCHS, parse_archs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m build_tools.aot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--family", default="common", choices=sorted(FAMILIES))
    ap.add_argument(
        "--arch",
        default=",".join(map(str, SUPPORTED_ARCHS)),
        help="comma-separated, from " + ",".join(map(str, SUPPORTED_ARCHS)) + " (the default: all)",
    )
    ap.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "fusedlora" / "_prebuilt"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument(
        "--ptxas13",
        action="store_true",
        help="assemble sm_90 with triton's CUDA 13 ptxas (cubins then need driver >= R580)",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        archs = parse_archs(args.arch)
    except ValueError as e:
        ap.error(f"--arch: {e}")

    from fusedlora import aot, registry

    kernels = args.kernels.split(",") if args.kernels else None
    variants = registry.family_variants(FAMILIES[args.family], archs, kernels)
    summary = aot.build(variants, args.out, jobs=args.jobs, ptxas13=args.ptxas13, quiet=args.quiet, merge=False)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
