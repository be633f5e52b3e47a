"""Sweep launch configurations of the kernels on the local GPU (JIT path) and print the fastest.

    python -m build_tools.tune [ce,glu,glu_lora,glu_lora_fwd,glu_lora_layout,glu_lora_dyb,energy_parts,triton_gemm,
                                gemm_glu,rope,rms,nf4,gptq,moe,moe_nf4]
    python -m build_tools.tune --smoke [names]     # tiny sizes, two configurations each, any device (CI: the CPU)

Each configuration runs through the op's own launcher under `KernelSpec.override` (constexprs, num_warps,
num_stages) and, for the persistent kernels, with the launcher's programs-per-SM constant set: the arguments and
grids are the op's, never written here. Timed fwd (+bwd) with CUDA-graph replay on fresh random bf16 inputs at
the issue's benchmark sizes. The winners go by hand into the kernel's registry entry beside its source
(csrc_triton/<op>/__init__.py: meta / config). energy_parts, triton_gemm, gemm_glu and glu_lora_layout are GPU
probes of alternatives, not sweeps."""

from __future__ import annotations

import contextlib
import importlib
import sys
import time

import torch
import triton

import csrc_triton.cross_entropy as ce_kernels
from csrc_triton.cross_entropy import CROSS_ENTROPY
from csrc_triton.glu import GLU_BWD, GLU_FWD
from csrc_triton.glu_lora import GLU_LORA_BWD, GLU_LORA_DYB, GLU_LORA_FWD
from csrc_triton.quant import GPTQ_DEQUANT, NF4_DEQUANT
from csrc_triton.rms_norm import RMS_NORM_BWD, RMS_NORM_FWD
from csrc_triton.rope import ROPE
from fusedlora import registry
from fusedlora.ops import glu_lora as glu_lora_ops

rms_ops = importlib.import_module("fusedlora.ops.rms_norm")  # (fusedlora.ops.rms_norm is also the function's name)

SMOKE = False  # --smoke: tiny sizes, two configurations per sweep, wall-clock timing (the CPU interpreter)
DEV = "cuda"
BF16 = torch.bfloat16


def _size(big, small):
    return small if SMOKE else big


def _configs(configs):
    configs = list(configs)
    return configs[:2] if SMOKE else configs


def _time(fn, graph=True):
    fn()
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench, do_bench_cudagraph

    if not graph:  # (a step whose autograd would be captured: timed eagerly)
        return do_bench(fn, warmup=10, rep=100, return_mode="median")

    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        return do_bench_cudagraph(fn, rep=100, return_mode="median")


@contextlib.contextmanager
def _setting(module, name, value):
    """module.name = value inside (a launcher's programs-per-SM constant)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _try_time(fn, label, graph=True):
    try:
        return _time(fn, graph)
    except (triton.runtime.errors.OutOfResources, RuntimeError, ValueError) as e:  # over the shared memory, say
        print(f"  skip {label}: {type(e).__name__}")
        return None


def report(name, results):
    results = [r for r in results if r[1] is not None]
    results.sort(key=lambda r: r[1])
    print(f"\n== {name}: best first")
    for cfg, ms, extra in results[:8]:
        print(f"  {ms:8.4f} ms  {extra}  {cfg}")
    return results


def _rnd(*shape, dtype=BF16):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def tune_ce():
    from fusedlora.ops.cross_entropy import ce_launch

    t, v = _size((8192, 128256), (8, 512))
    z, y = _rnd(t, v), torch.randint(0, v, (t,), device=DEV)
    loss, lse, g = torch.empty(t, device=DEV), torch.empty(t, device=DEV), torch.empty_like(z)
    scale = torch.ones(1, device=DEV)
    res = []
    for per_sm, block, warps in _configs(
        (p, b, w) for p in (4, 0) for b in (4096, 8192, 16384, 32768) for w in (8, 16, 32)
    ):
        block = min(block, triton.next_power_of_2(v))
        with _setting(ce_kernels, "CE_PROGRAMS_PER_SM", per_sm), CROSS_ENTROPY.override(BLOCK_V=block, num_warps=warps):
            ms = _try_time(
                lambda: ce_launch(z, y, loss, lse, g, scale, 0, -100, 0.0, None, None, "loss_and_grad"),
                (per_sm, block, warps),
            )
        res.append(((per_sm, block, warps), ms, f"{2 * z.numel() * 2 / ms / 1e6:.0f} GB/s (1R+1W)" if ms else ""))
    return report("cross_entropy loss_and_grad (programs per SM (0: one per row), BLOCK_V, warps)", res)


def tune_glu():
    from fusedlora.ops.glu import glu_backward, glu_forward

    n = _size(8192 * 14336, 4096)
    g, u, dy = _rnd(n), _rnd(n), _rnd(n)
    res = []
    for block, warps in _configs((b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)):

        def step():
            with GLU_FWD.override(BLOCK=block, num_warps=warps), GLU_BWD.override(BLOCK=block, num_warps=warps):
                glu_forward(g, u, "silu")
                glu_backward(dy, g, u, "silu", False)

        ms = _time(step)
        res.append(((block, warps), ms, f"{8 * n * 2 / ms / 1e9:.0f} GB/s"))
    return report("swiglu fwd+bwd (BLOCK, warps)", res)


def _lora_factors(t, i, r):
    """The LoRA MLP's rank-r operands at T = t, I = i: XA [t, 2r], dY B_d [t, r], B_g, B_u [i, r], A_d [r, i]."""
    return _rnd(t, 2 * r), _rnd(t, r), _rnd(i, r), _rnd(i, r), _rnd(r, i)


TILES_BWD = (
    (16, 128, 4, 3),
    (16, 128, 4, 2),
    (16, 128, 4, 4),
    (32, 64, 4, 3),
    (32, 64, 4, 4),
    (16, 64, 4, 3),
    (16, 64, 4, 4),
    (32, 128, 8, 3),
    (32, 128, 4, 3),
    (16, 256, 8, 3),
)
TILES_FWD = (
    (16, 128, 4, 4),
    (16, 128, 4, 3),
    (32, 64, 4, 4),
    (32, 128, 8, 3),
    (32, 128, 4, 4),
    (64, 128, 8, 3),
    (64, 128, 8, 2),
    (16, 64, 4, 4),
    (16, 256, 8, 4),
    (32, 64, 4, 3),
)


def _lora_tile_configs(tiles):
    return _configs((bm, bn, w, st, p) for bm, bn, w, st in tiles for p in (2, 4, 8))


def tune_glu_lora():
    """The LoRA MLP's fused GLU backward at Llama-3.2-1B sizes (T 8192, I 8192, r 16), partial sums
    included, against what it replaces: the GLU backward storing h plus three rank-16 GEMMs."""
    t, i, r = _size((8192, 8192, 16), (32, 256, 16))
    dh, e, g = _rnd(t, i), _rnd(t, i), _rnd(t, i)
    de, dg = torch.empty_like(e), torch.empty_like(g)
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    res = []
    for bm, bn, warps, stages, per_sm in _lora_tile_configs(TILES_BWD):
        with (
            _setting(glu_lora_ops, "GLU_LORA_PROGRAMS_PER_SM", per_sm),
            GLU_LORA_BWD.override(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, num_warps=warps, num_stages=stages),
        ):
            ms = _try_time(
                lambda: glu_lora_ops.glu_lora_backward(
                    dh, e, g, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu", out=(de, dg)
                ),
                (bm, bn, warps, stages),
            )
        res.append(((bm, bn, warps, stages, per_sm), ms, f"{5 * t * i * 2 / ms / 1e6:.0f} GB/s (3R+2W)" if ms else ""))
    report("glu_lora_bwd + partial sum (BLOCK_M, BLOCK_N, warps, stages, programs/SM)", res)
    from fusedlora.ops.glu import glu_backward

    def separate():
        glu_backward(dh.clone(), e, g, "silu", False, store_h=True)
        de.t() @ xa[:, :r], dg.t() @ xa[:, r:], dh.t() @ dyb

    print(f"  separate (glu_bwd STORE_H + 3 GEMMs): {_time(separate):.4f} ms")
    return res


def tune_glu_lora_fwd():
    """The LoRA MLP's GLU forward with the gate/up adapter terms (T 8192, I 8192, r 16; e | g the halves of one
    [T, 2I + 64] buffer), against glu_fwd on the same buffer (no adapter terms)."""
    from fusedlora.ops.glu import glu_forward

    t, i, r = _size((8192, 8192, 16), (32, 256, 16))
    eg = _rnd(t, 2 * i + 64)
    e, g = eg[:, :i], eg[:, i : 2 * i]
    xa, _, b_g, b_u, _ = _lora_factors(t, i, r)
    res = []
    for bm, bn, warps, stages, per_sm in _lora_tile_configs(TILES_FWD):
        with (
            _setting(glu_lora_ops, "GLU_LORA_PROGRAMS_PER_SM", per_sm),
            GLU_LORA_FWD.override(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, num_warps=warps, num_stages=stages),
        ):
            ms = _try_time(
                lambda: glu_lora_ops.glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu"),
                (bm, bn, warps, stages),
            )
        res.append(((bm, bn, warps, stages, per_sm), ms, f"{3 * t * i * 2 / ms / 1e6:.0f} GB/s (2R+1W)" if ms else ""))
    report("glu_lora_fwd (BLOCK_M, BLOCK_N, warps, stages, programs/SM)", res)
    print(f"  glu_fwd on the same buffer (no adapter terms): {_time(lambda: glu_forward(e, g, 'silu')):.4f} ms")
    return res


def tune_glu_lora_layout():
    """The LoRA MLP's GLU kernels (T 8192, I 8192, r 16) on each layout of e, g and de | dg: separate
    contiguous tensors, or the halves of one [T, 2I + pad] buffer (what one N = 2I gate/up GEMM writes and
    one K = 2I + 2r dX GEMM reads)."""
    from fusedlora.ops.glu import glu_forward
    from fusedlora.ops.glu_lora import glu_lora_backward, glu_lora_dyb, glu_lora_forward

    t, i, r = 8192, 8192, 16
    dh = _rnd(t, i)
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    for pad in (None, 32, 64, 128, 256, 1024):
        if pad is None:
            e, g = _rnd(t, i), _rnd(t, i)
            dyb_out = torch.empty(t, 2 * r, device=DEV, dtype=BF16)
        else:
            eg = _rnd(t, 2 * i + pad)
            e, g = eg[:, :i], eg[:, i : 2 * i]
            dyb_out = eg[:, 2 * i : 2 * i + 2 * r]
        fwd = _time(lambda: glu_forward(e, g, "silu"))
        lfwd = _time(lambda: glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu"))
        bwd = _time(lambda: glu_lora_backward(dh, e, g, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu", out=(e, g)))
        dy = _time(lambda: glu_lora_dyb(e, g, b_g, b_u, (0.5, 2.0), out=dyb_out))
        print(
            f"  pad {pad}: glu_fwd {fwd:.4f} ms, glu_lora_fwd {lfwd:.4f} ms, glu_lora_bwd {bwd:.4f} ms, "
            f"glu_lora_dyb {dy:.4f} ms"
        )


def tune_glu_lora_dyb():
    """The LoRA MLP backward's [s de B_g | s dg B_u] (T 8192, I 8192, r 16) against two GEMMs + cat; on a GPU
    also the sustained energy in the fused path's layout against cuBLAS."""
    t, i, r = _size((8192, 8192, 16), (32, 256, 16))
    de, dg = _rnd(t, i), _rnd(t, i)
    b_g, b_u = _rnd(i, r), _rnd(i, r)
    out = torch.empty(t, 2 * r, device=DEV, dtype=BF16)
    res = []
    for bm, bn, warps, stages in _configs(
        (bm, bn, w, s) for bm in (16, 32, 64) for bn in (64, 128, 256) for w, s in ((4, 2), (4, 3), (4, 4), (8, 3))
    ):
        with GLU_LORA_DYB.override(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages):
            ms = _try_time(
                lambda: glu_lora_ops.glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=out), (bm, bn, warps, stages)
            )
        res.append(((bm, bn, warps, stages), ms, f"{2 * t * i * 2 / ms / 1e6:.0f} GB/s" if ms else ""))
    report("glu_lora_dyb (BLOCK_M, BLOCK_N, warps, stages)", res)

    def separate():
        torch.cat(
            [
                torch.empty(t, r, device=DEV, dtype=BF16).addmm_(de, b_g, beta=0, alpha=0.5),
                torch.empty(t, r, device=DEV, dtype=BF16).addmm_(dg, b_u, beta=0, alpha=2.0),
            ],
            1,
        )

    print(f"  separate (two GEMMs + cat): {_time(separate):.4f} ms")
    if not SMOKE:
        _dyb_energy(t, i, r, b_g, b_u)
    return res


def _dyb_energy(t, i, r, b_g, b_u):
    """Sustained energy in the fused path's layout (de | dg | G in one [T, 2I + 64] buffer): the kernel vs
    cuBLAS, as one GEMM over [de | dg] with a block-diagonal [s_g B_g, 0; 0, s_u B_u] or two GEMMs."""
    from fusedlora.ops.glu_lora import glu_lora_dyb

    d = _rnd(t, 2 * i + 64)
    g_cols = d[:, 2 * i : 2 * i + 2 * r]
    blk = torch.zeros(2 * i, 2 * r, device=DEV, dtype=BF16)

    def block_gemm():
        blk[:i, :r].copy_(b_g).mul_(0.5)
        blk[i:, r:].copy_(b_u).mul_(2.0)
        g_cols.copy_(d[:, : 2 * i] @ blk)

    def two_gemms():
        g_cols[:, :r].copy_(torch.empty(t, r, device=DEV, dtype=BF16).addmm_(d[:, :i], b_g, beta=0, alpha=0.5))
        g_cols[:, r:].copy_(torch.empty(t, r, device=DEV, dtype=BF16).addmm_(d[:, i : 2 * i], b_u, beta=0, alpha=2.0))

    def kernel():
        return glu_lora_dyb(d[:, :i], d[:, i : 2 * i], b_g, b_u, (0.5, 2.0), out=g_cols)

    ref = kernel().float()
    for name, fn in (("cuBLAS, one block-diagonal GEMM", block_gemm), ("cuBLAS, two GEMMs", two_gemms)):
        fn()
        err = float((g_cols.float() - ref).abs().max() / ref.abs().max())
        print(f"  {name}: {_time(fn):.4f} ms cool, max error vs the kernel / max {err:.1e}")
    print("== sustained")
    for name, fn in (
        ("glu_lora_dyb", kernel),
        ("cuBLAS, one block-diagonal GEMM", block_gemm),
        ("cuBLAS, two GEMMs", two_gemms),
        ("glu_lora_dyb (again)", kernel),
    ):
        _print_energy(name, fn)


def _print_energy(name, fn, settle_s=1.5, measure_s=3.0):
    from build_tools.profile_lora import captured, graph_energy

    ms, joules, sm, _ = graph_energy(captured(fn, warmup=2), settle_s, measure_s)
    print(f"  {name:62s} {ms * 1e3:8.1f} us  {joules * 1e3:7.2f} mJ  {joules / ms * 1e3:4.0f} W  {sm} MHz", flush=True)


def tune_energy_parts():
    """Energy per call of the NF4 LoRA MLP step's parts under sustained replay (T = I = 8192, H 2048, r 16):
    on a power-capped GPU a step takes its energy / cap, so this, not cool kernel time, says what a change
    can gain. (`profile_lora MLP --nf4 --energy` gives the whole step's, PEFT's beside it.)"""
    from fusedlora.ops.glu_lora import glu_forward, glu_lora_backward, glu_lora_dyb, glu_lora_forward

    t, i, h, r = 8192, 8192, 2048, 16
    eg = torch.randn(t, 2 * i + 64, device=DEV, dtype=BF16)
    e, g = eg[:, :i], eg[:, i : 2 * i]
    d = torch.empty_like(eg)
    de, dg = d[:, :i], d[:, i : 2 * i]
    dh, hid = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    x, dy, y = (torch.randn(t, h, device=DEV, dtype=BF16) for _ in range(3))
    w_gu = torch.randn(2 * i, h, device=DEV, dtype=BF16) * 0.02
    w_d = torch.randn(h, i, device=DEV, dtype=BF16) * 0.02
    w_dx = torch.randn(2 * i + 2 * r, h, device=DEV, dtype=BF16) * 0.02

    def gemms():  # the step's four base GEMMs, as LoRA_MLP's fused path calls them
        torch.mm(x, w_gu.t(), out=eg[:, : 2 * i])
        y.addmm_(hid, w_d.t())
        torch.mm(dy, w_d, out=dh)
        torch.mm(d[:, : 2 * i + 2 * r], w_dx)

    def bwd():
        return glu_lora_backward(dh, e, g, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu", out=(de, dg))

    def bwd_dyb():
        bwd()
        glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=d[:, 2 * i : 2 * i + 2 * r])

    print("\n== sustained energy per call (NVML)")
    _print_energy("four base GEMMs (gate/up, down beta = 1, dh, dX), cuBLAS", gemms)
    _print_energy("glu_lora_bwd + glu_lora_dyb", bwd_dyb)
    _print_energy("glu_lora_bwd", bwd)
    _print_energy("glu_lora_fwd", lambda: glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu"))
    _print_energy("glu_fwd (no adapter terms)", lambda: glu_forward(e, g, "silu"))
    plain = registry.get("glu_bwd").fn
    e2, g2 = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
    de2, dg2 = torch.empty_like(e2), torch.empty_like(g2)
    _print_energy(
        "glu_bwd (no adapter terms, contiguous, h not stored)",
        lambda: plain[((t * i + 2047) // 2048,)](
            dh, e2, g2, de2, dg2, de2, t * i, ACT=0, STORE_H=0, BLOCK=2048, num_warps=16
        ),
    )
    _print_energy("h A_d^T GEMM (reads h, 128 MiB)", lambda: hid @ a_d.t())
    _print_energy("copy of 256 MiB (for scale)", lambda: d.copy_(eg))


def tune_triton_gemm():
    """build_tools.gemm_probe's Triton GEMMs vs cuBLAS at the LoRA MLP's gate/up shape, [8192, 2048] x
    [2048, 16384] bf16: cool time (graph replay) and sustained energy of the best two."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from build_tools.gemm_probe import gemm_abt_ptr, gemm_abt_tma

    m, k, n = 8192, 2048, 16384
    a = torch.randn(m, k, device=DEV, dtype=BF16)
    b = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
    c = torch.empty(m, n, device=DEV, dtype=BF16)
    ref = a @ b.t()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cands = []
    for bm, bn, bk, warps, stages in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)):

        def ptr(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
            gemm_abt_ptr[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
                a, b, c, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages, num_warps=warps, num_stages=stages
            )

        descs = (
            TensorDescriptor.from_tensor(a, [bm, bk]),
            TensorDescriptor.from_tensor(b, [bn, bk]),
            TensorDescriptor.from_tensor(c, [bm, bn]),
        )

        def tma(descs=descs, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
            gemm_abt_tma[(sms,)](
                *descs,
                m,
                n,
                k,
                BM=bm,
                BN=bn,
                BK=bk,
                GROUP_M=8,
                STAGES=stages,
                NUM_SMS=sms,
                num_warps=warps,
                num_stages=stages,
            )

        for kind, fn in (("pointer loads", ptr), ("persistent TMA", tma)):
            name = f"triton {kind} {bm}x{bn}x{bk}, {warps} warps, {stages} stages"
            try:
                fn()
                torch.cuda.synchronize()
                ok = bool((c.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max())
                cands.append((_time(fn), name, fn, ok))
            except Exception as e:  # (a config over the shared-memory limit)
                print(f"  {name}: {type(e).__name__}: {str(e)[:120]}")
    cands.sort(key=lambda r: r[0])
    print(
        f"\n== gate/up shape GEMM, cool (graph replay)\n  cuBLAS {_time(lambda: torch.mm(a, b.t(), out=c)) * 1e3:.1f} us"
    )
    for ms, name, _, ok in cands:
        print(f"  {name}: {ms * 1e3:.1f} us{'' if ok else '  (differs from cuBLAS)'}")
    print("== sustained")
    _print_energy("cuBLAS", lambda: torch.mm(a, b.t(), out=c))
    for _, name, fn, _ in cands[:2]:
        _print_energy(name, fn)
    _print_energy("cuBLAS (again)", lambda: torch.mm(a, b.t(), out=c))


def tune_gemm_glu():
    """build_tools.gemm_probe's gemm_glu_lora_fwd_kernel (the gate/up GEMM with the LoRA GLU forward in its
    epilogue, sm_90) against what it would replace, cuBLAS into e | g + glu_lora_fwd, at the LoRA MLP's shape
    (T = I = 8192, H 2048, r 16): cool time of tile configs, then sustained energy of the best three between
    two runs of the pair."""
    from build_tools.gemm_probe import gemm_glu_lora_fwd, naive_gemm_glu_lora_fwd, use_torch_scratch
    from fusedlora.ops.glu_lora import glu_lora_forward

    use_torch_scratch()
    t, i, h, r = 8192, 8192, 2048, 16
    x = torch.randn(t, h, device=DEV, dtype=BF16)
    w = torch.randn(2 * i, h, device=DEV, dtype=BF16) * 0.02
    eg = torch.empty(t, 2 * i + 64, device=DEV, dtype=BF16)
    e, g = eg[:, :i], eg[:, i : 2 * i]
    hid = torch.empty(t, i, device=DEV, dtype=BF16)
    xa, _, b_g, b_u, _ = _lora_factors(t, i, r)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = slice(0, 256)  # a float64 check on a slice of rows: the whole product would take seconds
    ref = naive_gemm_glu_lora_fwd(x[rows], w[:i], w[i:], xa[rows, :r], xa[rows, r:], b_g, b_u, (0.5, 2.0))

    def old():
        torch.mm(x, w.t(), out=eg[:, : 2 * i])
        return glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu")

    cands = []
    for bm, bn, bk, group_m, warps, stages, flat in (
        (128, 128, 64, 8, 8, 3, 0),
        (128, 128, 64, 16, 8, 3, 0),
        (128, 128, 64, 8, 8, 3, 1),
        (128, 128, 64, 16, 8, 3, 1),
        (128, 128, 128, 16, 8, 2, 0),
        (128, 64, 64, 16, 4, 4, 1),
    ):

        def new(
            tile=(bm, bn, bk, group_m, stages),
            warps=warps,
            flat=flat,
            progs=min(sms, triton.cdiv(t, bm) * triton.cdiv(i, bn)),
        ):
            gemm_glu_lora_fwd(
                x,
                w[:i],
                w[i:],
                xa,
                r,
                b_g,
                b_u,
                (0.5, 2.0),
                (e, g),
                hid,
                programs=progs,
                warps=warps,
                tile=tile,
                flatten=flat,
            )

        name = f"fused {bm}x(2x{bn})x{bk} group {group_m}, {warps} warps, {stages} stages{', flat' if flat else ''}"
        try:
            new()
            torch.cuda.synchronize()
            err = max(
                float((got[rows].double() - want).abs().max() / want.abs().max()) for got, want in zip((e, g, hid), ref)
            )
            cands.append((_time(new), name, new, err))
        except Exception as ex:  # (a config over the shared-memory or register limit)
            print(f"  {name}: {type(ex).__name__}: {str(ex)[:160]}")
    cands.sort(key=lambda c: c[0])
    print(
        f"\n== gate/up GEMM + LoRA GLU forward, cool (graph replay)\n  cuBLAS + glu_lora_fwd {_time(old) * 1e3:.1f} us"
        f"  (cuBLAS alone {_time(lambda: torch.mm(x, w.t(), out=eg[:, : 2 * i])) * 1e3:.1f} us)"
    )
    for ms, name, _, err in cands:
        print(f"  {name}: {ms * 1e3:.1f} us  (max error / max |ref| {err:.1e})")
    print("== sustained")
    _print_energy("cuBLAS + glu_lora_fwd", old)
    for _, name, new, _ in cands[:3]:
        _print_energy(name, new)
    _print_energy("cuBLAS + glu_lora_fwd (again)", old)


def tune_rope():
    from fusedlora.ops.rope import rope_launch

    bsz, hq, hk, s, d = _size((4, 32, 8, 2048, 128), (1, 4, 2, 8, 64))
    q = torch.randn(bsz, s, hq, d, device=DEV, dtype=BF16).transpose(1, 2)
    k = torch.randn(bsz, s, hk, d, device=DEV, dtype=BF16).transpose(1, 2)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    cos, sin = _rnd(4 * s, d), _rnd(4 * s, d)
    pos = torch.arange(s, device=DEV)[None].expand(bsz, s).contiguous()
    res = []
    for bh, warps in _configs((bh, w) for bh in (4, 8, 16, 32) for w in (1, 2, 4, 8)):
        with ROPE.override(BLOCK_H=bh, num_warps=warps):
            ms = _time(lambda: rope_launch(q, k, qo, ko, cos, sin, pos, False))
        res.append(((bh, warps), ms, f"{2 * (q.numel() + k.numel()) * 2 / ms / 1e9:.0f} GB/s"))
    return report("rope fwd (BLOCK_H, warps)", res)


def tune_rms():
    m, n = _size((8192, 4096), (16, 256))
    x, dy, w = _rnd(m, n), _rnd(m, n), _rnd(n)
    y, rstd = rms_ops.rms_norm_forward(x, w, 1e-6, 0.0, False)
    from fusedlora.ops._common import sm_count

    sms = sm_count(x.get_device())
    res = []
    for warps in _configs((4, 8, 16)):
        with RMS_NORM_FWD.override(num_warps=warps):
            ms = _time(lambda: rms_ops.rms_norm_forward(x, w, 1e-6, 0.0, False))
        res.append((("fwd", warps), ms, f"{2 * x.numel() * 2 / ms / 1e9:.0f} GB/s"))
    for per_sm, warps in _configs((p, w) for p in (1, 2, 4, 8) for w in (4, 8, 16)):
        with _setting(rms_ops, "RMS_BWD_PROGRAMS_PER_SM", per_sm), RMS_NORM_BWD.override(num_warps=warps):
            ms = _time(lambda: rms_ops.rms_norm_backward(dy, x, w, rstd, 0.0, False))
        res.append((("bwd", per_sm, warps), ms, f"{3 * x.numel() * 2 / ms / 1e9:.0f} GB/s ({per_sm * sms} programs)"))
    return report("rms_norm (fwd warps | bwd per_sm, warps)", res)


def tune_nf4():
    from fusedlora.quant import _synthetic_nf4, dequantize_nf4

    res_all = []
    for shape in _size(((4096, 4096), (28672, 8192)), ((64, 128),)):
        packed, qs = _synthetic_nf4(shape, True, DEV, BF16)
        n = shape[0] * shape[1]
        res = []
        for block, warps in _configs((b, w) for b in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16)):
            with NF4_DEQUANT.override(BLOCK=block, num_warps=warps):
                ms = _time(lambda: dequantize_nf4(packed, qs))
            res.append(((block, warps), ms, f"{(n // 2 + n // 64 + 2 * n) / ms / 1e6:.0f} GB/s"))
        res_all += report(f"nf4 nested bf16 {shape} (BLOCK, warps)", res)
    # row-strided: a gate weight [8192, 2048] into the [W | s B] buffer [8192, 2080] of the LoRA MLP
    rows, row_len, ld = _size((8192, 2048, 2080), (8, 128, 160))
    packed, qs = _synthetic_nf4((rows, row_len), True, DEV, BF16)
    buf = torch.empty(rows, ld, device=DEV, dtype=BF16)
    n, res = rows * row_len, []
    for block, warps in _configs((b, w) for b in (512, 1024, 2048) for w in (1, 2, 4)):
        block = min(block, row_len)
        with NF4_DEQUANT.override(BLOCK=block, num_warps=warps):
            ms = _time(lambda: dequantize_nf4(packed, qs, out=buf[:, :row_len]))
        res.append(((block, warps), ms, f"{(n // 2 + n // 64 + 2 * n) / ms / 1e6:.0f} GB/s"))
    return res_all + report(f"nf4 nested bf16 {rows}x{row_len} into a [{rows}, {ld}] buffer (BLOCK, warps)", res)


def tune_gptq():
    from fusedlora.quant import dequantize_gptq

    in_f = out_f = _size(8192, 128)
    group = 128 if not SMOKE else 32
    qw = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device=DEV).to(torch.int32)
    qz = torch.randint(-(2**31), 2**31 - 1, (in_f // group, out_f // 8), dtype=torch.int64, device=DEV).to(torch.int32)
    sc = (torch.rand(in_f // group, out_f, device=DEV) * 0.01).half()
    nbytes = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2 + in_f * out_f * 2
    res_all = []
    for transpose in (False, True):
        res = []
        for bi, bo, warps in _configs((bi, bo, w) for bi in (32, 64, 128) for bo in (32, 64, 128) for w in (2, 4, 8)):
            with GPTQ_DEQUANT.override(BLOCK_I=bi, BLOCK_O=bo, num_warps=warps):
                ms = _try_time(
                    lambda: dequantize_gptq(qw, qz, sc, group_size=group, transpose=transpose), (bi, bo, warps)
                )
            res.append(((bi, bo, warps), ms, f"{nbytes / ms / 1e6:.0f} GB/s" if ms else ""))
        res_all += report(
            f"gptq {in_f}^2 fp16 {'[in, out]' if transpose else '[out, in]'} (BLOCK_I, BLOCK_O, warps)", res
        )
    return res_all


# (BN, BK, warps, stages): the kernels with two [BM, BN] accumulators or a GLU epilogue over I, and those over H
_MOE_NARROW = ((64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4))
_MOE_WIDE = ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4))
MOE_GEMM_CONFIGS = {
    "moe_gate_up_fwd": _MOE_NARROW,
    "moe_down_fwd": _MOE_WIDE,
    "moe_down_bwd": _MOE_NARROW,
    "moe_gate_up_bwd_dx": _MOE_WIDE,
}
MOE_SEG_CONFIGS = (
    (64, 128, 4, 2),
    (64, 64, 4, 2),
    (128, 128, 8, 2),
    (32, 128, 4, 2),
    (64, 256, 8, 2),
    (128, 64, 4, 3),
    (32, 64, 4, 3),
)  # (BM, BN, warps, stages)


def _moe_case(nf4: bool):
    """A Qwen3-30B-A3B layer's routed experts (T 4096, H 2048, I 768, 128 experts, top-8, LoRA r16 on both
    projections; fresh random bf16, uniform routing): (fwd + bwd step, fused-op arguments)."""
    from fusedlora.ops.moe_lora import ExpertProj, moe_lora_experts

    t, h, i, e, k, r = _size((4096, 2048, 768, 128, 8, 16), (32, 64, 48, 4, 2, 4))
    x = _rnd(t, h).requires_grad_()
    weights, index = torch.softmax(torch.randn(t, e, device=DEV), -1).topk(k, -1)
    weights = weights.to(BF16).requires_grad_()
    projs, leaves = [], []
    for n_out, n_in in ((2 * i, h), (h, i)):
        w = _rnd(e, n_out, n_in) * n_in**-0.5
        state = None
        if nf4:
            import bitsandbytes.functional as bnb_functional

            w, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        a = (torch.randn(e * r, n_in, device=DEV) * n_in**-0.5).requires_grad_()
        b = (torch.randn(n_out, r * e, device=DEV) * 0.01).requires_grad_()
        projs.append(ExpertProj(w, a, b, 2.0, quant_state=state))
        leaves += [a, b]
    dout = _rnd(t, h)

    def step(block_m):
        out = moe_lora_experts(x, index, weights, *projs, block_m=block_m)
        torch.autograd.grad(out, [x, weights, *leaves], dout)

    return step


def _tune_moe(nf4: bool):
    from csrc_triton import moe_lora as moe_kernels

    step = _moe_case(nf4)
    specs = {name: registry.get(name) for name in MOE_GEMM_CONFIGS}
    res = {}
    for block_m in (16, 32) if SMOKE else (64, 128):
        base = _try_time(lambda: step(block_m), f"block_m {block_m}", graph=False)
        print(f"  block_m {block_m}, the registry's tiles: {base} ms")
        for name, configs in MOE_GEMM_CONFIGS.items():
            for bn, bk, warps, stages in _configs(configs):
                with specs[name].override(BN=bn, BK=bk, num_warps=warps, num_stages=stages):
                    ms = _try_time(lambda: step(block_m), (name, block_m, bn, bk, warps, stages), graph=False)
                res.setdefault(name, []).append(((block_m, bn, bk, warps, stages), ms, f"fwd+bwd, base {base} ms"))
    seg = moe_kernels.MOE_LORA_SEG_GRAD
    for bm, bn, warps, stages in _configs(MOE_SEG_CONFIGS):
        with seg.override(BM=bm, BN=bn, num_warps=warps, num_stages=stages):
            ms = _try_time(
                lambda: step(moe_kernels.MOE_BLOCK_M if not SMOKE else 16), ("seg", bm, bn, warps, stages), graph=False
            )
        res.setdefault("moe_lora_seg_grad", []).append(((bm, bn, warps, stages), ms, "fwd+bwd"))
    for name, results in res.items():
        tile = "(BM, BN, warps, stages)" if name == "moe_lora_seg_grad" else "(block_m, BN, BK, warps, stages)"
        report(f"{name}{' NF4' if nf4 else ''} {tile}, the others at the registry's", results)
    return res


def tune_moe():
    """The routed-experts op (fusedlora.ops.moe_lora), bf16 experts: each grouped-GEMM kernel's tile with the
    others at the registry's, at block_m 64 and 128, then the LoRA-gradient kernel's; the whole fwd + bwd timed."""
    return _tune_moe(nf4=False)


def tune_moe_nf4():
    """As tune_moe with NF4 experts (bitsandbytes' quantiser): the same bf16 GEMM tiles, each timed with the
    chunk-at-a-time dequantisation in the step (fusedlora.ops.moe_lora), which shifts what the GEMMs share."""
    return _tune_moe(nf4=True)


SWEEPS = {
    "ce": tune_ce,
    "glu": tune_glu,
    "glu_lora": tune_glu_lora,
    "glu_lora_fwd": tune_glu_lora_fwd,
    "glu_lora_dyb": tune_glu_lora_dyb,
    "rope": tune_rope,
    "rms": tune_rms,
    "nf4": tune_nf4,
    "moe": tune_moe,
    "gptq": tune_gptq,
}
PROBES = {
    "glu_lora_layout": tune_glu_lora_layout,
    "energy_parts": tune_energy_parts,
    "triton_gemm": tune_triton_gemm,
    "gemm_glu": tune_gemm_glu,
    "moe_nf4": tune_moe_nf4,
}  # GPU only


def main(argv=None):
    global SMOKE, DEV
    args = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in args:
        args.remove("--smoke")
        SMOKE = True
        DEV = "cuda" if torch.cuda.is_available() else "cpu"
    # names as one comma list or as separate arguments ("ce,glu" or "ce glu")
    which = [w for a in (args or [",".join(SWEEPS) if SMOKE else "ce,glu,rope,rms"]) for w in a.split(",") if w]
    print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", torch.__version__)
    for w in which:
        if SMOKE and w in PROBES:
            raise SystemExit(f"{w} is a GPU probe, not a sweep: no --smoke run")
        {**SWEEPS, **PROBES}[w]()


if __name__ == "__main__":
    main()
