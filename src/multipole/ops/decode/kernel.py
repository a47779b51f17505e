"""Triton kernels of the exact part: expansion of the selected clusters into token positions,
split-K flash decoding over the sink, the recent window and those tokens, and the log-sum-exp
merge with the far field.

Each (sequence, KV head) attends its whole query group to a list of token slots: slots
``[0, exact_capacity)`` hold the sink and the recent window (positions computed), the next ones
the tokens of the selected clusters in the order of the selection's compact list.
``_expand_kernel`` writes the position and the cluster of every selected slot, many programs
per row (each counts the clusters of the list that start before its first slot, then finds
the owners inside a tile from a histogram of the cluster starts; no serial expansion), so the
exact pass reads one index per token before its keys and values: a short chain of dependent
loads per tile, which is what bounds a decode kernel that reads scattered rows. With the far
field on, each selected token also removes its cluster's far-field term: the centroid pass
added ``N_c exp(z_c) Vc_c`` for every cluster, and ``sum_{t in c} exp(z_c) v_t`` is the same
quantity, so the exact pass accumulates ``(exp(x_t) - exp(z_c)) v_t`` (and the same in the
denominator). The merge combines the splits and the far field of all clusters.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernel_utils import dot, load_rows, store_partial, wait_for_previous


@triton.jit
def _expand_kernel(
    SEL_FIRST,
    SEL_BASE,
    SEL_CLUSTER,
    ORDER,
    COUNT,
    NUM_SELECTED,
    SEQ_LENS,
    CLUSTERED,
    POS,
    CLUSTER,
    num_kv_heads,
    list_capacity,
    order_capacity,
    slot_capacity,
    sink,
    slots_per_program,
    BLOCK: tl.constexpr,
    WINDOW: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    WITH_FAR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Position (``ORDER[SEL_BASE[r] + slot]``) and cluster of the selected token slots
    ``program * slots_per_program ..`` of one row. Grid: (rows, slot ranges)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // num_kv_heads
    seq_len = tl.load(SEQ_LENS + b)
    num_exact = tl.minimum(sink, seq_len) + tl.maximum(seq_len - sink - tl.load(CLUSTERED + b), 0)
    selected_tokens = tl.load(COUNT + bh) - num_exact
    num_selected = tl.load(NUM_SELECTED + bh)
    start = tl.program_id(1) * slots_per_program
    end = tl.minimum(start + slots_per_program, selected_tokens)
    list_base = bh * list_capacity
    # owner of the first slot: the number of clusters that start at or before it, minus one
    # (only the first ``start + 1`` can: each has a token), counted a chunk of the list at a time
    limit = tl.minimum(num_selected, start + 1)
    owners = tl.zeros([], tl.int32)
    if start < end:
        offs_r = tl.arange(0, RANK_CHUNK)
        for r0 in range(0, limit, RANK_CHUNK):
            f = tl.load(SEL_FIRST + list_base + r0 + offs_r, mask=r0 + offs_r < limit, other=0)
            owners += tl.sum(((f <= start) & (r0 + offs_r < limit)).to(tl.int32))
    r_first = tl.maximum(owners - 1, 0)
    offs = tl.arange(0, BLOCK)
    offs_w = tl.arange(0, WINDOW)
    for t0 in range(start, end, BLOCK):
        slots = t0 + offs
        mask = slots < end
        ranks = r_first + offs_w
        rel = (
            tl.load(SEL_FIRST + list_base + ranks, mask=ranks < num_selected, other=2147483647) - t0
        ).to(tl.int32)  # [WINDOW]
        starts = (offs_w >= 1) & (rel >= 1) & (rel < BLOCK)
        # (no mask argument: Triton 3.6 miscompiles it; bin 0 collects the rest, then is cleared)
        hist = tl.histogram(tl.where(starts, rel, 0), BLOCK)
        hist = tl.where(offs == 0, 0, hist)
        owner = r_first + tl.cumsum(hist, 0)  # [BLOCK]
        r_first += tl.sum(((offs_w >= 1) & (rel <= BLOCK)).to(tl.int32))
        base = tl.load(SEL_BASE + list_base + owner, mask=mask, other=0)
        pos = tl.load(ORDER + bh * order_capacity + base + slots, mask=mask, other=0)
        tl.store(POS + bh * slot_capacity + slots, pos, mask=mask)
        if WITH_FAR:
            cluster = tl.load(SEL_CLUSTER + list_base + owner, mask=mask, other=0)
            tl.store(CLUSTER + bh * slot_capacity + slots, cluster, mask=mask)


@triton.jit
def _sparse_decode_kernel(
    Q,
    K,
    V,
    POS,
    CLUSTER,
    Z,
    BOUNDARY,
    BOUNDARY_Z,
    COUNT,
    SEQ_LENS,
    CLUSTERED,
    M_PART,
    L_PART,
    ACC_PART,
    scale,
    num_kv_heads,
    group,
    num_clusters,
    slot_capacity,
    kv_capacity,
    sink,
    exact_capacity,
    tokens_per_split,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WITH_FAR: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Split ``split`` of one row: slots ``split * tokens_per_split ..`` (sink and recent
    window first, then the selected tokens at the positions ``_expand_kernel`` wrote). Its
    state goes to partial slot ``split`` of the row's ``num_splits`` (more than the grid's
    splits when a partial far field fills the slots after them). ``WITH_FAR``: each selected
    token removes its cluster's far-field term, the logits of its cluster (``CLUSTER``) read
    from ``Z``; with ``BOUNDARY_ONLY`` (a partial far field) only the partly taken cluster
    can have one: ``BOUNDARY = (id, first slot, tokens taken)``, its logits ``BOUNDARY_Z``."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_G)
    mask_d = offs_d < HEAD_DIM
    mask_g = offs_g < group
    q = load_rows(Q, bh * group, group, HEAD_DIM, BLOCK_G, BLOCK_D)  # [BLOCK_G, BLOCK_D]
    seq_len = tl.load(SEQ_LENS + b)
    clustered = tl.load(CLUSTERED + b)
    num_sink = tl.minimum(sink, seq_len)
    recent_start = sink + clustered
    num_exact = num_sink + tl.maximum(seq_len - recent_start, 0)
    selected_tokens = tl.load(COUNT + bh) - num_exact
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, exact_capacity + selected_tokens)

    if BOUNDARY_ONLY:
        boundary_first = tl.load(BOUNDARY + 3 * bh + 1)
        boundary_end = boundary_first + tl.load(BOUNDARY + 3 * bh + 2)
        boundary_z = tl.load(BOUNDARY_Z + bh * group + offs_g, mask=mask_g, other=float("-inf"))

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        slots = s0 + offs_n
        sel_slot = slots - exact_capacity
        is_sel = (sel_slot >= 0) & (slots < end)
        mask_n = is_sel | ((slots < num_exact) & (slots < end))
        pos = tl.load(POS + bh * slot_capacity + sel_slot, mask=is_sel, other=0)
        pos = tl.where(
            is_sel, pos, tl.where(slots < num_sink, slots, recent_start + slots - num_sink)
        )
        rows = bh * kv_capacity + pos.to(tl.int64)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(V + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_nd, other=0.0)
        x = dot(q, tl.trans(k), NATIVE_DOT) * scale  # [BLOCK_G, BLOCK_N]
        x = tl.where(mask_n[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        if WITH_FAR:
            if BOUNDARY_ONLY:
                taken = is_sel & (sel_slot >= boundary_first) & (sel_slot < boundary_end)
                zc = tl.where(taken[None, :], boundary_z[:, None], float("-inf"))
            else:
                cluster = tl.load(CLUSTER + bh * slot_capacity + sel_slot, mask=is_sel, other=0)
                zc = tl.load(
                    Z + (bh * group + offs_g[:, None]) * num_clusters + cluster[None, :],
                    mask=mask_g[:, None] & is_sel[None, :],
                    other=float("-inf"),
                )  # [BLOCK_G, BLOCK_N] far-field logit of each token's cluster
            m_new = tl.maximum(m_new, tl.max(zc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(x - m_safe[:, None])
        if WITH_FAR:
            p -= tl.exp(zc - m_safe[:, None])
        m = m_new
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, NATIVE_DOT)
    store_partial(
        M_PART,
        L_PART,
        ACC_PART,
        bh * num_splits + split,
        group,
        m,
        den,
        acc,
        HEAD_DIM,
        BLOCK_G,
        BLOCK_D,
        True,
    )


@triton.jit
def _merge_kernel(
    M_PART,
    L_PART,
    ACC_PART,
    FAR_M,
    FAR_L,
    FAR_ACC,
    OUT,
    LSE,
    group,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    WITH_FAR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Combine the exact splits and the far field of one row, head-dim columns
    ``d0 .. d0 + BLOCK_D``; write the output (and, from the first slice, the lse).
    Grid: (rows, head-dim slices of ``BLOCK_D``)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_gd = mask_g[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs_s = tl.arange(0, SPLIT_PAD)
    part = (bh * num_splits + offs_s)[:, None] * group + offs_g[None, :]
    mask_sg = (offs_s < num_splits)[:, None] & mask_g[None, :]
    m_s = tl.load(M_PART + part, mask=mask_sg, other=float("-inf"))
    l_s = tl.load(L_PART + part, mask=mask_sg, other=0.0)
    m = tl.max(m_s, axis=0)
    far = bh * group + offs_g
    if WITH_FAR:
        far_m = tl.load(FAR_M + far, mask=mask_g, other=float("-inf"))
        m = tl.maximum(m, far_m)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(l_s * tl.exp(m_s - m_safe[None, :]), axis=0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        ss = s0 + offs_c
        p = (bh * num_splits + ss)[:, None] * group + offs_g[None, :]  # [S, G]
        mask_p = (ss < num_splits)[:, None] & mask_g[None, :]
        w = tl.exp(tl.load(M_PART + p, mask=mask_p, other=float("-inf")) - m_safe[None, :])
        a = tl.load(
            ACC_PART + p[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=mask_p[:, :, None] & (offs_d < HEAD_DIM)[None, None, :],
            other=0.0,
        )  # [S, G, D]
        acc += tl.sum(w[:, :, None] * a, 0)
    if WITH_FAR:
        w_far = tl.exp(far_m - m_safe)
        den += w_far * tl.load(FAR_L + far, mask=mask_g, other=0.0)
        acc += w_far[:, None] * tl.load(
            FAR_ACC + far[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_gd, other=0.0
        )
    ok = den > 0
    out = acc / tl.where(ok, den, 1.0)[:, None]
    tl.store(
        OUT + (bh * group + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mask_gd,
    )
    if d0 == 0:
        lse = tl.where(ok, m_safe + tl.log(tl.where(ok, den, 1.0)), float("-inf"))
        tl.store(LSE + bh * group + offs_g, lse, mask=mask_g)
