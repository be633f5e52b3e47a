"""What the benchmark commands share: the measurement line (date, device, versions) and the report files."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path


def measured_line(results) -> str:
    """'Measured <date> on <device>, <versions>': the device of the first result that carries one, the
    versions of all (a peer's own package, Unsloth say, is only in its own run's)."""
    r0 = next((r for r in results if "versions" in r), {})
    versions: dict = {}
    for r in results:
        for k, v in r.get("versions", {}).items():
            versions.setdefault(k, v)
    return f"Measured {time.strftime('%Y-%m-%d')} on {r0.get('device')}, " + ", ".join(
        f"{k} {v}" for k, v in versions.items()
    )


def report_paths(out: str) -> tuple[Path, Path]:
    """(Markdown path, JSON path) for `--out`: the JSON beside the Markdown, the file name's suffix (if any)
    made .json (a dot in a folder name is no suffix); `--out x.json` puts the Markdown in x.md, never both in one file."""
    path = Path(out)
    if path.suffix == ".json":
        return path.with_suffix(".md"), path
    return path, path.with_suffix(".json")


def write(out: str | None, report: str, results, quiet: bool = False) -> None:
    """Print the report (unless quiet); with `out`, write it there and the raw results beside it
    (report_paths). The benchmarks write after every variant, so a run stopped by a time limit keeps what
    it measured."""
    if not quiet:
        print(report)
    if out:
        markdown, raw = report_paths(out)
        markdown.write_text(report + "\n")
        with open(raw, "w") as fh:
            json.dump(results, fh, indent=1)


def selected(csv: str, liger_label: str) -> list[str]:
    """The comma list of variants, less `liger_label` (said so) when liger-kernel is not installed."""
    wanted = [v for v in csv.split(",") if v]
    if liger_label in wanted and importlib.util.find_spec("liger_kernel") is None:
        print(f"liger-kernel is not installed: skipping {liger_label}", file=sys.stderr)
        wanted.remove(liger_label)
    if "unsloth" in wanted:
        from .workload import UNSLOTH_PATH, unsloth_findable

        if not unsloth_findable():
            print(
                f"Unsloth is not installed (nor in ${UNSLOTH_PATH}: python -m build_tools.peer_bundle makes a "
                "bundle): skipping unsloth",
                file=sys.stderr,
            )
            wanted.remove("unsloth")
    return wanted


def gpu_or_exit(command: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        print(f"{command} needs a CUDA GPU (the CPU demo: python -m fusedlora.demo)", file=sys.stderr)
        return False
    return True
