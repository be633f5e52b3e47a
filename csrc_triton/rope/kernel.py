"""Rotary position embedding of q [B, Hq, S, D] and k [B, Hk, S, D] in one launch (HF semantics).

out[:r/2] = x1 * cos1 - x2 * sin1,  out[r/2:r] = x2 * cos2 + x1 * sin2,  out[r:] = x[r:]  (r = rotary dim)
cos/sin rows come either per token (HF's [B or 1, S, r]) or from a [max_pos, r] cache indexed by
position_ids [B or 1, S] (HAS_POS): packed sequences, left padding and offsets are honoured.
BACKWARD applies the transposed rotation (the gradient). Grid: (B * S, q head blocks + k head blocks).
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X,
    O,
    x_sh,
    o_sh,
    n_heads,
    hb,
    c1,
    c2,
    s1,
    s2,
    half,
    n_pass,
    d,
    dp,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = (h < n_heads)[:, None]
    m = hm & (d < half)[None, :]
    xp = X + h[:, None].to(tl.int64) * x_sh + d[None, :]
    op = O + h[:, None].to(tl.int64) * o_sh + d[None, :]
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(op, y1.to(O.dtype.element_ty), mask=m)
    tl.store(op + half, y2.to(O.dtype.element_ty), mask=m)
    if BLOCK_PASS > 0:  # partial rotary: the rest of the head is copied
        mp = hm & (dp < n_pass)[None, :]
        xq = X + h[:, None].to(tl.int64) * x_sh + 2 * half + dp[None, :]
        oq = O + h[:, None].to(tl.int64) * o_sh + 2 * half + dp[None, :]
        tl.store(oq, tl.load(xq, mask=mp, other=0.0), mask=mp)


@triton.jit(do_not_specialize=["seq_len", "n_q_heads", "n_k_heads"])
def rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    POS,
    q_sb,
    q_sh,
    q_ss,
    k_sb,
    k_sh,
    k_ss,
    qo_sb,
    qo_sh,
    qo_ss,
    ko_sb,
    ko_sh,
    ko_ss,
    cos_sb,
    cos_ss,
    pos_sb,
    pos_ss,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    n_pass,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    tok = tl.program_id(0)
    hb = tl.program_id(1)
    b = (tok // seq_len).to(tl.int64)
    s = (tok % seq_len).to(tl.int64)
    if HAS_POS:
        p = tl.load(POS + b * pos_sb + s * pos_ss).to(tl.int64)
        crow = p * cos_ss
    else:
        crow = b * cos_sb + s * cos_ss
    d = tl.arange(0, BLOCK_HALF)
    dp = tl.arange(0, BLOCK_PASS) if BLOCK_PASS > 0 else d
    dm = d < half
    c1 = tl.load(COS + crow + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + crow + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + crow + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + crow + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    n_qb = tl.cdiv(n_q_heads, BLOCK_H)
    if hb < n_qb:
        _rotate_heads(
            Q + b * q_sb + s * q_ss,
            QO + b * qo_sb + s * qo_ss,
            q_sh,
            qo_sh,
            n_q_heads,
            hb,
            c1,
            c2,
            s1,
            s2,
            half,
            n_pass,
            d,
            dp,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
            BACKWARD,
        )
    else:
        _rotate_heads(
            K + b * k_sb + s * k_ss,
            KO + b * ko_sb + s * ko_ss,
            k_sh,
            ko_sh,
            n_k_heads,
            hb - n_qb,
            c1,
            c2,
            s1,
            s2,
            half,
            n_pass,
            d,
            dp,
            BLOCK_H,
            BLOCK_HALF,
            BLOCK_PASS,
            BACKWARD,
        )
