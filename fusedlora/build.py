"""Compile the kernels a model needs into a user kernel directory that the loader searches.

    python -m fusedlora.build --config path/to/config.json --arch 90 [--out DIR]
    python -m fusedlora.build --config '{"hidden_size": 5120, "num_attention_heads": 40, ...}' --arch 80,90
    python -m fusedlora.build --variant '<the variant string a FUSEDLORA_AOT_ONLY error printed>'

The default output directory is `~/.cache/fusedlora/kernels` ($XDG_CACHE_HOME respected); the loader
also searches every directory of FUSEDLORA_KERNEL_PATH. No GPU is needed.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from . import aot, registry
from .loader import user_kernel_dir
from .registry import SUPPORTED_ARCHS, Variant

_DTYPE_NAMES = {"bfloat16": ["bf16"], "float16": ["fp16"], "float32": ["fp32"], "half": ["fp16"]}


def family_from_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The shape family of a HF model config (a dict, a JSON string, or a path to config.json)."""
    if not isinstance(config, dict):
        text = str(config)
        p = Path(text)
        if p.is_dir():
            p = p / "config.json"
        config = json.loads(p.read_text() if p.is_file() else text)
    cfg = config.get("text_config") or config  # multimodal wrappers keep the decoder's sizes there
    try:
        hidden = int(cfg["hidden_size"])
    except KeyError:
        raise ValueError("model config has no hidden_size") from None
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (hidden // int(heads) if heads else None)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return {
        "hidden_sizes": [hidden],
        "head_dims": [int(head_dim)] if head_dim else [],
        "intermediate_sizes": [int(cfg["intermediate_size"])] if cfg.get("intermediate_size") else [],
        "vocab_sizes": [int(cfg["vocab_size"])] if cfg.get("vocab_size") else [],
        "dtypes": _DTYPE_NAMES.get(dtype, ["bf16", "fp16"]),
    }


def _local_arch() -> int | None:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:
        pass
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedlora.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="HF config.json path, model directory, or JSON text")
    ap.add_argument("--variant", action="append", default=[], help="a variant string (repeatable)")
    ap.add_argument("--arch", default=None, help="comma-separated archs, e.g. 90 or 80,86 (default: this GPU)")
    ap.add_argument("--out", default=None, help=f"output directory (default {user_kernel_dir()})")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--ptxas13", action="store_true", help="assemble sm_90 with CUDA 13 ptxas (driver >= R580)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not args.config and not args.variant:
        ap.error("give --config or --variant")

    variants: list[Variant] = [Variant.from_string(s) for s in args.variant]
    if args.config:
        if args.arch:
            archs = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
        else:
            local = _local_arch()
            if local is None:
                ap.error("no GPU here: give --arch (e.g. --arch 90)")
            archs = [local]
        bad = [a for a in archs if a not in SUPPORTED_ARCHS and a < 80]
        if bad:
            ap.error(f"unsupported arch {bad}: fusedlora needs sm_80 or newer")
        family = family_from_config(args.config)
        variants += registry.family_variants(family, archs)
    out = Path(args.out) if args.out else user_kernel_dir()
    summary = aot.build(variants, out, jobs=args.jobs, ptxas13=args.ptxas13, quiet=args.quiet, merge=True)
    if out.resolve() != user_kernel_dir().resolve():
        print(f"The loader searches FUSEDLORA_KERNEL_PATH, then {user_kernel_dir()}, then the wheel's set: to use "
              f"these kernels, export FUSEDLORA_KERNEL_PATH={out.resolve()} (':'-separated for several folders)")
    else:
        print(f"The loader finds these kernels in {out} by itself (no environment variable needed)")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
