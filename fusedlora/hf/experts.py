"""`fusedlora.quantize_experts(model)`: every routed-expert weight of a PEFT MoE model in bitsandbytes NF4 (issue 36).

transformers' 4-bit loading quantises `nn.Linear`s only, so the 3-D expert stacks (nearly all of an MoE model's
weights) stay in bf16 (docs/moe-design.md section 1.7). This stores each stack as one `bnb.nn.Params4bit`
quantised by bitsandbytes' own `quantize_4bit` (the bytes are bitsandbytes'), `quant_state.shape` the stored
3-D layout, which fusedlora's MoE path dequantises a chunk of experts at a time. Call it after `peft.get_peft_model`: PEFT reads
the expert parameters' 3-D shapes when it adds `target_parameters` LoRA, and a Params4bit is stored flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .apply import find_hf_model
from .families import FAMILIES
from .forwards import PATCH_ATTR
from .moe import EXPERT_PARAMS, NF4ExpertsGuard, UnsupportedExperts, base_experts, expert_weight

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class QuantizedExperts:
    """What quantize_experts did: blocks and expert tensors stored in NF4, their parameters, and the bytes
    their storage takes (packed codes, absmax, double-quantisation statistics and code books) before and after."""

    blocks: int = 0
    tensors: int = 0
    already_quantised: int = 0
    parameters: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list = field(default_factory=list)

    def add(self, other: "QuantizedExperts"):
        for f in ("blocks", "tensors", "already_quantised", "parameters", "bytes_before", "bytes_after"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def bytes_per_parameter(self) -> float:
        return self.bytes_after / self.parameters if self.parameters else 0.0

    def __str__(self) -> str:
        lines = [
            f"fusedlora.quantize_experts: {self.tensors} expert tensors of {self.blocks} MoE blocks in NF4 "
            f"({self.parameters:,} parameters, {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB, {self.bytes_per_parameter:.3f} bytes a parameter)"
        ]
        if self.already_quantised:
            lines.append(f"  {self.already_quantised} expert tensors were NF4 already (left as they were)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __repr__ = __str__


def nf4_bytes(weight) -> int:
    """Bytes an NF4 Params4bit takes: its packed codes, absmax, and with double quantisation the second-level
    absmax and code book (the 16-entry NF4 code book counted too)."""
    qs = weight.quant_state
    tensors = [weight.data, qs.absmax, qs.code]
    if getattr(qs, "nested", False):
        tensors += [qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_block(block, *, blocksize: int = 64, double_quant: bool = True) -> QuantizedExperts:
    """quantize_experts for one MoE block (its experts under any PEFT wrappers); NF4 tensors are left as they are."""
    import bitsandbytes as bnb

    done = QuantizedExperts(blocks=1)
    experts = base_experts(block)
    for name in EXPERT_PARAMS:
        try:
            W, quant, _ = expert_weight(experts, name)
        except UnsupportedExperts as e:
            raise ValueError(f"fusedlora.quantize_experts: {type(block).__name__}: {e}") from None
        if quant is not None:
            done.already_quantised += 1
            continue
        if W.requires_grad:
            raise RuntimeError(
                f"fusedlora.quantize_experts: {type(experts).__name__}.{name} requires grad (full "
                "fine-tuning of the experts?): NF4 weights are frozen; freeze it or keep it unquantised"
            )
        if W.device.type == "meta":
            raise ValueError(
                f"fusedlora.quantize_experts: {type(experts).__name__}.{name} is on the meta device; "
                "load the weights first"
            )
        with torch.no_grad():
            packed, qs = bnb.functional.quantize_4bit(
                W.data.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
            )
        stored = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=qs,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type="nf4",
            bnb_quantized=True,
        )
        done.parameters += W.numel()
        done.bytes_before += W.numel() * W.element_size()
        done.bytes_after += nf4_bytes(stored)
        done.tensors += 1
        setattr(experts, name, stored)  # (the last reference to the unquantised stack)
    if "forward" not in block.experts.__dict__:
        block.experts.forward = NF4ExpertsGuard(block.experts)
    return done


def _moe_blocks(model):
    hf = find_hf_model(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or not family.moe_block:
        served = ", ".join(k for k, f in FAMILIES.items() if f.moe_block)
        raise ValueError(
            f"fusedlora.quantize_experts: model_type {model_type!r} has no MoE block fusedlora serves ({served})"
        )
    return [m for m in model.modules() if type(m).__name__ in family.moe_block]


def _peft_applied(model) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) or any("lora_A" in m._modules for m in model.modules())


def quantize_experts(model, *, blocksize: int = 64, double_quant: bool = True) -> QuantizedExperts:
    """Store every routed-expert weight (gate_up_proj, down_proj) of a PEFT-wrapped MoE model in bitsandbytes NF4
    (blocksize, double quantisation of the absmax), on the device each weight is on, one tensor at a time. The
    experts then hold about 0.52 bytes a parameter (0.56 without double_quant) instead of 2 (bf16).

    Call after `peft.get_peft_model` (LoRA on the experts via `target_parameters` or not) and before training;
    the model then runs its MoE blocks only through `fusedlora.patch(model)` (HF's and PEFT's experts paths
    cannot run NF4 stacks: an unpatched call raises, saying so). Returns what it did (print it)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"fusedlora.quantize_experts: expected the model (a PEFT-wrapped Hugging Face MoE model, a "
            f"torch.nn.Module), got {type(model).__name__}"
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"fusedlora.quantize_experts: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError("fusedlora.quantize_experts: the model has no MoE block of its family's classes")
    if not _peft_applied(model):
        raise RuntimeError(
            "fusedlora.quantize_experts: call it after peft.get_peft_model(model, config): PEFT reads "
            "the expert parameters' [experts, out, in] shapes when it adds LoRA to them, and NF4 stores "
            "them flat"
        )
    done = QuantizedExperts()
    for block in blocks:
        done.add(quantize_block(block, blocksize=blocksize, double_quant=double_quant))
    unpatched = sum(PATCH_ATTR not in b.__dict__ for b in blocks)
    if unpatched:
        done.notes.append(
            f"{unpatched} of the {len(blocks)} MoE blocks are not patched yet: call fusedlora.patch(model) "
            "before running the model"
        )
    return done
