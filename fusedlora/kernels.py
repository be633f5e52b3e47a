"""Declarations of every kernel (see `fusedlora.registry`). Torch-free: the AOT build imports it.

Shape families (`family` below) are dicts with lists: hidden_sizes, head_dims, intermediate_sizes,
vocab_sizes, dtypes. `build_tools/shapes.py` holds the common models' family; `fusedlora.build` derives
one from a HF config.
"""
from __future__ import annotations

from .registry import KernelSpec, register

MAX_NORM_COLS = 65536


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _norm_widths(family):
    return sorted(set(family.get("hidden_sizes", ())) | set(family.get("head_dims", ())))


# ---------------------------------------------------------------- RMSNorm
def rms_norm_meta(n_cols: int, gemma_cast: bool) -> dict:
    block_n = next_pow2(n_cols)
    if block_n > MAX_NORM_COLS:
        raise ValueError(f"rms_norm supports rows of at most {MAX_NORM_COLS} elements, got {n_cols}")
    # Small rows: several rows per program so each program still moves a few KB.
    block_m = max(1, min(16, 2048 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "GEMMA_CAST": int(bool(gemma_cast))}


def rms_norm_bwd_meta(n_cols: int, gemma_cast: bool) -> dict:
    m = rms_norm_meta(n_cols, gemma_cast)
    del m["BLOCK_M"]
    return m


def _row_warps(block_n: int) -> int:
    # H100 sweep (build_tools/tune.py, 8192x4096 bf16): fwd 8 warps 0.0475 ms; bwd 16 warps, 2 programs/SM
    if block_n >= 16384:
        return 16
    if block_n >= 4096:
        return 8
    if block_n >= 1024:
        return 4
    return 2


RMS_BWD_PROGRAMS_PER_SM = 2


def _rms_norm_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for n in _norm_widths(family):
            for gemma in (False, True):
                yield {"x": dt, "w": dt, "y": dt}, {"n_cols": n, "gemma_cast": gemma}


RMS_NORM_FWD = register(KernelSpec(
    name="rms_norm_fwd",
    module="csrc_triton.rms_norm", function="rms_norm_fwd_kernel",
    pointer_types={"X": "x", "W": "w", "Y": "y", "RSTD": "fp32"},
    float_args=("eps", "offset"),
    meta=rms_norm_meta,
    config=lambda arch, c: (_row_warps(c["BLOCK_N"] * c["BLOCK_M"]), 1),
    aot_variants=_rms_norm_aot,
    doc="RMSNorm forward, one or more rows per program",
))

RMS_NORM_BWD = register(KernelSpec(
    name="rms_norm_bwd",
    module="csrc_triton.rms_norm", function="rms_norm_bwd_kernel",
    pointer_types={"DY": "y", "X": "x", "W": "w", "RSTD": "fp32", "DX": "x", "DW_PARTIAL": "fp32"},
    float_args=("offset",),
    meta=rms_norm_bwd_meta,
    config=lambda arch, c: (min(16, 2 * _row_warps(c["BLOCK_N"])), 1),
    aot_variants=_rms_norm_aot,
    doc="RMSNorm backward (dx and per-program dw partial sums), persistent grid",
))


# ---------------------------------------------------------------- SwiGLU / GeGLU
GLU_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
GLU_BLOCK = 2048  # H100 sweep: 2048 elements, 16 warps: 0.614 ms fwd+bwd at 8192x14336 (torch.compile 0.620)


def glu_meta(act: str) -> dict:
    return {"ACT": GLU_ACTS[act], "BLOCK": GLU_BLOCK}


def glu_bwd_meta(act: str, store_h: bool = False) -> dict:
    return {**glu_meta(act), "STORE_H": int(bool(store_h))}


def _glu_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for act in GLU_ACTS:
            yield {"x": dt}, {"act": act}


def _glu_bwd_aot(family):
    for dtypes, shape in _glu_aot(family):
        for store_h in (False, True):  # True: the fused LoRA MLP backward
            yield dtypes, {**shape, "store_h": store_h}


GLU_FWD = register(KernelSpec(
    name="glu_fwd",
    module="csrc_triton.glu", function="glu_fwd_kernel",
    pointer_types={"GATE": "x", "UP": "x", "OUT": "x"},
    meta=glu_meta,
    config=lambda arch, c: (16, 1),
    aot_variants=_glu_aot,
    doc="act(gate) * up, act in SiLU / GELU / GELU-tanh",
))

GLU_BWD = register(KernelSpec(
    name="glu_bwd",
    module="csrc_triton.glu", function="glu_bwd_kernel",
    pointer_types={"DOUT": "x", "GATE": "x", "UP": "x", "DGATE": "x", "DUP": "x", "H": "x"},
    meta=glu_bwd_meta,
    config=lambda arch, c: (16, 1),
    aot_variants=_glu_bwd_aot,
    doc="gradients of act(gate) * up, activation recomputed; STORE_H also writes h over d(out)",
))


# The LoRA MLP's GLU backward with its token-reduced adapter products (tiles of BLOCK_M rows x BLOCK_N
# columns; each program walks one column tile down a group of rows, its loads software-pipelined STAGES deep).
# H100 sweep (build_tools/tune.py glu_lora; T = I = 8192, r 16, bf16), tenth session, two lent H100s: 16 x 128,
# 4 warps, 3 stages, 2 programs per SM (GLU_LORA_PROGRAMS_PER_SM): 0.242 / 0.237 ms with the partial
# sum (2.8 TB/s of 3R+2W); 32 x 64 0.245; the earlier 16 x 64, 4 per SM 0.300 ms (dh's load not pipelined).
GLU_LORA_TILE = (16, 128, 4, 3)  # BLOCK_M, BLOCK_N, warps, stages
GLU_LORA_PROGRAMS_PER_SM = 2  # both LoRA GLU kernels' grids (ops.glu.row_groups); best for each on an H100
GLU_LORA_RANKS = (8, 16, 32, 64)


def glu_lora_rank_pad(rank: int) -> int:
    return max(16, next_pow2(rank))  # tl.dot needs every dimension >= 16


def _glu_lora_tile_meta(tile, act: str, rank: int) -> dict:
    bm, bn, _, stages = tile
    r = glu_lora_rank_pad(rank)
    # [BLOCK_N, R] tiles held per program (the backward's three fp32 accumulators, both kernels' B / A
    # tiles): narrower column tiles past r = 64 keep them in registers (sm_90 build of the backward: 200
    # registers at r 64 / 64 columns, 240 at r 128 / 32 columns, no spills)
    return {"ACT": GLU_ACTS[act], "R": r, "BLOCK_M": bm, "BLOCK_N": max(16, min(bn, 4096 // r)), "STAGES": stages}


def glu_lora_bwd_meta(act: str, rank: int) -> dict:
    return _glu_lora_tile_meta(GLU_LORA_TILE, act, rank)


def _glu_lora_variants(family, backward: bool):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for act in GLU_ACTS:
            for r in GLU_LORA_RANKS:  # one rank for gate, up and down, XA = [X A_g^T, X A_u^T]
                down = {"rank_d": r} if backward else {}  # (stride_dh, stride_eg: 16-divisible, the default)
                ints = {"rank_g": r, "rank_u": r, **down, "stride_xa": 2 * r, "xa_up_offset": r}
                yield {"x": dt}, {"act": act, "rank": r}, {**ints, "stride_dyb": r} if backward else ints


def _glu_lora_aot(family):
    return _glu_lora_variants(family, backward=True)


GLU_LORA_BWD = register(KernelSpec(
    name="glu_lora_bwd",
    module="csrc_triton.glu", function="glu_lora_bwd_kernel",
    pointer_types={"DOUT": "x", "GATE": "x", "UP": "x", "DGATE": "x", "DUP": "x", "XA": "x", "DYB": "x",
                   "BG": "x", "BU": "x", "AD": "x", "Q_PART": "fp32"},
    float_args=("scale_g", "scale_u"),
    meta=glu_lora_bwd_meta,
    config=lambda arch, c: GLU_LORA_TILE[2:],
    aot_variants=_glu_lora_aot,
    doc="LoRA MLP backward: GLU gradients (adapter terms of e, g, dh added) plus the s de^T XA and h^T dY B "
        "partial sums, h never stored",
))


# The LoRA MLP's GLU forward from the base GEMM outputs, the gate/up adapter terms added per tile.
# H100 sweep (build_tools/tune.py glu_lora_fwd; T = I = 8192, r 16, bf16, e | g in one [T, 2I + 64] buffer),
# tenth session, loads pipelined (two lent H100s): 32 x 64, 4 warps, 4 stages, 2 programs per SM 0.1416 /
# 0.1420 ms; 16 x 128, 4 warps, 4 stages 0.1409 / 0.1460; 64 x 128, 8 warps 0.142-0.145; glu_fwd without the
# adapter terms 0.136 ms. (Before, nothing pipelined: 32 x 128, 8 warps 0.151.)
GLU_LORA_FWD_TILE = (32, 64, 4, 4)  # BLOCK_M, BLOCK_N, warps, stages


def glu_lora_fwd_meta(act: str, rank: int) -> dict:
    return _glu_lora_tile_meta(GLU_LORA_FWD_TILE, act, rank)


def _glu_lora_fwd_aot(family):
    return _glu_lora_variants(family, backward=False)


GLU_LORA_FWD = register(KernelSpec(
    name="glu_lora_fwd",
    module="csrc_triton.glu", function="glu_lora_fwd_kernel",
    pointer_types={"GATE": "x", "UP": "x", "XA": "x", "BG": "x", "BU": "x", "OUT": "x"},
    float_args=("scale_g", "scale_u"),
    meta=glu_lora_fwd_meta,
    config=lambda arch, c: GLU_LORA_FWD_TILE[2:],
    aot_variants=_glu_lora_fwd_aot,
    doc="LoRA MLP forward: act(e) * g with the gate/up adapter terms added to the base GEMM outputs",
))


# The LoRA MLP backward's rank-r products that reduce over I (s_g de B_g | s_u dg B_u): one program per
# BLOCK_M whole rows walking I in BLOCK_N columns. H100 sweep (build_tools/tune.py glu_lora_dyb; T = I =
# 8192, r 16): 32 x 128, 4 warps, 3 stages 0.094 ms (2.85 TB/s) vs 0.1005 ms for two GEMMs + cat. (The same
# row-owner walk also giving the forward's h and h A_d^T ran 0.30 ms at best vs 0.179 ms for glu_fwd + GEMM.)
GLU_LORA_DYB_TILE = (32, 128, 4, 3)  # BLOCK_M, BLOCK_N, warps, stages


def glu_lora_dyb_meta(rank: int) -> dict:
    """rank: the widest of B_g, B_u. RB, the B width the kernel reads, is the rank itself when it is a power
    of two (r = 8, PEFT's default, needs no padded copy of B) and R otherwise (the caller pads)."""
    bm, bn, _, _ = GLU_LORA_DYB_TILE
    r = glu_lora_rank_pad(rank)
    rb = rank if rank & (rank - 1) == 0 else r
    # two [BLOCK_N, R] B tiles per step: narrower column steps for wide ranks
    return {"R": r, "RB": rb, "BLOCK_M": bm, "BLOCK_N": max(16, min(bn, 4096 // r))}


def _glu_lora_dyb_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for r in GLU_LORA_RANKS:
            yield {"x": dt}, {"rank": r}


GLU_LORA_DYB = register(KernelSpec(
    name="glu_lora_dyb",
    module="csrc_triton.glu", function="glu_lora_dyb_kernel",
    pointer_types={"DE": "x", "DG": "x", "BG": "x", "BU": "x", "OUT": "x"},
    float_args=("scale_g", "scale_u"),
    meta=glu_lora_dyb_meta,
    config=lambda arch, c: GLU_LORA_DYB_TILE[2:],
    aot_variants=_glu_lora_dyb_aot,
    doc="LoRA MLP backward: [s_g de B_g | s_u dg B_u], the rank-r products reducing over I",
))


# ---------------------------------------------------------------- cross-entropy
CE_MODES = {"loss": 0, "loss_and_grad": 1, "grad": 2}


# H100, 8192 x 128256 bf16 loss+grad, op from triton 3.9 cubins: BLOCK_V 16384 / 32 warps 1.81 ms (64 registers:
# one 1024-thread program per SM, so 132 rows in flight and their second reads hit L2), 8192 / 16 1.84 ms
# (two programs per SM), 4096 / 8 2.01 ms, 16384 / 16 1.92 ms (107 registers)
CE_BLOCK = 16384
CE_PROGRAMS_PER_SM = 0  # 0: one program per row (persistent grids of 4 per SM measured slower)


def cross_entropy_meta(n_cols: int, softcap: bool, mode: str, smoothing: bool = False) -> dict:
    # SMOOTH only where the loss is computed: its sum over the row is one more reduction per chunk
    return {"BLOCK_V": min(CE_BLOCK, next_pow2(n_cols)), "HAS_SOFTCAP": int(bool(softcap)), "MODE": CE_MODES[mode],
            "SMOOTH": int(bool(smoothing) and mode != "grad")}


def _ce_warps(block_v: int) -> int:
    return 32 if block_v >= 16384 else 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def _ce_aot(family):
    vocab_blocks = {}
    for v in family.get("vocab_sizes", ()):
        vocab_blocks.setdefault(min(CE_BLOCK, next_pow2(v)), v)  # one variant per block size serves them all
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for v in vocab_blocks.values():
            for softcap in (False, True):
                for mode in CE_MODES:
                    for smoothing in ((False,) if mode == "grad" else (False, True)):
                        yield ({"x": dt, "label": "i64"},
                               {"n_cols": v, "softcap": softcap, "mode": mode, "smoothing": smoothing},
                               {"scale_stride": "1"} if mode == "grad" else {})


CROSS_ENTROPY = register(KernelSpec(
    name="cross_entropy",
    module="csrc_triton.cross_entropy", function="cross_entropy_kernel",
    pointer_types={"LOGITS": "x", "LABELS": "label", "LOSS": "fp32", "LSE": "fp32", "GRAD": "x", "SCALE": "fp32"},
    float_args=("label_smoothing", "softcap", "logit_scale"),
    meta=cross_entropy_meta,
    config=lambda arch, c: (_ce_warps(c["BLOCK_V"]), 1),
    aot_variants=_ce_aot,
    doc="row-wise cross-entropy: loss, lse and (optionally) the gradient in the logits' dtype",
))

CE_PREPARE_INV = {"count": 0, "divisor": 1, "given": 2}  # given: the caller writes INV

CE_PREPARE = register(KernelSpec(
    name="ce_prepare",
    module="csrc_triton.cross_entropy", function="ce_prepare_kernel",
    pointer_types={"LABELS": "label", "INV": "fp32", "OK": "i32"},
    float_args=("divisor",),
    meta=lambda inv: {"BLOCK": 2048, "INV_MODE": CE_PREPARE_INV[inv]},
    config=lambda arch, c: (8, 1),
    aot_variants=lambda family: (({"label": lt}, {"inv": inv}) for lt in ("i64", "i32") for inv in CE_PREPARE_INV),
    doc="cross-entropy set-up: labels range check and the loss scale (1 / count of used labels)",
))

SCALE_BLOCK = 4096
SCALE_PROGRAMS_PER_SM = 8  # persistent: s == 1 (the usual case) costs ~1000 empty programs, not one per block

SCALE_BY_SCALAR = register(KernelSpec(
    name="scale_by_scalar",
    module="csrc_triton.cross_entropy", function="scale_by_scalar_kernel",
    pointer_types={"X": "x", "S": "fp32"},
    meta=lambda: {"BLOCK": SCALE_BLOCK},
    config=lambda arch, c: (8, 1),
    aot_variants=lambda family: (({"x": dt}, {}) for dt in list(family.get("dtypes", ("bf16", "fp16"))) + ["fp32"]),
    doc="x *= s[0] in place, free when s[0] == 1",
))


# ---------------------------------------------------------------- RoPE
def rope_meta(half: int, n_pass: int, has_pos: bool, backward: bool) -> dict:
    block_half = next_pow2(half)
    # H100 sweep (B4 S2048 Hq32 Hk8 D128): 8 heads per program, 1 warp: 0.063 ms forward
    return {"BLOCK_H": max(1, min(16, 512 // block_half)), "BLOCK_HALF": block_half,
            "BLOCK_PASS": next_pow2(n_pass) if n_pass > 0 else 0,
            "HAS_POS": int(bool(has_pos)), "BACKWARD": int(bool(backward))}


def _rope_aot(family):
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for d in family.get("head_dims", ()):
            for has_pos in (False, True):
                for backward in (False, True):
                    for cdt in ((dt, "fp32") if has_pos else (dt,)):  # caches are often kept in fp32
                        yield ({"x": dt, "c": cdt, "pos": "i64" if has_pos else cdt},
                               {"half": d // 2, "n_pass": 0, "has_pos": has_pos, "backward": backward},
                               {"half": d // 2, "n_pass": 0, "pos_ss": 1 if has_pos else 0})


ROPE = register(KernelSpec(
    name="rope",
    module="csrc_triton.rope", function="rope_kernel",
    pointer_types={"Q": "x", "K": "x", "QO": "x", "KO": "x", "COS": "c", "SIN": "c", "POS": "pos"},
    meta=rope_meta,
    config=lambda arch, c: (1 if c["BLOCK_H"] * c["BLOCK_HALF"] <= 512 else 4, 1),
    aot_variants=_rope_aot,
    doc="rotary embedding of q and k (GQA) in one launch, optional position_ids gather",
))


# ---------------------------------------------------------------- quantised weights
NF4_BLOCK = 8192  # H100 sweep (build_tools/tune.py nf4): 8192 outputs / 2 warps, 2893 GB/s at 28672x8192
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def nf4_meta(blocksize: int, nested: bool, blocksize2: int = 256, row_len: int = 0) -> dict:
    """row_len > 0: the row-strided output (rows of row_len into a wider buffer); programs then cover the
    largest power of two that divides the row (<= NF4_BLOCK), so none straddles a row or needs a mask."""
    block = NF4_BLOCK if row_len <= 0 else max(int(blocksize), min(NF4_BLOCK, row_len & -row_len))
    return {"BLOCKSIZE": int(blocksize), "BLOCKSIZE2": int(blocksize2), "NESTED": int(bool(nested)), "BLOCK": block,
            "STRIDED": int(row_len > 0)}


def _nf4_aot(family):
    for dt in list(family.get("dtypes", ("bf16", "fp16"))) + ["fp32"]:
        for blocksize in (64, 128, 256):
            for nested in (False, True):
                yield ({"x": dt, "absmax": "u8" if nested else "fp32"}, {"blocksize": blocksize, "nested": nested},
                       {"row_len": 0, "out_row_stride": 0})
    # row-strided: a gate/up weight [I, H] into the [W | s B] buffer of the LoRA MLP (bitsandbytes' default
    # blocksize 64, fp16/bf16)
    blocks = {}
    for h in family.get("hidden_sizes", ()):
        blocks.setdefault(nf4_meta(64, False, row_len=h)["BLOCK"], h)
    for dt in family.get("dtypes", ("bf16", "fp16")):
        for h in blocks.values():
            for nested in (False, True):
                yield ({"x": dt, "absmax": "u8" if nested else "fp32"}, {"blocksize": 64, "nested": nested, "row_len": h})


NF4_DEQUANT = register(KernelSpec(
    name="nf4_dequant",
    module="csrc_triton.quant", function="nf4_dequant_kernel",
    pointer_types={"PACKED": "u8", "ABSMAX": "absmax", "ABSMAX2": "fp32", "CODE": "fp32", "CODE2": "fp32",
                   "OFFSET": "fp32", "OUT": "x"},
    meta=nf4_meta,
    config=lambda arch, c: (2, 1),
    aot_variants=_nf4_aot,
    doc="bitsandbytes NF4/FP4 dequantisation incl. the nested absmax, one launch",
))

# H100 sweep, 8192^2 4-bit fp16: [out, in] output 64 x 32 tiles / 2 warps (2472 GB/s);
# [in, out] output 32 x 128 / 4 warps (1984 GB/s).
GPTQ_TILES = {False: (64, 32, 2), True: (32, 128, 4)}


def gptq_meta(bits: int, has_g_idx: bool, transpose: bool = False) -> dict:
    bi, bo, _ = GPTQ_TILES[bool(transpose)]
    return {"BITS": int(bits), "HAS_GIDX": int(bool(has_g_idx)), "BLOCK_I": bi, "BLOCK_O": bo}


def _gptq_warps(c: dict) -> int:
    return 2 if (c["BLOCK_I"], c["BLOCK_O"]) == GPTQ_TILES[False][:2] else 4


def _gptq_aot(family):
    for dt in ("fp16", "bf16"):
        for bits in (4, 8, 2):
            for g in (False, True):
                yield ({"x": dt, "s": "fp16", "gidx": "i32"}, {"bits": bits, "has_g_idx": g}, {"out_stride_i": 1})


GPTQ_DEQUANT = register(KernelSpec(
    name="gptq_dequant",
    module="csrc_triton.quant", function="gptq_dequant_kernel",
    pointer_types={"QW": "i32", "QZ": "i32", "SCALES": "s", "G_IDX": "gidx", "OUT": "x"},
    meta=gptq_meta,
    config=lambda arch, c: (_gptq_warps(c), 1),
    aot_variants=_gptq_aot,
    doc="GPTQ (auto-gptq / gptqmodel) 2/4/8-bit dequantisation with act-order g_idx",
))
