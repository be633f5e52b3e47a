"""Pack Unsloth and the pure-Python packages it needs into one archive the device can carry (it has no network):
`.whl/unsloth_bundle.tar.xz`, which `ci/gpu_e2e.sh` unpacks into its package folder, so that
`python -m benchmarks.e2e --variants ...,unsloth` measures Unsloth beside fusedlora in the same call.

    python -m build_tools.peer_bundle [--out .whl/unsloth_bundle.tar.xz]

Versions as measured on the device (docs: ../shared/notes/peers-on-device.md): Unsloth 2026.10.9 accepts
transformers <= 5.17.0, the device's version. Its web app (`studio/`, `unsloth_cli/`) and test folders are left out
(they are most of its 28 MB wheel)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = [
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "trl==1.15.0",
    "datasets==4.8.5",
    "torchao==0.18.0",
    "cut-cross-entropy==25.1.1",
    "dill",
    "multiprocess",
    "pydantic==2.14.*",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "typing_extensions>=4.16",
    "fsspec",
    "msgspec",
    "tyro",
    "docstring_parser",
    "typeguard",
    "structlog",
    "json5",
    "nest-asyncio",
    "xxhash",
]
PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "any",
]
DROP = ["studio", "unsloth_cli", "diffusers", "hf_transfer"]  # (unsloth_zoo imports torchao.testing)


def _unpack(wheel: Path, site: Path):
    """A wheel's files into `site` as pip --target lays them out (its .data/purelib|platlib into the root)."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if name.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_tools.peer_bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".whl/unsloth_bundle.tar.xz")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        pip = [sys.executable, "-m", "pip"]
        subprocess.run(pip + ["download", "-q", "--no-deps", *PLATFORM, "-d", str(wheels), *PACKAGES], check=True)
        for wheel in sorted(wheels.glob("*.whl")):  # (unzipped, not pip-installed: they are cp312 wheels and this
            _unpack(wheel, site)  # machine's Python may be another version)
        for rel in DROP:
            shutil.rmtree(site / rel, ignore_errors=True)
        for tests in list(site.glob("*/tests")):
            shutil.rmtree(tests, ignore_errors=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz") as tar:
            for p in sorted(site.iterdir()):
                tar.add(p, arcname=p.name)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
