"""Sweep launch configurations of the kernels on the local GPU (JIT path) and print the fastest.

    python -m build_tools.tune [ce,glu,glu_lora,glu_lora_fwd,glu_lora_layout,glu_lora_dyb,energy_parts,triton_gemm,
                                gemm_glu,rope,rms,nf4,gptq]

Each configuration is timed fwd (+bwd) with CUDA-graph replay on fresh random bf16 inputs at the
issue's benchmark sizes. The winners go by hand into the kernel's registry entry beside its source (csrc_triton/<op>.py: meta / config)."""
from __future__ import annotations

import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

from fusedlora import registry
from fusedlora.ops.glu_lora import row_groups

DEV = "cuda"
BF16 = torch.bfloat16


def _time(fn):
    fn()
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        return do_bench_cudagraph(fn, rep=100, return_mode="median")


def report(name, results):
    results.sort(key=lambda r: r[1])
    print(f"\n== {name}: best first")
    for cfg, ms, extra in results[:8]:
        print(f"  {ms:8.4f} ms  {extra}  {cfg}")


def tune_ce():
    t, v = 8192, 128256
    fn = registry.get("cross_entropy").fn
    z = torch.randn(t, v, device=DEV, dtype=BF16)
    y = torch.randint(0, v, (t,), device=DEV)
    loss = torch.empty(t, device=DEV)
    lse = torch.empty(t, device=DEV)
    g = torch.empty_like(z)
    scale = torch.ones(1, device=DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    for per_sm in (0, 4):
        for block in (4096, 8192, 16384, 32768):
            for warps in (8, 16, 32):
                grid = (t if per_sm == 0 else min(t, per_sm * sms),)
                try:
                    ms = _time(lambda: fn[grid](z, y, loss, lse, g, scale, v, v, 0, t, v, -100, 0.0, 1.0, 1.0,
                                                BLOCK_V=block, HAS_SOFTCAP=0, MODE=1, SMOOTH=0, num_warps=warps,
                                                num_stages=1))
                except Exception as e:
                    print("  skip", per_sm, block, warps, type(e).__name__)
                    continue
                res.append(((per_sm, block, warps), ms, f"{2 * z.numel() * 2 / ms / 1e6:.0f} GB/s (1R+1W)"))
    report("cross_entropy MODE=1 (programs per SM (0: one per row), BLOCK_V, warps)", res)


def tune_glu():
    n = 8192 * 14336
    f, b = registry.get("glu_fwd").fn, registry.get("glu_bwd").fn
    g, u, o, dy = (torch.randn(n, device=DEV, dtype=BF16) for _ in range(4))
    dg, du = torch.empty_like(g), torch.empty_like(u)
    res = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            grid = ((n + block - 1) // block,)

            def step():
                f[grid](g, u, o, n, n, ACT=0, BLOCK=block, num_warps=warps)
                b[grid](dy, g, u, dg, du, dy, n, ACT=0, STORE_H=0, BLOCK=block, num_warps=warps)
            ms = _time(step)
            res.append(((block, warps), ms, f"{8 * n * 2 / ms / 1e9:.0f} GB/s"))
    report("swiglu fwd+bwd (BLOCK, warps)", res)


def _lora_factors(t, i, r):
    """The LoRA MLP's rank-r operands at T = t, I = i: XA [t, 2r], dY B_d [t, r], B_g, B_u [i, r], A_d [r, i]."""
    def rnd(*shape):
        return torch.randn(*shape, device=DEV, dtype=BF16)
    return rnd(t, 2 * r), rnd(t, r), rnd(i, r), rnd(i, r), rnd(r, i)


def _row_group_configs(t, i, tiles, per_sms=(2, 4, 8)):
    """((BLOCK_M, BLOCK_N, warps, stages, programs per SM), grid, rows per group) for the LoRA GLU kernels'
    (column tile, row group) grids, as the launchers size them."""
    for bm, bn, warps, stages in tiles:
        for per_sm in per_sms:
            groups, rows = row_groups(t, i, {"BLOCK_M": bm, "BLOCK_N": bn}, 0, per_sm)
            yield (bm, bn, warps, stages, per_sm), ((i + bn - 1) // bn, groups), rows


def tune_glu_lora():
    """The LoRA MLP's fused GLU backward at Llama-3.2-1B sizes (T 8192, I 8192, r 16), partial sums
    included, against what it replaces: the GLU backward storing h plus three rank-16 GEMMs."""
    t, i, r = 8192, 8192, 16
    fn = registry.get("glu_lora_bwd").fn
    dh, e, g = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(3))
    de, dg = torch.empty_like(e), torch.empty_like(g)
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    res = []
    for (bm, bn, warps, stages, per_sm), (tiles, groups), rows in _row_group_configs(
        t, i, ((16, 128, 4, 3), (16, 128, 4, 2), (16, 128, 4, 4), (32, 64, 4, 3), (32, 64, 4, 4), (16, 64, 4, 3),
               (16, 64, 4, 4), (32, 128, 8, 3), (32, 128, 4, 3), (16, 256, 8, 3))):
        q = torch.empty(groups, i, 3 * r, device=DEV)

        def step():
            fn[(tiles, groups)](dh, e, g, de, dg, xa, dyb, b_g, b_u, a_d, q, t, i, i, i, 2 * r, r, r, r, r, r, rows,
                                0.5, 2.0,
                                ACT=0, R=r, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, num_warps=warps, num_stages=stages)
            q.sum(0)
        ms = _time(step)
        res.append(((bm, bn, warps, stages, per_sm), ms, f"{5 * t * i * 2 / ms / 1e6:.0f} GB/s (3R+2W)"))
    report("glu_lora_bwd + partial sum (BLOCK_M, BLOCK_N, warps, stages, programs/SM)", res)
    b = registry.get("glu_bwd").fn
    h = torch.empty_like(dh)

    def separate():
        b[((t * i + 2047) // 2048,)](dh, e, g, de, dg, h, t * i, ACT=0, STORE_H=1, BLOCK=2048, num_warps=16)
        de.t() @ xa[:, :r], dg.t() @ xa[:, r:], h.t() @ dyb
    print(f"  separate (glu_bwd STORE_H + 3 GEMMs): {_time(separate):.4f} ms")


def tune_glu_lora_fwd():
    """The LoRA MLP's GLU forward with the gate/up adapter terms (T 8192, I 8192, r 16; e | g the halves of one
    [T, 2I + 64] buffer), against glu_fwd on the same buffer (no adapter terms)."""
    from fusedlora.ops.glu import glu_forward
    t, i, r = 8192, 8192, 16
    fn = registry.get("glu_lora_fwd").fn
    eg = torch.randn(t, 2 * i + 64, device=DEV, dtype=BF16)
    e, g = eg[:, :i], eg[:, i:2 * i]
    xa, _, b_g, b_u, _ = _lora_factors(t, i, r)
    out = torch.empty(t, i, device=DEV, dtype=BF16)
    res = []
    for (bm, bn, warps, stages, per_sm), (tiles, groups), rows in _row_group_configs(
        t, i, ((16, 128, 4, 4), (16, 128, 4, 3), (32, 64, 4, 4), (32, 128, 8, 3), (32, 128, 4, 4), (64, 128, 8, 3),
               (64, 128, 8, 2), (16, 64, 4, 4), (16, 256, 8, 4), (32, 64, 4, 3))):
        ms = _time(lambda: fn[(tiles, groups)](e, g, xa, b_g, b_u, out, t, i, 2 * i + 64, 2 * r, r, r, r, rows,
                                               0.5, 2.0, ACT=0, R=r, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, num_warps=warps,
                                               num_stages=stages))
        res.append(((bm, bn, warps, stages, per_sm), ms, f"{3 * t * i * 2 / ms / 1e6:.0f} GB/s (2R+1W)"))
    report("glu_lora_fwd (BLOCK_M, BLOCK_N, warps, stages, programs/SM)", res)
    print(f"  glu_fwd on the same buffer (no adapter terms): {_time(lambda: glu_forward(e, g, 'silu')):.4f} ms")


def tune_glu_lora_layout():
    """The LoRA MLP's GLU kernels (T 8192, I 8192, r 16) on each layout of e, g and de | dg: separate
    contiguous tensors, or the halves of one [T, 2I + pad] buffer (what one N = 2I gate/up GEMM writes and
    one K = 2I + 2r dX GEMM reads)."""
    from fusedlora.ops.glu_lora import glu_forward, glu_lora_backward, glu_lora_dyb, glu_lora_forward
    t, i, r = 8192, 8192, 16
    dh = torch.randn(t, i, device=DEV, dtype=BF16)
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    for pad in (None, 32, 64, 128, 256, 1024):
        if pad is None:
            e, g = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
            dyb_out = torch.empty(t, 2 * r, device=DEV, dtype=BF16)
        else:
            eg = torch.randn(t, 2 * i + pad, device=DEV, dtype=BF16)
            e, g = eg[:, :i], eg[:, i:2 * i]
            dyb_out = eg[:, 2 * i:2 * i + 2 * r]
        fwd = _time(lambda: glu_forward(e, g, "silu"))
        lfwd = _time(lambda: glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu"))
        bwd = _time(lambda: glu_lora_backward(dh, e, g, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu", out=(e, g)))
        dy = _time(lambda: glu_lora_dyb(e, g, b_g, b_u, (0.5, 2.0), out=dyb_out))
        print(f"  pad {pad}: glu_fwd {fwd:.4f} ms, glu_lora_fwd {lfwd:.4f} ms, glu_lora_bwd {bwd:.4f} ms, "
              f"glu_lora_dyb {dy:.4f} ms")


def tune_glu_lora_dyb():
    """The LoRA MLP backward's [s de B_g | s dg B_u] (T 8192, I 8192, r 16) against two GEMMs + cat."""
    t, i, r = 8192, 8192, 16
    fn = registry.get("glu_lora_dyb").fn
    de, dg = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
    b_g, b_u = (torch.randn(i, r, device=DEV, dtype=BF16) for _ in range(2))
    out = torch.empty(t, 2 * r, device=DEV, dtype=BF16)
    res = []
    for bm in (16, 32, 64):
        for bn in (64, 128, 256):
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                try:
                    ms = _time(lambda: fn[((t + bm - 1) // bm,)](de, dg, b_g, b_u, out, t, i, i, r, r, 2 * r, 0.5, 2.0, R=r,
                                                                RB=r, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                                num_stages=stages))
                except triton.runtime.errors.OutOfResources:  # (64 x 256 with 4 stages: over the shared memory)
                    continue
                res.append(((bm, bn, warps, stages), ms, f"{2 * t * i * 2 / ms / 1e6:.0f} GB/s"))
    report("glu_lora_dyb (BLOCK_M, BLOCK_N, warps, stages)", res)

    def separate():
        torch.cat([torch.empty(t, r, device=DEV, dtype=BF16).addmm_(de, b_g, beta=0, alpha=0.5),
                   torch.empty(t, r, device=DEV, dtype=BF16).addmm_(dg, b_u, beta=0, alpha=2.0)], 1)
    print(f"  separate (two GEMMs + cat): {_time(separate):.4f} ms")
    # Sustained energy in the fused path's layout (de | dg | G in one [T, 2I + 64] buffer): the kernel vs
    # cuBLAS, as one GEMM over [de | dg] with a block-diagonal [s_g B_g, 0; 0, s_u B_u] or two GEMMs
    from fusedlora.ops.glu_lora import glu_lora_dyb
    d = torch.randn(t, 2 * i + 64, device=DEV, dtype=BF16)
    g_cols = d[:, 2 * i:2 * i + 2 * r]
    blk = torch.zeros(2 * i, 2 * r, device=DEV, dtype=BF16)

    def block_gemm():
        blk[:i, :r].copy_(b_g).mul_(0.5)
        blk[i:, r:].copy_(b_u).mul_(2.0)
        g_cols.copy_(d[:, :2 * i] @ blk)

    def two_gemms():
        g_cols[:, :r].copy_(torch.empty(t, r, device=DEV, dtype=BF16).addmm_(d[:, :i], b_g, beta=0, alpha=0.5))
        g_cols[:, r:].copy_(torch.empty(t, r, device=DEV, dtype=BF16).addmm_(d[:, i:2 * i], b_u, beta=0, alpha=2.0))
    def kernel():
        return glu_lora_dyb(d[:, :i], d[:, i:2 * i], b_g, b_u, (0.5, 2.0), out=g_cols)
    ref = kernel().float()
    for name, fn in (("cuBLAS, one block-diagonal GEMM", block_gemm), ("cuBLAS, two GEMMs", two_gemms)):
        fn()
        err = float((g_cols.float() - ref).abs().max() / ref.abs().max())
        print(f"  {name}: {_time(fn):.4f} ms cool, max error vs the kernel / max {err:.1e}")
    print("== sustained")
    for name, fn in (("glu_lora_dyb", kernel), ("cuBLAS, one block-diagonal GEMM", block_gemm),
                     ("cuBLAS, two GEMMs", two_gemms), ("glu_lora_dyb (again)", kernel)):
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
    e, g = eg[:, :i], eg[:, i:2 * i]
    d = torch.empty_like(eg)
    de, dg = d[:, :i], d[:, i:2 * i]
    dh, hid = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
    xa, dyb, b_g, b_u, a_d = _lora_factors(t, i, r)
    x, dy, y = (torch.randn(t, h, device=DEV, dtype=BF16) for _ in range(3))
    w_gu = torch.randn(2 * i, h, device=DEV, dtype=BF16) * 0.02
    w_d = torch.randn(h, i, device=DEV, dtype=BF16) * 0.02
    w_dx = torch.randn(2 * i + 2 * r, h, device=DEV, dtype=BF16) * 0.02

    def gemms():  # the step's four base GEMMs, as LoRA_MLP's fused path calls them
        torch.mm(x, w_gu.t(), out=eg[:, :2 * i])
        y.addmm_(hid, w_d.t())
        torch.mm(dy, w_d, out=dh)
        torch.mm(d[:, :2 * i + 2 * r], w_dx)

    def bwd():
        return glu_lora_backward(dh, e, g, xa, r, dyb, b_g, b_u, a_d, (0.5, 2.0), "silu", out=(de, dg))

    def bwd_dyb():
        bwd()
        glu_lora_dyb(de, dg, b_g, b_u, (0.5, 2.0), out=d[:, 2 * i:2 * i + 2 * r])
    print("\n== sustained energy per call (NVML)")
    _print_energy("four base GEMMs (gate/up, down beta = 1, dh, dX), cuBLAS", gemms)
    _print_energy("glu_lora_bwd + glu_lora_dyb", bwd_dyb)
    _print_energy("glu_lora_bwd", bwd)
    _print_energy("glu_lora_fwd", lambda: glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu"))
    _print_energy("glu_fwd (no adapter terms)", lambda: glu_forward(e, g, "silu"))
    plain = registry.get("glu_bwd").fn
    e2, g2 = (torch.randn(t, i, device=DEV, dtype=BF16) for _ in range(2))
    de2, dg2 = torch.empty_like(e2), torch.empty_like(g2)
    _print_energy("glu_bwd (no adapter terms, contiguous, h not stored)",
                  lambda: plain[((t * i + 2047) // 2048,)](dh, e2, g2, de2, dg2, de2, t * i, ACT=0, STORE_H=0,
                                                          BLOCK=2048, num_warps=16))
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
            gemm_abt_ptr[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](a, b, c, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                                                    STAGES=stages, num_warps=warps, num_stages=stages)
        descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
                 TensorDescriptor.from_tensor(c, [bm, bn]))

        def tma(descs=descs, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages):
            gemm_abt_tma[(sms,)](*descs, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages, NUM_SMS=sms,
                                 num_warps=warps, num_stages=stages)
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
    print(f"\n== gate/up shape GEMM, cool (graph replay)\n  cuBLAS {_time(lambda: torch.mm(a, b.t(), out=c)) * 1e3:.1f} us")
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
    e, g = eg[:, :i], eg[:, i:2 * i]
    hid = torch.empty(t, i, device=DEV, dtype=BF16)
    xa, _, b_g, b_u, _ = _lora_factors(t, i, r)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = slice(0, 256)  # a float64 check on a slice of rows: the whole product would take seconds
    ref = naive_gemm_glu_lora_fwd(x[rows], w[:i], w[i:], xa[rows, :r], xa[rows, r:], b_g, b_u, (0.5, 2.0))

    def old():
        torch.mm(x, w.t(), out=eg[:, :2 * i])
        return glu_lora_forward(e, g, xa, r, b_g, b_u, (0.5, 2.0), "silu")
    cands = []
    for bm, bn, bk, group_m, warps, stages, flat in (
            (128, 128, 64, 8, 8, 3, 0), (128, 128, 64, 16, 8, 3, 0), (128, 128, 64, 8, 8, 3, 1),
            (128, 128, 64, 16, 8, 3, 1), (128, 128, 128, 16, 8, 2, 0), (128, 64, 64, 16, 4, 4, 1)):
        def new(tile=(bm, bn, bk, group_m, stages), warps=warps, flat=flat,
                progs=min(sms, triton.cdiv(t, bm) * triton.cdiv(i, bn))):
            gemm_glu_lora_fwd(x, w[:i], w[i:], xa, r, b_g, b_u, (0.5, 2.0), (e, g), hid, programs=progs, warps=warps,
                              tile=tile, flatten=flat)
        name = f"fused {bm}x(2x{bn})x{bk} group {group_m}, {warps} warps, {stages} stages{', flat' if flat else ''}"
        try:
            new()
            torch.cuda.synchronize()
            err = max(float((got[rows].double() - want).abs().max() / want.abs().max())
                      for got, want in zip((e, g, hid), ref))
            cands.append((_time(new), name, new, err))
        except Exception as ex:  # (a config over the shared-memory or register limit)
            print(f"  {name}: {type(ex).__name__}: {str(ex)[:160]}")
    cands.sort(key=lambda c: c[0])
    print(f"\n== gate/up GEMM + LoRA GLU forward, cool (graph replay)\n  cuBLAS + glu_lora_fwd {_time(old) * 1e3:.1f} us"
          f"  (cuBLAS alone {_time(lambda: torch.mm(x, w.t(), out=eg[:, :2 * i])) * 1e3:.1f} us)")
    for ms, name, _, err in cands:
        print(f"  {name}: {ms * 1e3:.1f} us  (max error / max |ref| {err:.1e})")
    print("== sustained")
    _print_energy("cuBLAS + glu_lora_fwd", old)
    for _, name, new, _ in cands[:3]:
        _print_energy(name, new)
    _print_energy("cuBLAS + glu_lora_fwd (again)", old)


def tune_rope():
    bsz, hq, hk, s, d = 4, 32, 8, 2048, 128
    fn = registry.get("rope").fn
    q = torch.randn(bsz, s, hq, d, device=DEV, dtype=BF16).transpose(1, 2)
    k = torch.randn(bsz, s, hk, d, device=DEV, dtype=BF16).transpose(1, 2)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    cos = torch.randn(8192, d, device=DEV, dtype=BF16)
    sin = torch.randn(8192, d, device=DEV, dtype=BF16)
    pos = torch.arange(s, device=DEV)[None].expand(bsz, s).contiguous()
    res = []
    for bh in (4, 8, 16, 32):
        for warps in (1, 2, 4, 8):
            grid = (bsz * s, (hq + bh - 1) // bh + (hk + bh - 1) // bh)
            args = (q, k, qo, ko, cos, sin, pos, *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
                    0, d, s, 1, s, hq, hk, d // 2, 0)

            def step():
                fn[grid](*args, BLOCK_H=bh, BLOCK_HALF=d // 2, BLOCK_PASS=0, HAS_POS=1, BACKWARD=0, num_warps=warps)
            ms = _time(step)
            res.append(((bh, warps), ms, f"{2 * (q.numel() + k.numel()) * 2 / ms / 1e9:.0f} GB/s"))
    report("rope fwd (BLOCK_H, warps)", res)


def tune_rms():
    m, n = 8192, 4096
    f, b = registry.get("rms_norm_fwd").fn, registry.get("rms_norm_bwd").fn
    x, dy = torch.randn(m, n, device=DEV, dtype=BF16), torch.randn(m, n, device=DEV, dtype=BF16)
    w = torch.randn(n, device=DEV, dtype=BF16)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    rstd = torch.empty(m, device=DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    for warps in (4, 8, 16):
        ms = _time(lambda: f[(m,)](x, w, y, rstd, n, n, m, n, 1e-6, 0.0, BLOCK_M=1, BLOCK_N=n, GEMMA_CAST=0,
                                   num_warps=warps))
        res.append((("fwd", warps), ms, f"{2 * x.numel() * 2 / ms / 1e9:.0f} GB/s"))
    for per_sm in (1, 2, 4, 8):
        for warps in (4, 8, 16):
            p = per_sm * sms
            part = torch.empty(p, n, device=DEV)
            ms = _time(lambda: b[(p,)](dy, x, w, rstd, dx, part, n, n, n, m, n, 0.0, BLOCK_N=n, GEMMA_CAST=0,
                                       num_warps=warps))
            res.append((("bwd", per_sm, warps), ms, f"{3 * x.numel() * 2 / ms / 1e9:.0f} GB/s"))
    report("rms_norm (fwd warps | bwd per_sm, warps)", res)


def tune_nf4():
    fn = registry.get("nf4_dequant").fn
    for shape in ((4096, 4096), (28672, 8192)):
        n = shape[0] * shape[1]
        packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=DEV)
        a8 = torch.randint(0, 256, (n // 64,), dtype=torch.uint8, device=DEV)
        a2 = torch.rand(n // 64 // 256 + 1, device=DEV)
        code, code2 = torch.rand(16, device=DEV), torch.rand(256, device=DEV)
        off = torch.rand(1, device=DEV)
        out = torch.empty(n, device=DEV, dtype=BF16)
        res = []
        for order in (0,):
            for block in (512, 1024, 2048, 4096, 8192):
                for warps in (2, 4, 8, 16):
                    grid = (n // block,)
                    ms = _time(lambda: fn[grid](packed, a8, a2, code, code2, off, out, n, 0, 0, BLOCKSIZE=64,
                                                BLOCKSIZE2=256, NESTED=1, BLOCK=block, STRIDED=0,
                                                num_warps=warps, enable_fp_fusion=False))
                    res.append(((order, block, warps), ms, f"{(n // 2 + n // 64 + 2 * n) / ms / 1e6:.0f} GB/s"))
        report(f"nf4 nested bf16 {shape} (OUTPUT_ORDER, BLOCK, warps)", res)
    # row-strided: a gate weight [8192, 2048] into the [W | s B] buffer [8192, 2080] of the LoRA MLP
    rows, row_len, ld = 8192, 2048, 2080
    n = rows * row_len
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=DEV)
    a8 = torch.randint(0, 256, (n // 64,), dtype=torch.uint8, device=DEV)
    a2 = torch.rand(n // 64 // 256 + 1, device=DEV)
    code, code2, off = torch.rand(16, device=DEV), torch.rand(256, device=DEV), torch.rand(1, device=DEV)
    buf = torch.empty(rows, ld, device=DEV, dtype=BF16)
    res = []
    for block in (512, 1024, 2048):
        for warps in (1, 2, 4):
            ms = _time(lambda: fn[(row_len // block, rows)](packed, a8, a2, code, code2, off, buf, n, row_len, ld,
                                                            BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=1, BLOCK=block,
                                                            STRIDED=1, num_warps=warps, enable_fp_fusion=False))
            res.append(((block, warps), ms, f"{(n // 2 + n // 64 + 2 * n) / ms / 1e6:.0f} GB/s"))
    report("nf4 nested bf16 8192x2048 into a [8192, 2080] buffer (BLOCK, warps)", res)


def tune_gptq():
    fn = registry.get("gptq_dequant").fn
    in_f = out_f = 8192
    qw = torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, device=DEV).to(torch.int32)
    qz = torch.randint(-2**31, 2**31 - 1, (in_f // 128, out_f // 8), dtype=torch.int64, device=DEV).to(torch.int32)
    sc = (torch.rand(in_f // 128, out_f, device=DEV) * 0.01).half()
    nbytes = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2 + in_f * out_f * 2
    for transpose in (False, True):
        out = torch.empty((in_f, out_f) if transpose else (out_f, in_f), device=DEV, dtype=torch.float16)
        s_o, s_i = (1, out.stride(0)) if transpose else (out.stride(0), 1)
        res = []
        for bi in (32, 64, 128):
            for bo in (32, 64, 128):
                for warps in (2, 4, 8):
                    grid = (in_f // bi, out_f // bo)
                    try:
                        ms = _time(lambda: fn[grid](qw, qz, sc, qw, out, in_f, out_f, 128, out_f, out_f // 8, out_f,
                                                    s_o, s_i, 1, BITS=4, HAS_GIDX=0, BLOCK_I=bi, BLOCK_O=bo,
                                                    num_warps=warps))
                    except Exception as e:
                        print("  skip", bi, bo, warps, type(e).__name__)
                        continue
                    res.append(((bi, bo, warps), ms, f"{nbytes / ms / 1e6:.0f} GB/s"))
        report(f"gptq 8192^2 fp16 {'[in, out]' if transpose else '[out, in]'} (BLOCK_I, BLOCK_O, warps)", res)


def main(argv=None):
    # names as one comma list or as separate arguments ("ce,glu" or "ce glu")
    which = [w for a in (argv or sys.argv[1:] or ["ce,glu,rope,rms"]) for w in a.split(",") if w]
    print(torch.cuda.get_device_name(), torch.__version__)
    for w in which:
        {"ce": tune_ce, "glu": tune_glu, "glu_lora": tune_glu_lora, "glu_lora_fwd": tune_glu_lora_fwd, "glu_lora_layout": tune_glu_lora_layout, "glu_lora_dyb": tune_glu_lora_dyb,
         "energy_parts": tune_energy_parts, "triton_gemm": tune_triton_gemm, "gemm_glu": tune_gemm_glu, "rope": tune_rope, "rms": tune_rms, "nf4": tune_nf4, "gptq": tune_gptq}[w]()


if __name__ == "__main__":
    main()
