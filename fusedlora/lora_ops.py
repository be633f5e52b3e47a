"""The fused LoRA functions as torch.library custom ops: what `apply_lora_*` call under torch.compile.

`lora_o`, `lora_qkv` and `lora_mlp` take LoRA_O / LoRA_QKV / LoRA_MLP's arguments and run the same plan,
forward and backward functions inside the custom ops fusedlora::lora_{o,qkv,mlp} (and their *_backward).
They are defined beside the Functions, in `fusedlora.lora` (as each op of `fusedlora.ops` defines its custom
op beside its Function; there also what crosses the op boundary: `op_arguments`, `PROJECTION_ARGS`), and
named here too.
"""

from .lora import LORA_MLP_OP, LORA_O_OP, LORA_QKV_OP, PROJECTION_ARGS, lora_mlp, lora_o, lora_qkv, op_arguments  # noqa: F401
