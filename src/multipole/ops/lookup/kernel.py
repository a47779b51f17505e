"""Triton kernels of the lookup: one pass over the centroids, scores, selection to the budget.

``_centroid_pass_kernel`` reads every key and value centroid once per (sequence, KV head) and
produces the logits of every query head of the group against every cluster plus, in the same
pass, the partial softmax state of the far field over *all* clusters, split over programs.
``_score_kernel`` (many programs per row) ranks the clusters (the paper's eq. 1) and reduces the
far-field splits to one state per row, and fills a histogram of cluster sizes over score
bins. The selection (``take_by_budget``: score bins, then cluster order) runs many programs
per row, each over a chunk of clusters: ``_select_totals_kernel`` finds the bin where the budget
runs out from the histogram and sums each chunk's clusters before and in it;
``_select_kernel`` places its chunk's clusters from prefix sums of those totals (no sort, no
search) and writes the compact list of selected clusters: for each, its first slot in the list
of selected tokens, where its tokens start in the cluster-sorted order, and its id.
Token positions are expanded from that list by ``ops/decode/kernel.py``, whose exact pass also
subtracts the selected clusters' far-field terms. With a partial far field
(``far_field_share < 1``) the centroid pass reads no value centroids; the selection writes each
cluster's mass (score + log tokens left), ``_band_hist_kernel`` counts the masses per bin (many
programs, atomics) and ``_band_far_field_kernel`` takes the bins of largest mass up to the
count asked (``select_band``) and adds their far field, reading only their value centroids. Shapes
are fixed by capacities, never by data, so a decode step needs no host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernel_utils import dot, load_rows, softmax_update, store_partial, wait_for_previous


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
def _split_state(
    M_PART, L_PART, bh, num_splits, group, ROWS: tl.constexpr, SPLIT_PAD: tl.constexpr
):
    """Max and sum ``[ROWS]`` of one row's softmax state over all its centroid-pass splits."""
    offs_g = tl.arange(0, ROWS)
    offs_s = tl.arange(0, SPLIT_PAD)
    part = (bh * num_splits + offs_s)[:, None] * group + offs_g[None, :]
    mask_sg = (offs_s < num_splits)[:, None] & (offs_g < group)[None, :]
    m_s = tl.load(M_PART + part, mask=mask_sg, other=float("-inf"))  # [SPLIT, G]
    l_s = tl.load(L_PART + part, mask=mask_sg, other=0.0)
    m = tl.max(m_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(l_s * tl.exp(m_s - m_safe[None, :]), axis=0)
    return m, m_safe, den


@triton.jit
def _score_kernel(
    Z,
    M_PART,
    L_PART,
    ACC_PART,
    SCORE,
    FAR_M,
    FAR_L,
    FAR_ACC,
    HIST,
    SIZES,
    num_clusters,
    group,
    num_splits,
    top_score,
    bins_per_nat,
    HEAD_DIM: tl.constexpr,
    BINS: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    FAR_SLICE: tl.constexpr,
    FAR_SPLITS: tl.constexpr,
    WITH_FAR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Score of every cluster, ``log sum_g exp(z[g, c] - lse[g])`` (the log of the paper's
    eq. 1 summed over the group; dead clusters get ``-inf``), the row's histogram of cluster
    sizes over score bins (``_score_bin``, atomics), and the far-field state of all clusters
    reduced over the centroid-pass splits (program ``j`` of a row reduces head-dim slices
    ``j, j + chunks, ...``). Grid: (rows, cluster chunks)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    offs_g = tl.arange(0, ROWS)
    mask_g = offs_g < group
    m, m_safe, den = _split_state(M_PART, L_PART, bh, num_splits, group, ROWS, SPLIT_PAD)
    lse = tl.where(den > 0, m_safe + tl.log(tl.where(den > 0, den, 1.0)), 0.0)
    cs = chunk * CHUNK + tl.arange(0, CHUNK)
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
    live_sizes = tl.load(
        SIZES + bh * num_clusters + cs, mask=mask_c & (score > float("-inf")), other=0
    )
    tl.atomic_add(
        HIST + bh * BINS + _bin_below(score, top_score, bins_per_nat, BINS),
        live_sizes,
        mask=live_sizes > 0,
        sem="relaxed",
    )

    if WITH_FAR:
        far = bh * group + offs_g
        if chunk == 0:
            tl.store(FAR_M + far, m, mask=mask_g)
            tl.store(FAR_L + far, den, mask=mask_g)
        offs_f = tl.arange(0, FAR_SPLITS)
        offs_d = tl.arange(0, FAR_SLICE)
        for d0 in range(chunk * FAR_SLICE, HEAD_DIM, num_chunks * FAR_SLICE):
            dd = d0 + offs_d
            acc = tl.zeros([ROWS, FAR_SLICE], tl.float32)
            for s0 in range(0, num_splits, FAR_SPLITS):
                ss = s0 + offs_f
                part = (bh * num_splits + ss)[:, None] * group + offs_g[None, :]  # [S, G]
                mask_sg = (ss < num_splits)[:, None] & mask_g[None, :]
                w = tl.exp(
                    tl.load(M_PART + part, mask=mask_sg, other=float("-inf")) - m_safe[None, :]
                )
                a = tl.load(
                    ACC_PART + part[:, :, None] * HEAD_DIM + dd[None, None, :],
                    mask=mask_sg[:, :, None] & (dd < HEAD_DIM)[None, None, :],
                    other=0.0,
                )  # [S, G, SLICE]
                acc += tl.sum(w[:, :, None] * a, 0)
            tl.store(
                FAR_ACC + far[:, None] * HEAD_DIM + dd[None, :],
                acc,
                mask=mask_g[:, None] & (dd < HEAD_DIM)[None, :],
            )


@triton.jit
def _bin_below(x, top, bins_per_nat, BINS: tl.constexpr):
    """Bin of a score or mass (the reference's ``bins_below``): ``floor((top - x) *
    bins_per_nat)`` clamped to the bins, so a higher value never gets a higher bin (bin 0 holds
    the best; ``-inf`` the last)."""
    b = tl.minimum(tl.maximum((top - x) * bins_per_nat, 0.0), BINS - 1)
    return b.to(tl.int32)


@triton.jit
def _bin_tile(
    SCORE,
    SIZES,
    row,
    chunk,
    num_clusters,
    top,
    bins_per_nat,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Scores, sizes and score bins (``_bin_below``) of the clusters of one chunk of a row; dead
    clusters (score ``-inf``) get size 0."""
    cs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cs < num_clusters
    s = tl.load(SCORE + row + cs, mask=mask, other=float("-inf"))
    w = tl.load(SIZES + row + cs, mask=mask, other=0)
    w = tl.where(s > float("-inf"), w, 0)
    return s, w, _bin_below(s, top, bins_per_nat, BINS)


@triton.jit
def _edge_fill(w, bins, edge_bin, before, rest):
    """Tokens the edge bin's clusters of a tile take, in cluster order, from what the budget
    leaves (``rest``), ``before`` of the bin's tokens being in earlier chunks (0 elsewhere)."""
    inside = tl.where((w > 0) & (bins == edge_bin), w, 0)
    in_before = before + tl.cumsum(inside, 0) - inside
    return tl.minimum(tl.maximum(rest - in_before, 0), inside)


@triton.jit
def _clear_slice(HIST, chunk, num_chunks, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Zero this chunk's share of a row's ``BINS`` histogram bins (all chunks clear them all)."""
    offs = tl.arange(0, CHUNK)
    for h0 in range(chunk * CHUNK, BINS, num_chunks * CHUNK):
        tl.store(HIST + h0 + offs, 0, mask=h0 + offs < BINS)


@triton.jit
def _select_totals_kernel(
    SCORE,
    HIST,
    SIZES,
    BUDGET,
    ROW_BIN,
    TOTALS,
    MASS_TOP,
    BAND_HIST,
    BOUNDARY,
    num_kv_heads,
    num_clusters,
    top_score,
    bins_per_nat,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    PARTIAL_FAR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """First half of the selection (``take_by_budget``), one chunk of a row per program: the
    row's edge bin, where the budget runs out (the first where the running size of the score
    histogram passes it; every program finds it, chunk 0 writes it to ``ROW_BIN``), and the
    chunk's totals ``TOTALS[row, chunk] = (size in the edge bin, clusters before it, their
    size, clusters in it)``. ``PARTIAL_FAR``: chunk 0 also resets the row's ``MASS_TOP``
    (``-inf``) and ``BOUNDARY`` (``-1, 0, 0``), and each program clears a slice of
    ``BAND_HIST``. Grid: (rows, chunks)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    budget = tl.load(BUDGET + bh // num_kv_heads)
    offs_h = tl.arange(0, BINS)
    hist = tl.load(HIST + bh * BINS + offs_h)
    edge_bin = tl.min(tl.where(tl.cumsum(hist, 0) > budget, offs_h, BINS))
    _, w, bins = _bin_tile(
        SCORE, SIZES, bh * num_clusters, chunk, num_clusters, top_score, bins_per_nat, BINS, CHUNK
    )
    before = (w > 0) & (bins < edge_bin)
    inside = (w > 0) & (bins == edge_bin)
    out = TOTALS + (bh * tl.num_programs(1) + chunk) * 4
    tl.store(out, tl.sum(tl.where(inside, w, 0)))
    tl.store(out + 1, tl.sum(before.to(tl.int32)))
    tl.store(out + 2, tl.sum(tl.where(before, w, 0)))
    tl.store(out + 3, tl.sum(inside.to(tl.int32)))
    if chunk == 0:
        tl.store(ROW_BIN + bh, edge_bin)
    if PARTIAL_FAR:
        if chunk == 0:
            tl.store(MASS_TOP + bh, float("-inf"))
            tl.store(BOUNDARY + 3 * bh, -1)
            tl.store(BOUNDARY + 3 * bh + 1, 0)
            tl.store(BOUNDARY + 3 * bh + 2, 0)
        _clear_slice(BAND_HIST + bh * BINS, chunk, tl.num_programs(1), BINS, CHUNK)


@triton.jit
def _select_kernel(
    SCORE,
    HIST,
    SIZES,
    OFFSETS,
    BUDGET,
    SEQ_LENS,
    CLUSTERED,
    ROW_BIN,
    TOTALS,
    SEL_FIRST,
    SEL_BASE,
    SEL_CLUSTER,
    COUNT,
    NUM_SELECTED,
    MASS,
    MASS_TOP,
    BOUNDARY,
    num_kv_heads,
    num_clusters,
    list_capacity,
    sink,
    top_score,
    bins_per_nat,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    PARTIAL_FAR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Second half of the selection, one chunk of a row per program: the tokens each cluster
    takes (``take_by_budget``: clusters before the edge bin whole; in it, in cluster order,
    what the budget leaves) from the chunk totals' prefix sums, and the compact list of
    selected clusters in cluster order. For selected cluster of rank r it writes
    ``SEL_FIRST[r]`` (its first slot among the selected tokens), ``SEL_BASE[r]``
    (``offset - first``: its token at slot ``s`` is ``ORDER[SEL_BASE[r] + s]``) and
    ``SEL_CLUSTER[r]``; the last chunk writes ``COUNT`` (sink, recent window and selected tokens)
    and ``NUM_SELECTED``; each program clears a slice of the score histogram for the next step.
    ``PARTIAL_FAR``: also ``MASS[c] = score + log(tokens left)`` of every cluster with tokens
    left (else ``-inf``), their largest (``MASS_TOP``, atomics), and ``BOUNDARY = (id, first slot,
    tokens taken)`` of the one cluster taken in part (if any), whose far-field term the exact
    pass then removes from its taken tokens. Grid: (rows, chunks)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    b = bh // num_kv_heads
    row = bh * num_clusters
    edge_bin = tl.load(ROW_BIN + bh)
    offs_k = tl.arange(0, CHUNKS_PAD)
    mask_k = offs_k < num_chunks
    totals = TOTALS + (bh * num_chunks + offs_k) * 4
    edge_size = tl.load(totals, mask=mask_k, other=0)
    whole_count = tl.load(totals + 1, mask=mask_k, other=0)
    whole_size = tl.load(totals + 2, mask=mask_k, other=0)
    edge_count = tl.load(totals + 3, mask=mask_k, other=0)
    # the clusters before the edge bin fit whole; the bin's fill, in cluster order, takes
    # the rest of the budget: a chunk whose bin tokens start at `edge_before` takes them all,
    # part (the crossing chunk, at most one) or none
    rest = tl.load(BUDGET + b) - tl.sum(whole_size)
    edge_before = tl.cumsum(edge_size, 0) - edge_size
    full = mask_k & (edge_before + edge_size <= rest)
    crossing = mask_k & ~full & (edge_before < rest)
    cross = tl.min(tl.where(crossing, offs_k, CHUNKS_PAD))
    # selected clusters per chunk, those of the crossing chunk counted from its tile
    per_chunk = whole_count + tl.where(full, edge_count, 0)
    if cross < chunk:  # (the ranks of earlier chunks only are needed)
        _, w_x, bins_x = _bin_tile(
            SCORE, SIZES, row, cross, num_clusters, top_score, bins_per_nat, BINS, CHUNK
        )
        cross_before = tl.sum(tl.where(offs_k == cross, edge_before, 0))
        part_x = _edge_fill(w_x, bins_x, edge_bin, cross_before, rest)
        per_chunk += tl.where(offs_k == cross, tl.sum((part_x > 0).to(tl.int32)), 0)
    earlier = offs_k < chunk
    rank0 = tl.sum(tl.where(earlier, per_chunk, 0))
    own_edge_before = tl.sum(tl.where(offs_k == chunk, edge_before, 0))
    slot0 = tl.sum(tl.where(earlier, whole_size, 0)) + tl.minimum(rest, own_edge_before)

    s, w, bins = _bin_tile(
        SCORE, SIZES, row, chunk, num_clusters, top_score, bins_per_nat, BINS, CHUNK
    )
    cs = chunk * CHUNK + tl.arange(0, CHUNK)
    taken = tl.where(bins < edge_bin, w, _edge_fill(w, bins, edge_bin, own_edge_before, rest))
    selected = taken > 0
    rank = rank0 + tl.cumsum(selected.to(tl.int32), 0) - 1
    first = slot0 + tl.cumsum(taken, 0) - taken
    offset = tl.load(OFFSETS + row + cs, mask=selected, other=0)
    list_base = bh * list_capacity
    tl.store(SEL_FIRST + list_base + rank, first, mask=selected)
    tl.store(SEL_BASE + list_base + rank, offset - first, mask=selected)
    tl.store(SEL_CLUSTER + list_base + rank, cs, mask=selected)
    _clear_slice(HIST + bh * BINS, chunk, num_chunks, BINS, CHUNK)
    if PARTIAL_FAR:
        left = w - taken
        mass = tl.where(left > 0, s + tl.log(tl.maximum(left, 1).to(tl.float32)), float("-inf"))
        tl.store(MASS + row + cs, mass, mask=cs < num_clusters)
        top = tl.max(mass)
        if top > float("-inf"):
            tl.atomic_max(MASS_TOP + bh, top, sem="relaxed")
        in_part = selected & (left > 0)  # the one cluster taken in part, if in this chunk
        if tl.sum(in_part.to(tl.int32)) > 0:
            tl.store(BOUNDARY + 3 * bh, tl.sum(tl.where(in_part, cs, 0)))
            tl.store(BOUNDARY + 3 * bh + 1, tl.sum(tl.where(in_part, first, 0)))
            tl.store(BOUNDARY + 3 * bh + 2, tl.sum(tl.where(in_part, taken, 0)))
    if chunk == num_chunks - 1:
        seq_len = tl.load(SEQ_LENS + b)
        clustered = tl.load(CLUSTERED + b)
        num_exact = tl.minimum(sink, seq_len) + tl.maximum(seq_len - sink - clustered, 0)
        tl.store(COUNT + bh, (num_exact + slot0 + tl.sum(taken)).to(tl.int32))
        tl.store(NUM_SELECTED + bh, (rank0 + tl.sum(selected.to(tl.int32))).to(tl.int32))


@triton.jit
def _mass_top(MASS_TOP, bh):
    """The row's largest mass (0 when no cluster has tokens left: no bins are used)."""
    top = tl.load(MASS_TOP + bh)
    return tl.where(top > float("-inf"), top, 0.0)


@triton.jit
def _band_hist_kernel(
    MASS,
    MASS_TOP,
    BAND_HIST,
    num_clusters,
    bins_per_nat,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The count of clusters with tokens left per mass bin (``select_band``'s bins below the
    row's largest mass, ``MASS_TOP``), with atomics, many programs per row.
    Grid: (rows, cluster chunks)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mass = tl.load(MASS + bh * num_clusters + cs, mask=cs < num_clusters, other=float("-inf"))
    left = mass > float("-inf")
    bins = _bin_below(mass, _mass_top(MASS_TOP, bh), bins_per_nat, BINS)
    tl.atomic_add(BAND_HIST + bh * BINS + bins, left.to(tl.int32), mask=left, sem="relaxed")


@triton.jit
def _band_far_field_kernel(
    Z,
    VC,
    SIZES,
    MASS,
    MASS_TOP,
    BAND_HIST,
    FAR_COUNT,
    BOUNDARY,
    BOUNDARY_Z,
    MEMBERS,
    M_PART,
    L_PART,
    ACC_PART,
    num_clusters,
    group,
    first_slot,
    num_slots,
    bins_per_nat,
    HEAD_DIM: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The far field of a partial far field's clusters (``select_band``: the mass bins, best
    first, whose running count stays within ``FAR_COUNT``, from ``_band_hist_kernel``), one
    chunk of ``CHUNK`` clusters per program: it lists the chunk's clusters in the far field
    (``MEMBERS``, the program's own segment), then adds ``N e^z Vc`` of those alone, reading
    only their logits, sizes and value centroids (a few percent of the clusters: a scan of every
    cluster's tiles would cost a chain of loads per tile). The partial state goes to slot
    ``first_slot + chunk`` of the row's ``num_slots`` (after the exact pass's, which the merge
    then combines). The program holding the partly taken cluster writes its logits to
    ``BOUNDARY_Z`` (``-inf`` if outside the far field): the exact pass removes that cluster's
    far-field term from its taken tokens (no other selected cluster has tokens left).
    Grid: (rows, cluster chunks)."""
    wait_for_previous(PDL)
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    # the far field: the mass bins before the first where the running count passes FAR_COUNT
    counts = tl.load(BAND_HIST + bh * BINS + tl.arange(0, BINS))
    cut = tl.sum((tl.cumsum(counts, 0) <= tl.load(FAR_COUNT + bh)).to(tl.int32))
    cs = chunk * CHUNK + tl.arange(0, CHUNK)
    mass = tl.load(MASS + bh * num_clusters + cs, mask=cs < num_clusters, other=float("-inf"))
    bins = _bin_below(mass, _mass_top(MASS_TOP, bh), bins_per_nat, BINS)
    in_far = (mass > float("-inf")) & (bins < cut)
    boundary = tl.load(BOUNDARY + 3 * bh)
    if (boundary >= chunk * CHUNK) & (boundary < chunk * CHUNK + CHUNK):
        boundary_in_far = tl.sum((in_far & (cs == boundary)).to(tl.int32)) > 0
        zb = tl.load(Z + (bh * group + offs_g) * num_clusters + boundary, mask=mask_g)
        zb = tl.where(boundary_in_far, zb, float("-inf"))
        tl.store(BOUNDARY_Z + bh * group + offs_g, zb, mask=mask_g)
    # compaction: the chunk's members, in cluster order, at the start of its segment
    rank = tl.cumsum(in_far.to(tl.int32), 0) - 1
    segment = MEMBERS + bh * num_clusters + chunk * CHUNK
    tl.store(segment + rank, cs.to(tl.int32), mask=in_far)
    num_members = tl.sum(in_far.to(tl.int32))
    tl.debug_barrier()  # the members written by every thread of the program are visible

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs_c = tl.arange(0, BLOCK_M)
    for r0 in range(0, num_members, BLOCK_M):
        mask_c = r0 + offs_c < num_members
        ids = tl.load(segment + r0 + offs_c, mask=mask_c, other=0).to(tl.int64)
        rows = bh * num_clusters + ids
        z = tl.load(
            Z + (bh * group + offs_g[:, None]) * num_clusters + ids[None, :],
            mask=mask_g[:, None] & mask_c[None, :],
            other=float("-inf"),
        )
        n = tl.load(SIZES + rows, mask=mask_c, other=0).to(tl.float32)
        vc = tl.load(
            VC + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_c[:, None] & mask_d[None, :],
            other=0.0,
        )
        m, den, p, alpha = softmax_update(m, den, z, n[None, :])
        acc = acc * alpha[:, None] + dot(p.to(vc.dtype), vc, NATIVE_DOT)
    store_partial(
        M_PART,
        L_PART,
        ACC_PART,
        bh * num_slots + first_slot + chunk,
        group,
        m,
        den,
        acc,
        HEAD_DIM,
        BLOCK_G,
        BLOCK_D,
        True,
    )
