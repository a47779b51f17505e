"""Triton kernels of the lookup: one pass over the centroids, then selection to the budget.

``centroid_pass`` reads every key and value centroid once per (sequence, KV head) and produces
the logits of every query head of the group against every cluster plus, in the same pass, the
partial softmax state of the far field over *all* clusters. ``select_clusters`` then ranks the
clusters (the paper's eq. 1), finds the budget threshold by bisection (no sort), writes the
positions of every token to attend exactly (sink, recent window, tokens of the selected
clusters, compacted) and subtracts the selected clusters from the far-field state. Shapes are
fixed by capacities, never by data, so a decode step needs no host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernel_utils import dot, load_rows, softmax_update, store_partial


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _centroid_pass_kernel(
    Q,
    KC,
    VC,
    SIZES,
    Z,
    M_PART,
    L_PART,
    ACC_PART,
    scale,
    num_clusters,
    group,
    clusters_per_split,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WITH_FAR: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    q = load_rows(Q, bh * group, group, HEAD_DIM, BLOCK_G, BLOCK_D)  # [BLOCK_G, BLOCK_D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * clusters_per_split
    for c0 in range(start, start + clusters_per_split, BLOCK_C):
        cs = c0 + offs_c
        mask_c = cs < num_clusters
        rows = bh * num_clusters + cs
        kc = tl.load(
            KC + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_c[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_C, BLOCK_D]
        n = tl.load(SIZES + rows, mask=mask_c, other=0).to(tl.float32)  # [BLOCK_C]
        z = dot(q, tl.trans(kc), NATIVE_DOT) * scale  # [BLOCK_G, BLOCK_C]
        z = tl.where((n > 0)[None, :], z, float("-inf"))
        tl.store(
            Z + (bh * group + offs_g[:, None]) * num_clusters + cs[None, :],
            z,
            mask=mask_g[:, None] & mask_c[None, :],
        )
        m, den, p, alpha = softmax_update(m, den, z, n[None, :])
        if WITH_FAR:
            vc = tl.load(
                VC + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_c[:, None] & mask_d[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None] + dot(p.to(vc.dtype), vc, NATIVE_DOT)
    part = bh * num_splits + split
    store_partial(
        M_PART, L_PART, ACC_PART, part, group, m, den, acc, HEAD_DIM, BLOCK_G, BLOCK_D, WITH_FAR
    )


@triton.jit
def _score_kernel(
    Z,
    M_PART,
    L_PART,
    SCORE,
    num_clusters,
    group,
    num_splits,
    ROWS: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Score of every cluster, ``log sum_g exp(z[g, c] - lse[g])`` (the log of the paper's
    eq. 1 summed over the group); dead clusters get ``-inf``. Grid: (rows, cluster chunks)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, ROWS)
    mask_g = offs_g < group
    offs_s = tl.arange(0, SPLIT_PAD)
    part = (bh * num_splits + offs_s)[:, None] * group + offs_g[None, :]
    mask_sg = (offs_s < num_splits)[:, None] & mask_g[None, :]
    m_s = tl.load(M_PART + part, mask=mask_sg, other=float("-inf"))  # [SPLIT, G]
    l_s = tl.load(L_PART + part, mask=mask_sg, other=0.0)
    m = tl.max(m_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(l_s * tl.exp(m_s - m_safe[None, :]), axis=0)
    lse = tl.where(den > 0, m_safe + tl.log(tl.where(den > 0, den, 1.0)), 0.0)
    cs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask_c = cs < num_clusters
    z = tl.load(
        Z + (bh * group + offs_g[:, None]) * num_clusters + cs[None, :],
        mask=mask_g[:, None] & mask_c[None, :],
        other=float("-inf"),
    )  # [ROWS, CHUNK]
    x = z - lse[:, None]
    x_max = tl.max(x, axis=0)
    x_safe = tl.where(x_max == float("-inf"), 0.0, x_max)
    mass = tl.sum(tl.exp(x - x_safe[None, :]), axis=0)
    score = tl.where(mass > 0, x_safe + tl.log(tl.where(mass > 0, mass, 1.0)), float("-inf"))
    tl.store(SCORE + bh * num_clusters + cs, score, mask=mask_c)


@triton.jit
def _select_kernel(
    Z,
    SIZES,
    OFFSETS,
    ORDER,
    VC,
    M_PART,
    L_PART,
    SEQ_LENS,
    CLUSTERED,
    BUDGET,
    SCORE,
    MARK,
    SEL_BASE,
    SEL_CLUSTER,
    TOKENS,
    COUNT,
    NUM_SELECTED,
    FAR_M,
    FAR_L,
    FAR_ACC,
    num_kv_heads,
    num_clusters,
    group,
    num_splits,
    token_capacity,
    order_capacity,
    list_capacity,
    sink,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    CLUSTER_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    SEL_CHUNK: tl.constexpr,
    EXACT_PAD: tl.constexpr,
    WITH_FAR: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BISECT_STEPS: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // num_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    seq_len = tl.load(SEQ_LENS + b)
    clustered = tl.load(CLUSTERED + b)
    budget = tl.load(BUDGET + b)

    # 1. Softmax state of all clusters from the centroid pass splits: [BLOCK_G].
    offs_s = tl.arange(0, SPLIT_PAD)
    mask_s = offs_s < num_splits
    part = (bh * num_splits + offs_s)[:, None] * group + offs_g[None, :]
    mask_sg = mask_s[:, None] & mask_g[None, :]
    m_s = tl.load(M_PART + part, mask=mask_sg, other=float("-inf"))  # [SPLIT, G]
    l_s = tl.load(L_PART + part, mask=mask_sg, other=0.0)
    m = tl.max(m_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_s = tl.exp(m_s - m_safe[None, :])
    den = tl.sum(l_s * w_s, axis=0)

    # 2. Scores come from _score_kernel (all clusters, many programs).
    offs_k = tl.arange(0, CHUNK)

    # 3. Threshold: the largest set {score > t} whose sizes fit in the budget, by bisection.
    offs_all = tl.arange(0, CLUSTER_PAD)
    mask_all = offs_all < num_clusters
    score = tl.load(SCORE + bh * num_clusters + offs_all, mask=mask_all, other=float("-inf"))
    size = tl.load(SIZES + bh * num_clusters + offs_all, mask=mask_all, other=0)
    live = score > float("-inf")
    total = tl.sum(tl.where(live, size, 0))
    hi = tl.where(total > 0, tl.max(score), 0.0)
    lo = tl.where(total > 0, tl.min(tl.where(live, score, float("inf"))) - 1.0, 0.0)
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        fits = tl.sum(tl.where(score > mid, size, 0)) <= budget
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid)
    threshold = tl.where(total <= budget, float("-inf"), hi)
    selected = live & (score > threshold)

    # 4. Compact: rank and first output slot of every selected cluster.
    sel_size = tl.where(selected, size, 0)
    rank = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    first_slot = tl.cumsum(sel_size, axis=0) - sel_size
    num_selected = tl.sum(selected.to(tl.int32))
    selected_tokens = tl.sum(sel_size)
    offset = tl.load(OFFSETS + bh * num_clusters + offs_all, mask=mask_all, other=0)
    list_base = bh * list_capacity
    tl.store(SEL_CLUSTER + list_base + rank, offs_all, mask=selected)
    # token at slot s of cluster c sits at ORDER[offset[c] + s - first_slot[c]]
    tl.store(SEL_BASE + list_base + rank, offset - first_slot, mask=selected)
    for s0 in range(0, selected_tokens, CHUNK):
        tl.store(MARK + list_base + s0 + offs_k, tl.zeros([CHUNK], tl.int32))
    tl.debug_barrier()
    tl.store(MARK + list_base + first_slot, rank + 1, mask=selected & (sel_size > 0))
    tl.debug_barrier()

    # 5. Token positions: sink, recent window, then the selected clusters' tokens.
    num_sink = tl.minimum(sink, seq_len)
    recent_start = sink + clustered
    num_recent = tl.maximum(seq_len - recent_start, 0)
    num_exact = num_sink + num_recent
    offs_e = tl.arange(0, EXACT_PAD)
    out_base = bh * token_capacity
    for e0 in range(0, num_exact, EXACT_PAD):
        e = e0 + offs_e
        pos = tl.where(e < num_sink, e, recent_start + e - num_sink)
        tl.store(TOKENS + out_base + e, pos.to(tl.int32), mask=e < num_exact)
    carry = tl.zeros([], tl.int32)
    for s0 in range(0, selected_tokens, CHUNK):
        slots = s0 + offs_k
        mask_slot = slots < selected_tokens
        mark = tl.load(MARK + list_base + slots, mask=mask_slot, other=0)
        owner = tl.maximum(tl.associative_scan(mark, 0, _maximum), carry) - 1
        carry = tl.max(owner) + 1
        base = tl.load(SEL_BASE + list_base + owner, mask=mask_slot & (owner >= 0), other=0)
        pos = tl.load(ORDER + bh * order_capacity + base + slots, mask=mask_slot, other=0)
        tl.store(TOKENS + out_base + num_exact + slots, pos, mask=mask_slot)
    tl.store(COUNT + bh, num_exact + selected_tokens)
    tl.store(NUM_SELECTED + bh, num_selected)

    # 6. Far field of the unselected clusters = all clusters minus the selected ones. The
    # accumulators of all clusters stay in the centroid pass's splits (the merge sums them);
    # here only the selected clusters' part is computed, to be subtracted.
    if WITH_FAR:
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        offs_r = tl.arange(0, SEL_CHUNK)
        for r0 in range(0, num_selected, SEL_CHUNK):
            ranks = r0 + offs_r
            mask_r = ranks < num_selected
            cs = tl.load(SEL_CLUSTER + list_base + ranks, mask=mask_r, other=0)
            rows = bh * num_clusters + cs
            n = tl.load(SIZES + rows, mask=mask_r, other=0).to(tl.float32)
            z = tl.load(
                Z + (bh * group + offs_g[:, None]) * num_clusters + cs[None, :],
                mask=mask_g[:, None] & mask_r[None, :],
                other=float("-inf"),
            )
            p = n[None, :] * tl.exp(z - m_safe[:, None])  # [G, SEL_CHUNK]
            vc = tl.load(
                VC + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :],
                other=0.0,
            )
            den -= tl.sum(p, axis=1)
            acc -= dot(p.to(vc.dtype), vc, NATIVE_DOT)
        far = bh * group + offs_g
        tl.store(FAR_M + far, m, mask=mask_g)
        tl.store(FAR_L + far, tl.maximum(den, 0.0), mask=mask_g)
        tl.store(
            FAR_ACC + far[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=mask_g[:, None] & mask_d[None, :],
        )
