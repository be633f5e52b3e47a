"""`python -m fusedlora.info`: versions, GPUs and how many prebuilt kernel variants serve each."""

from __future__ import annotations

import platform
import sys

from . import __version__
from .loader import kernel_dirs
from .manifest import read_index
from .registry import COMPATIBLE_ARCHS


def collect() -> dict:
    import torch
    import triton

    info = {
        "fusedlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "gpus": [],
        "dirs": [],
    }
    index = read_index(kernel_dirs())
    by_arch: dict[int, int] = {}
    for by in index.values():
        for arch in by:
            by_arch[arch] = by_arch.get(arch, 0) + 1
    info["prebuilt_per_arch"] = dict(sorted(by_arch.items()))
    for d in kernel_dirs():
        info["dirs"].append((str(d), (d / "manifest.json").is_file()))
    info["kernels"] = sorted({k[0] for k in index})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            arch = major * 10 + minor
            usable = sum(1 for by in index.values() if any(a in by for a in COMPATIBLE_ARCHS.get(arch, ())))
            info["gpus"].append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "arch": f"sm_{arch}",
                    "prebuilt_variants_usable": usable,
                    "supported": arch >= 80,
                }
            )
    return info


def main() -> int:
    info = collect()
    print(
        f"fusedlora {info['fusedlora']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  "
        f"triton {info['triton']}"
    )
    print("kernel directories (searched in this order):")
    for d, present in info["dirs"]:
        print(f"  {'[manifest]' if present else '[empty]   '} {d}")
    per_arch = ", ".join(f"sm_{a}: {n}" for a, n in info["prebuilt_per_arch"].items()) or "none"
    print(f"prebuilt variants per arch: {per_arch}")
    if not info["gpus"]:
        print("GPU: none visible (kernels would run through Triton's interpreter on CPU tensors)")
    for g in info["gpus"]:
        note = "" if g["supported"] else "  UNSUPPORTED: fusedlora needs sm_80 or newer"
        print(
            f"GPU {g['index']}: {g['name']} ({g['arch']}): {g['prebuilt_variants_usable']} prebuilt variants usable{note}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
