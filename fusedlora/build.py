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
from .kernel_spec import Variant
from .loader import user_kernel_dir

_DTYPE_NAMES = {"bfloat16": ["bf16"], "float16": ["fp16"], "float32": ["fp32"], "half": ["fp16"]}


def _read_config(config: str | os.PathLike) -> Any:
    """JSON text, a config.json path or a model folder holding one: the parsed JSON, or a ValueError saying which
    of them `config` was taken for and what is wrong."""
    text = str(config)
    if text.lstrip().startswith(("{", "[")):
        source, raw = "the JSON text", text
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"the folder {text} has no config.json")
        elif not path.is_file():
            raise ValueError(f"no such file: {text} (expected a config.json path, a model folder or JSON text)")
        try:
            source, raw = str(path), path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{source} is not JSON ({e})") from None


def _size(cfg: dict, key: str, required: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ValueError(f"the model config has no {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"the model config's {key} is not a positive whole number: {value!r}")
    return value


def family_from_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The shape family of a HF model config (a dict, a JSON string, or a path to config.json or its folder);
    a ValueError names what is missing or malformed."""
    if not isinstance(config, dict):
        config = _read_config(config)
    if not isinstance(config, dict):
        raise ValueError(f"the model config is not a JSON object: {str(config)[:80]}")
    cfg = config.get("text_config") or config  # multimodal wrappers keep the decoder's sizes there
    if not isinstance(cfg, dict):
        raise ValueError("the model config's text_config is not a JSON object")
    hidden = _size(cfg, "hidden_size", required=True)
    heads = _size(cfg, "num_attention_heads")
    head_dim = _size(cfg, "head_dim") or (hidden // heads if heads else None)
    intermediate, vocab = _size(cfg, "intermediate_size"), _size(cfg, "vocab_size")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return {
        "hidden_sizes": [hidden],
        "head_dims": [head_dim] if head_dim else [],
        "intermediate_sizes": [intermediate] if intermediate else [],
        "vocab_sizes": [vocab] if vocab else [],
        "dtypes": _DTYPE_NAMES.get(dtype, ["bf16", "fp16"]),
    }


def variant_from_text(text: str) -> Variant:
    """A `--variant` string: a registered kernel's variant for a supported arch, else a ValueError saying why."""
    v = Variant.from_string(text)
    specs = registry.all_kernels()
    if v.kernel not in specs:
        raise ValueError(f"unknown kernel {v.kernel!r}; the kernels are {', '.join(sorted(specs))}")
    registry.parse_archs(str(v.arch))
    names = [n for n, k in specs[v.kernel].arg_kinds() if k != "constexpr"]
    if [n for n, _ in v.signature] != names:
        raise ValueError(f"the variant's signature names {[n for n, _ in v.signature]}; {v.kernel} takes {names}")
    return v


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
    ap = argparse.ArgumentParser(
        prog="python -m fusedlora.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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

    variants: list[Variant] = []
    for text in args.variant:
        try:
            variants.append(variant_from_text(text))
        except ValueError as e:
            ap.error(f"--variant: {e} (expected the string a FUSEDLORA_AOT_ONLY error prints)")
    if args.config:
        local = _local_arch() if args.arch is None else None
        if args.arch is None and local is None:
            ap.error("no GPU here: give --arch (e.g. --arch 90)")
        try:
            archs = registry.parse_archs(str(local) if args.arch is None else args.arch)
        except ValueError as e:
            ap.error(f"--arch: {e}" if args.arch is not None else f"this GPU is sm_{local}: {e}")
        try:
            family = family_from_config(args.config)
        except ValueError as e:
            ap.error(f"--config: {e}")
        variants += registry.family_variants(family, archs)
    out = Path(args.out) if args.out else user_kernel_dir()
    summary = aot.build(variants, out, jobs=args.jobs, ptxas13=args.ptxas13, quiet=args.quiet, merge=True)
    if out.resolve() != user_kernel_dir().resolve():
        print(
            f"The loader searches FUSEDLORA_KERNEL_PATH, then {user_kernel_dir()}, then the wheel's set: to use "
            f"these kernels, export FUSEDLORA_KERNEL_PATH={out.resolve()} (':'-separated for several folders)"
        )
    else:
        print(f"The loader finds these kernels in {out} by itself (no environment variable needed)")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
