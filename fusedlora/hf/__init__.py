"""Hugging Face integration: `patch(model)` routes a HF / PEFT decoder model through fusedlora's kernels.

Nothing in the library imports this package; it imports the ops and the LoRA functions."""

from .apply import compile_layers, cuda_graph_layers, find_hf_model, patch, unpatch
from .families import FAMILIES, Family
from .report import PatchReport

__all__ = [
    "patch",
    "unpatch",
    "compile_layers",
    "cuda_graph_layers",
    "PatchReport",
    "FAMILIES",
    "Family",
    "find_hf_model",
]
