"""Cross-entropy over rows of logits, one program per row, never materialising fp32 logits.

Per row: x = softcap * tanh(logit_scale * z / softcap) (softcap optional), lse = logsumexp(x),
loss = lse - (1 - eps) * x[label] - eps * mean(x)   (eps = label smoothing; 0 for ignored rows).
MODE 0: loss and lse only. MODE 1: also the gradient, scaled by SCALE[0] (1/divisor for mean), written
in the logits' dtype (possibly in place over the logits: each chunk is read before it is written).
MODE 2: gradient only, from the saved lse, scaled by SCALE[row] (reduction="none" backward).
Loss and gradient together (the training path) use `cross_entropy_team_kernel`: a row is split over a
team of programs that each keep their chunk in registers, meet once to combine (max, sum exp), then
write the gradient: one HBM read and one write per element. `cross_entropy_kernel` with MODE 1 (two
reads, one write) serves vocabularies too large for a team.
"""
import triton
import triton.language as tl

from csrc_triton._math import tanh


@triton.jit
def _transform(z, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    x = z * logit_scale
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x


@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def cross_entropy_kernel(
    LOGITS, LABELS, LOSS, LSE, GRAD, SCALE,
    logits_row_stride, grad_row_stride, scale_stride, n_rows, n_cols,
    ignore_index, label_smoothing, softcap, logit_scale,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr,
):
    # Persistent: program p takes rows p, p + P, ... With few programs in flight, a row read in the
    # first pass is still in L2 for the second (HBM sees ~one read and one write per element).
    cols = tl.arange(0, BLOCK_V)
    l_stride = logits_row_stride + tl.zeros([], tl.int64)  # int64 offsets (a stride may be a constexpr 1)
    g_stride = grad_row_stride + tl.zeros([], tl.int64)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        label = tl.load(LABELS + row).to(tl.int64)
        ignored = label == ignore_index
        base = LOGITS + row * l_stride
        if MODE == 2:
            lse = tl.load(LSE + row)
        else:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([], tl.float32)
            sum_x = tl.zeros([], tl.float32)
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                ok = c < n_cols
                z = tl.load(base + c, mask=ok, other=0.0).to(tl.float32)
                x = tl.where(ok, _transform(z, softcap, logit_scale, HAS_SOFTCAP), float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                sum_x += tl.sum(tl.where(ok, x, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(s)
            safe_label = tl.where(ignored, 0, label)
            x_label = _transform(tl.load(base + safe_label).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
            loss = lse - (1.0 - label_smoothing) * x_label - label_smoothing * (sum_x / n_cols)
            tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
            tl.store(LSE + row, lse)
        if MODE != 0:
            scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
            scale = tl.where(ignored, 0.0, scale)
            smooth = label_smoothing / n_cols
            gbase = GRAD + row * g_stride
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                ok = c < n_cols
                z = tl.load(base + c, mask=ok, other=0.0).to(tl.float32)
                x = _transform(z, softcap, logit_scale, HAS_SOFTCAP)
                g = tl.exp(x - lse) - smooth - tl.where(c == label, 1.0 - label_smoothing, 0.0)
                if HAS_SOFTCAP:
                    t = x / softcap
                    g = g * (1.0 - t * t)
                g = g * (logit_scale * scale)
                tl.store(gbase + c, g.to(GRAD.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_rows", "n_cols", "n_parts", "ignore_index"])
def cross_entropy_team_kernel(
    LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED,
    logits_row_stride, grad_row_stride, n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap,
    logit_scale,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, TILES: tl.constexpr, PARTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Loss, lse and gradient (scaled by SCALE[0]) with one read of the logits.

    Persistent teams: the grid is n_teams * n_parts programs, all resident at once. Program p is part
    p % n_parts of team p // n_parts; it takes columns [part * CHUNK, (part + 1) * CHUNK) of the row
    groups team, team + n_teams, ... (ROWS rows each). For each group the team's programs publish their
    chunk's (max, sum exp, sum) per row in PARTIAL, count themselves in ARRIVED[group] (zeroed by the
    caller) and wait for the whole team, so waiting costs only the spread between siblings doing the same
    work, once per ROWS rows. (Were some teams not resident, nothing deadlocks: the GPU dispatches programs
    in id order, so complete teams finish and free their SMs.) PARTS (a power of two >= n_parts) only sizes
    the combine; PARTS == 1 needs no meeting."""
    pid = tl.program_id(0)
    team = pid // n_parts
    n_teams = tl.num_programs(0) // n_parts
    start = (pid - team * n_parts) * (CHUNK * TILES)
    if TILES > 1:
        for group in range(team, n_groups_of(n_rows, ROWS), n_teams):
            _team_rows_l2(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride,
                          grad_row_stride, n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap,
                          logit_scale, group, start, ROWS, CHUNK, TILES, PARTS, HAS_SOFTCAP)
    elif start + CHUNK <= n_cols:  # unmasked, so loads and stores vectorise; only a row's last chunk is masked
        _team_loop(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
                   n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, team, n_teams, start,
                   ROWS, CHUNK, PARTS, HAS_SOFTCAP, PREFETCH, False)
    else:
        _team_loop(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
                   n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, team, n_teams, start,
                   ROWS, CHUNK, PARTS, HAS_SOFTCAP, PREFETCH, True)


@triton.jit
def n_groups_of(n_rows, ROWS: tl.constexpr):
    return (n_rows + ROWS - 1) // ROWS


@triton.jit
def _team_rows_l2(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
                  n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, group, start,
                  ROWS: tl.constexpr, CHUNK: tl.constexpr, TILES: tl.constexpr, PARTS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    """A chunk of TILES tiles, too big for registers: the (max, sum exp, sum) pass reads it from HBM, the
    gradient pass re-reads it while it is still in L2 (the team's chunks in flight are a few MB)."""
    rows = tl.minimum(group * ROWS + tl.arange(0, ROWS), n_rows - 1).to(tl.int64)
    src = LOGITS + rows * logits_row_stride
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    sum_x = tl.zeros([ROWS], tl.float32)
    for t in range(TILES):
        c = start + t * CHUNK + tl.arange(0, CHUNK)
        ok = (c < n_cols)[None, :]
        x = _transform(_load_tile(src[:, None] + c[None, :], ok, start + (t + 1) * CHUNK <= n_cols).to(tl.float32),
                       softcap, logit_scale, HAS_SOFTCAP)
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        sum_x += tl.sum(tl.where(ok, x, 0.0), axis=1)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    label = tl.load(LABELS + rows).to(tl.int64)
    ignored = label == ignore_index
    x_label = _transform(tl.load(src + tl.where(ignored, 0, label)).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
    lse, sum_x = _meet(PARTIAL, ARRIVED, rows, group, start // (CHUNK * TILES), n_parts, m, s, sum_x, PARTS)
    if start == 0:
        loss = lse - (1.0 - label_smoothing) * x_label - label_smoothing * (sum_x / n_cols)
        tl.store(LOSS + rows, tl.where(ignored, 0.0, loss))
        tl.store(LSE + rows, lse)
    scale = tl.where(ignored, 0.0, tl.load(SCALE).to(tl.float32)) * logit_scale
    dst = GRAD + rows * grad_row_stride
    for t in range(TILES):
        c = start + t * CHUNK + tl.arange(0, CHUNK)
        ok = (c < n_cols)[None, :]
        full = start + (t + 1) * CHUNK <= n_cols
        x = _transform(_load_tile(src[:, None] + c[None, :], ok, full).to(tl.float32), softcap, logit_scale,
                       HAS_SOFTCAP)
        g = (_softmax_grad(x, lse[:, None], label_smoothing / n_cols, softcap, HAS_SOFTCAP) * scale[:, None])
        if full:  # unmasked: 16-byte stores
            tl.store(dst[:, None] + c[None, :], g.to(GRAD.dtype.element_ty))
        else:
            tl.store(dst[:, None] + c[None, :], g.to(GRAD.dtype.element_ty), mask=ok)
    tl.debug_barrier()  # after every thread's store of the chunk: the label's value lands last
    g_label = _softmax_grad(x_label, lse, label_smoothing / n_cols + (1.0 - label_smoothing), softcap, HAS_SOFTCAP)
    tl.store(dst + label, (g_label * scale).to(GRAD.dtype.element_ty),
             mask=(label >= start) & (label < start + CHUNK * TILES))


@triton.jit
def _load_tile(ptrs, ok, full):
    if full:  # unmasked: 16-byte loads
        z = tl.load(ptrs)
    else:
        z = tl.load(ptrs, mask=ok, other=0.0)
    return z


@triton.jit
def _meet(PARTIAL, ARRIVED, rows, group, part, n_parts, m, s, sum_x, PARTS: tl.constexpr):
    """Publish this part's (max, sum exp, sum) of each row, wait for the team, return (lse, sum) of the rows."""
    if PARTS == 1:
        return m + tl.log(s), sum_x
    slot = PARTIAL + (rows * PARTS + part) * 4
    tl.store(slot, m)
    tl.store(slot + 1, s)
    tl.store(slot + 2, sum_x)
    tl.debug_barrier()  # every thread's stores happen before the release below (as in a grid sync)
    tl.atomic_add(ARRIVED + group, 1, sem="release")
    while tl.atomic_add(ARRIVED + group, 0, sem="acquire") < n_parts:
        pass
    members = tl.arange(0, PARTS)
    slots = PARTIAL + (rows[:, None] * PARTS + members[None, :]) * 4
    live = (members < n_parts)[None, :]
    # .cg: read at L2, never a stale L1 line holding a neighbouring group's slots
    pm = tl.load(slots, mask=live, other=float("-inf"), cache_modifier=".cg")
    ps = tl.load(slots + 1, mask=live, other=0.0, cache_modifier=".cg")
    px = tl.load(slots + 2, mask=live, other=0.0, cache_modifier=".cg")
    big = tl.max(pm, axis=1)
    return big + tl.log(tl.sum(ps * tl.exp(pm - big[:, None]), axis=1)), tl.sum(px, axis=1)


@triton.jit
def _load_chunk(LOGITS, logits_row_stride, n_rows, n_cols, group, start,
                ROWS: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr):
    # The last group's missing rows repeat row n_rows - 1 (same values written twice): no row mask, so
    # the accesses stay vectorised.
    rows = tl.minimum(group * ROWS + tl.arange(0, ROWS), n_rows - 1).to(tl.int64)
    c = start + tl.arange(0, CHUNK)
    ptrs = LOGITS + rows[:, None] * logits_row_stride + c[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(c < n_cols)[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _team_loop(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
               n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, team, n_teams, start,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, PARTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               PREFETCH: tl.constexpr, MASKED: tl.constexpr):
    n_groups = (n_rows + ROWS - 1) // ROWS
    z = _load_chunk(LOGITS, logits_row_stride, n_rows, n_cols, team, start, ROWS, CHUNK, MASKED)
    for group in range(team, n_groups, n_teams):
        z = _team_rows(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
                       n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, group,
                       tl.minimum(group + n_teams, n_groups - 1), start, z, ROWS, CHUNK, PARTS, HAS_SOFTCAP, PREFETCH,
                       MASKED)


@triton.jit
def _team_rows(LOGITS, LABELS, LOSS, LSE, GRAD, SCALE, PARTIAL, ARRIVED, logits_row_stride, grad_row_stride,
               n_rows, n_cols, n_parts, ignore_index, label_smoothing, softcap, logit_scale, group, next_group, start,
               z, ROWS: tl.constexpr, CHUNK: tl.constexpr, PARTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               PREFETCH: tl.constexpr, MASKED: tl.constexpr):
    """One row group of one chunk, from its loaded logits z; returns the next group's (loaded before the
    meeting with PREFETCH, so that the wait overlaps the read)."""
    rows = tl.minimum(group * ROWS + tl.arange(0, ROWS), n_rows - 1).to(tl.int64)
    c = start + tl.arange(0, CHUNK)
    src = LOGITS + rows * logits_row_stride
    x = _transform(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
    if MASKED:
        ok = (c < n_cols)[None, :]
        x = tl.where(ok, x, float("-inf"))
        sum_x = tl.sum(tl.where(ok, x, 0.0), axis=1)
    else:
        sum_x = tl.sum(x, axis=1)
    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf logits adds nothing (and no NaN)
    s = tl.sum(tl.exp(x - m[:, None]), axis=1)
    label = tl.load(LABELS + rows).to(tl.int64)
    ignored = label == ignore_index
    # Read before the meeting: with the gradient written over the logits, the label's column may change after.
    x_label = _transform(tl.load(src + tl.where(ignored, 0, label)).to(tl.float32), softcap, logit_scale, HAS_SOFTCAP)
    if PARTS == 1:
        lse = m + tl.log(s)
    else:
        slot = PARTIAL + (rows * PARTS + start // CHUNK) * 4
        tl.store(slot, m)
        tl.store(slot + 1, s)
        tl.store(slot + 2, sum_x)
        tl.debug_barrier()  # every thread's stores happen before the release below (as in a grid sync)
        tl.atomic_add(ARRIVED + group, 1, sem="release")
        if PREFETCH:
            z = _load_chunk(LOGITS, logits_row_stride, n_rows, n_cols, next_group, start, ROWS, CHUNK, MASKED)
        while tl.atomic_add(ARRIVED + group, 0, sem="acquire") < n_parts:
            pass
        members = tl.arange(0, PARTS)
        slots = PARTIAL + (rows[:, None] * PARTS + members[None, :]) * 4
        live = (members < n_parts)[None, :]
        # .cg: read at L2, never a stale L1 line holding a neighbouring group's slots
        pm = tl.load(slots, mask=live, other=float("-inf"), cache_modifier=".cg")
        ps = tl.load(slots + 1, mask=live, other=0.0, cache_modifier=".cg")
        px = tl.load(slots + 2, mask=live, other=0.0, cache_modifier=".cg")
        big = tl.max(pm, axis=1)
        lse = big + tl.log(tl.sum(ps * tl.exp(pm - big[:, None]), axis=1))
        sum_x = tl.sum(px, axis=1)
    if start == 0:
        loss = lse - (1.0 - label_smoothing) * x_label - label_smoothing * (sum_x / n_cols)
        tl.store(LOSS + rows, tl.where(ignored, 0.0, loss))
        tl.store(LSE + rows, lse)
    scale = tl.where(ignored, 0.0, tl.load(SCALE).to(tl.float32)) * logit_scale
    # The label's one-hot term is written separately afterwards: a per-element column compare here
    # would keep the column indices live across the meeting (~2x the registers, half the occupancy).
    g = _softmax_grad(x, lse[:, None], label_smoothing / n_cols, softcap, HAS_SOFTCAP) * scale[:, None]
    dst = GRAD + rows * grad_row_stride
    if MASKED:
        tl.store(dst[:, None] + c[None, :], g.to(GRAD.dtype.element_ty), mask=ok)
    else:
        tl.store(dst[:, None] + c[None, :], g.to(GRAD.dtype.element_ty))
    tl.debug_barrier()  # after every thread's store of the chunk: the label's value lands last
    g_label = _softmax_grad(x_label, lse, label_smoothing / n_cols + (1.0 - label_smoothing), softcap, HAS_SOFTCAP)
    tl.store(dst + label, (g_label * scale).to(GRAD.dtype.element_ty), mask=(label >= start) & (label < start + CHUNK))
    if PARTS == 1 or not PREFETCH:
        z = _load_chunk(LOGITS, logits_row_stride, n_rows, n_cols, next_group, start, ROWS, CHUNK, MASKED)
    return z


@triton.jit
def _softmax_grad(x, lse, minus, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d logit (before logit_scale): (softmax(x) - minus) through the softcap's tanh."""
    g = tl.exp(x - lse) - minus
    if HAS_SOFTCAP:
        t = x / softcap
        g = g * (1.0 - t * t)
    return g


@triton.jit(do_not_specialize=["n_elements"])
def scale_by_scalar_kernel(X, S, n_elements, BLOCK: tl.constexpr):
    """X *= S[0] in place, skipped (no memory traffic) when S[0] == 1: the usual loss.backward() seed."""
    s = tl.load(S).to(tl.float32)
    if s != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n_elements:  # unmasked, so the accesses vectorise
            x = tl.load(X + offs).to(tl.float32)
            tl.store(X + offs, (x * s).to(X.dtype.element_ty))
        else:
            ok = offs < n_elements
            x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(X + offs, (x * s).to(X.dtype.element_ty), mask=ok)
