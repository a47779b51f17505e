"""Triton k-means: batched Lloyd steps over many groups (block x KV head) in a few launches.

The same algorithm as :func:`multipole.ops.kmeans.reference.kmeans` with unit weights (a group's
first ``num_points[g]`` points are valid), computed in fp32 from points read straight from the
cache (``X + base[g] + i * D``, no gathered copy):

- ``_assign_kernel``: nearest active centroid of every point (``argmin ||c||^2 - 2 x.c``, ties
  to the lower index) and its squared distance, one program per tile of points, from the
  centroids' norms and (16-bit points) their two 16-bit parts, made by ``_split_kernel``;
- ``_accumulate_kernel``: per-cluster sums and counts as a one-hot matrix product (exact 0/1
  weights, fp32 accumulation), split over programs by cluster tiles and point ranges; each
  program scans its range ``SCAN`` labels at a time, lists its tile's members among them (a
  prefix sum, in point order, so the sums are deterministic) and reads only their rows; the
  last point-split of a cluster tile divides and writes the means (empty clusters keep a given
  centroid or get 0) and the sizes, to any ``[base[g] + k * D]`` destination (the index's own
  storage too);
- re-seeding (in the accumulation's last program of a group): every empty active cluster moves
  onto the farthest point not yet used (in cluster order, farthest first: the reference's
  top-k rule), with no host round trip;
- ``_init_kernel``: initial centroids from kept centroids and seed points;
- ``_priority_kernel``: the seeding priority ``hash_uniform(seed, head, position)`` (bit-exact).

Results may differ from the reference in ties and rounding (for 16-bit caches the assignment's
dot products run on tensor cores, the centroids in two 16-bit parts: about 16 mantissa bits
where tf32 keeps 10); the invariants hold exactly: labels come from
one assignment, centroids are the member means of the returned labels, sizes their histogram.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernel_utils import interpreting

BLOCK_N = 64  # points per tile of the accumulation
# H100, 8 heads x 8320 bf16 points x 520 clusters (a little above an online update's largest,
# 8192 points and 512 clusters; NOTES_kernels.md Rounds 9 and 12): accumulation 46 us at 32
# clusters per tile, 2048-label scan steps, 4 warps and 2 point splits (71 at 1024, 8 warps,
# 1 split; 49-68 at the other splits and warps); at a 128K prefill's 128 groups of 8192 points
# 437 us (641 before). Assignment with split centroids 65 us at 128 points x 64 clusters, 8
# warps, no pipelining (70-83 at the other tiles; one tf32 product at 256 x 64: 84), 823 us at
# the prefill's groups (1056)
SCAN = 2048  # labels per step of the accumulation's member listing
BLOCK_K = 32  # clusters per tile of the accumulation
ACCUMULATE_WARPS = 4
ASSIGN_BLOCK_N = 128  # points per program of the assignment
ASSIGN_BLOCK_K = 64  # clusters per tile of the assignment
ASSIGN_STAGES = 1  # software pipelining of the assignment's centroid loads (1: none)
SPLIT_ROWS = 64  # centroids per program of the split into the assignment's operands
WARPS = 8  # of the assignment
_MASK32 = 0xFFFFFFFF


@triton.jit
def _assign_kernel(
    X,
    X_BASE,
    NUM_POINTS,
    C_HI,
    C_LO,
    C_SQ,
    NUM_CLUSTERS,
    LABELS,
    SQD,
    OUT_LABELS,
    OUT_LABEL_BASE,
    OUT_LABEL_OFFSET,
    max_points,
    max_clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    NATIVE: tl.constexpr,
    STAGES: tl.constexpr,
    COMMIT: tl.constexpr,
):
    """Labels ``[G, max_points]`` int32 (-1 past ``num_points``) and squared distances (-inf
    there), from the centroids' squared norms ``C_SQ [G, K]`` and either (``SPLIT``) their two
    16-bit parts ``C_HI + C_LO [G, K, D]`` in the points' dtype (two 16-bit products: the
    centroid to about 16 mantissa bits), or the float32 centroids in ``C_HI`` (IEEE fp32).
    With ``COMMIT`` also ``OUT_LABELS[base[g] + i] = label + offset[g]``."""
    g = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    n_g = tl.load(NUM_POINTS + g)
    k_g = tl.load(NUM_CLUSTERS + g)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_g
    mask_d = offs_d < HEAD_DIM
    base = tl.load(X_BASE + g)
    x = tl.load(
        X + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    x32 = x.to(tl.float32)
    x_sq = tl.sum(x32 * x32, axis=1)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_k = tl.zeros([BLOCK_N], tl.int32)
    k_end = tl.where(n0 < n_g, k_g, 0)
    for k0 in tl.range(0, k_end, BLOCK_K, num_stages=STAGES):
        ks = k0 + offs_k
        mask_k = ks < k_g
        rows = (g * max_clusters + ks)[:, None] * HEAD_DIM + offs_d[None, :]
        mask_kd = mask_k[:, None] & mask_d[None, :]
        c_sq = tl.load(C_SQ + g * max_clusters + ks, mask=mask_k, other=float("inf"))
        if SPLIT:
            hi = tl.trans(tl.load(C_HI + rows, mask=mask_kd, other=0.0))
            lo = tl.trans(tl.load(C_LO + rows, mask=mask_kd, other=0.0))
            if NATIVE:
                xc = tl.dot(x, lo, tl.dot(x, hi))
            else:  # (the interpreter's 16-bit products are wrong)
                xc = tl.dot(x32, hi.to(tl.float32), input_precision="ieee")
                xc += tl.dot(x32, lo.to(tl.float32), input_precision="ieee")
        else:
            c = tl.load(C_HI + rows, mask=mask_kd, other=0.0)
            xc = tl.dot(x32, tl.trans(c), input_precision="ieee")  # [BLOCK_N, BLOCK_K]
        dist = c_sq[None, :] - 2.0 * xc
        d_min, i_min = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        closer = d_min < best
        best = tl.where(closer, d_min, best)
        best_k = tl.where(closer, k0 + i_min, best_k)
    labels = tl.where(mask_n, best_k, -1)
    sqd = tl.where(mask_n, tl.maximum(best + x_sq, 0.0), float("-inf"))
    in_row = offs_n < max_points
    tl.store(LABELS + g * max_points + offs_n, labels, mask=in_row)
    tl.store(SQD + g * max_points + offs_n, sqd, mask=in_row)
    if COMMIT:
        out = tl.load(OUT_LABEL_BASE + g)
        off = tl.load(OUT_LABEL_OFFSET + g)
        tl.store(OUT_LABELS + out + offs_n, labels + off, mask=mask_n)


@triton.jit
def _split_kernel(
    C,
    C_HI,
    C_LO,
    C_SQ,
    rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PART_MAX: tl.constexpr,
):
    """The assignment's operands of float32 centroids ``C [rows, D]``: squared norms and, with
    ``SPLIT``, the 16-bit parts ``hi = C`` rounded and ``lo = C - hi`` rounded (each clamped
    to ``PART_MAX``, the 16-bit type's largest value)."""
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rs < rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    at = rs.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    c = tl.load(C + at, mask=mask, other=0.0)
    tl.store(C_SQ + rs, tl.sum(c * c, axis=1), mask=rs < rows)
    if SPLIT:
        hi = tl.clamp(c, -PART_MAX, PART_MAX).to(C_HI.dtype.element_ty)
        lo = tl.clamp(c - hi.to(tl.float32), -PART_MAX, PART_MAX)
        tl.store(C_HI + at, hi, mask=mask)
        tl.store(C_LO + at, lo.to(C_LO.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_kernel(
    X,
    X_BASE,
    NUM_POINTS,
    LABELS,
    NUM_CLUSTERS,
    PSUM,
    PCNT,
    SEMAPHORE,
    OLD,
    OLD_BASE,
    OUT,
    OUT_BASE,
    SIZES,
    SIZE_BASE,
    Y,
    Y_BASE,
    PSUM_Y,
    OUT_Y,
    OUT_Y_BASE,
    SQD,
    GROUP_SEMAPHORE,
    MEMBERS,
    max_points,
    max_clusters,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCAN: tl.constexpr,
    NATIVE: tl.constexpr,
    KEEP_OLD: tl.constexpr,
    WITH_Y: tl.constexpr,
    RESEED: tl.constexpr,
):
    """Member means of clusters ``kt * BLOCK_K ..`` of group ``g`` over points split ``sp``.
    Grid: (G, cluster tiles, point splits). Split ``sp`` covers one range of the group's
    points, ``SCAN`` labels at a time: it lists the indices of its tile's members among them,
    in point order, in its own ``SCAN`` slots of ``MEMBERS [G, tiles, splits, SCAN]``, then
    reads only their rows.

    The last split of a tile writes the means to ``OUT[out_base[g] + k * D]`` (empty
    clusters: the centroid at ``OLD[old_base[g] + k * D]`` if ``KEEP_OLD``, else 0) and the
    sizes to ``SIZES[size_base[g] + k]``; with ``WITH_Y`` also the means of a second point
    set ``Y`` (e.g. the values) under the same labels, to ``OUT_Y`` (0 when empty). With
    ``RESEED`` the last tile of a group to finish moves its empty clusters onto far points
    (``_reseed_group``; ``OUT`` and ``SIZES`` must then be the working ``[G, K, D]`` /
    ``[G, K]`` buffers)."""
    g = tl.program_id(0).to(tl.int64)
    kt = tl.program_id(1)
    sp = tl.program_id(2)
    k_g = tl.load(NUM_CLUSTERS + g)
    k0 = kt * BLOCK_K
    if k0 < k_g:
        n_g = tl.load(NUM_POINTS + g)
        base = tl.load(X_BASE + g)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_d = offs_d < HEAD_DIM
        acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        acc_y = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        cnt = tl.zeros([BLOCK_K], tl.float32)
        if WITH_Y:
            base_y = tl.load(Y_BASE + g)
        per_split = tl.cdiv(n_g, num_splits)
        start = sp * per_split
        end = tl.minimum(start + per_split, n_g)  # points past num_points never count
        members = MEMBERS + ((g * tl.num_programs(1) + kt) * num_splits + sp) * SCAN
        offs_s = tl.arange(0, SCAN)
        for s0 in range(start, end, SCAN):
            ps = s0 + offs_s
            lab = tl.load(LABELS + g * max_points + ps, mask=ps < end, other=-1)
            mine = (lab >= k0) & (lab < k0 + BLOCK_K)
            tl.store(members + tl.cumsum(mine.to(tl.int32), 0) - 1, ps.to(tl.int32), mask=mine)
            count = tl.sum(mine.to(tl.int32), 0)
            tl.debug_barrier()  # the list is read back by other threads of this program
            for n0 in range(0, count, BLOCK_N):
                mask_n = n0 + offs_n < count
                ns = tl.load(members + n0 + offs_n, mask=mask_n, other=0, cache_modifier=".cg")
                lab_n = tl.load(LABELS + g * max_points + ns, mask=mask_n, other=-1)
                onehot = lab_n[None, :] == ks[:, None]  # [BLOCK_K, BLOCK_N]
                mask_nd = mask_n[:, None] & mask_d[None, :]
                x = tl.load(
                    X + base + ns[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_nd, other=0.0
                )
                if NATIVE:
                    acc += tl.dot(onehot.to(x.dtype), x)
                else:
                    acc += tl.dot(onehot.to(tl.float32), x.to(tl.float32), input_precision="ieee")
                if WITH_Y:
                    y = tl.load(
                        Y + base_y + ns[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=mask_nd,
                        other=0.0,
                    )
                    if NATIVE:
                        acc_y += tl.dot(onehot.to(y.dtype), y)
                    else:
                        acc_y += tl.dot(
                            onehot.to(tl.float32), y.to(tl.float32), input_precision="ieee"
                        )
                cnt += tl.sum(onehot.to(tl.float32), axis=1)
            tl.debug_barrier()  # the next scan step writes the list again
        rows = (g * num_splits + sp) * max_clusters + ks
        in_k = ks < max_clusters
        mask_kd = in_k[:, None] & mask_d[None, :]
        last = num_splits == 1
        if num_splits > 1:
            tl.store(PSUM + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_kd)
            if WITH_Y:
                tl.store(PSUM_Y + rows[:, None] * HEAD_DIM + offs_d[None, :], acc_y, mask=mask_kd)
            tl.store(PCNT + rows, cnt, mask=in_k)
            tl.debug_barrier()
            tile = g * tl.num_programs(1) + kt
            done = tl.atomic_add(SEMAPHORE + tile, 1, sem="acq_rel")
            last = done == num_splits - 1
            if last:
                tl.store(SEMAPHORE + tile, 0)
                acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
                acc_y = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
                cnt = tl.zeros([BLOCK_K], tl.float32)
                for s in range(0, num_splits):
                    r = (g * num_splits + s) * max_clusters + ks
                    offs = r[:, None] * HEAD_DIM + offs_d[None, :]
                    acc += tl.load(PSUM + offs, mask=mask_kd, other=0.0, cache_modifier=".cg")
                    if WITH_Y:
                        acc_y += tl.load(
                            PSUM_Y + offs, mask=mask_kd, other=0.0, cache_modifier=".cg"
                        )
                    cnt += tl.load(PCNT + r, mask=in_k, other=0.0, cache_modifier=".cg")
        if last:
            mask_k = ks < k_g
            mask_kd = mask_k[:, None] & mask_d[None, :]
            full = cnt > 0
            inv = 1.0 / tl.where(full, cnt, 1.0)
            mean = acc * inv[:, None]
            if KEEP_OLD:
                old = tl.load(
                    OLD + tl.load(OLD_BASE + g) + ks[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_kd,
                    other=0.0,
                )
                mean = tl.where(full[:, None], mean, old)
            else:
                mean = tl.where(full[:, None], mean, 0.0)
            tl.store(
                OUT + tl.load(OUT_BASE + g) + ks[:, None] * HEAD_DIM + offs_d[None, :],
                mean,
                mask=mask_kd,
            )
            size_ptr = SIZES + tl.load(SIZE_BASE + g) + ks
            tl.store(size_ptr, cnt.to(size_ptr.dtype.element_ty), mask=mask_k)
            if WITH_Y:
                tl.store(
                    OUT_Y + tl.load(OUT_Y_BASE + g) + ks[:, None] * HEAD_DIM + offs_d[None, :],
                    tl.where(full[:, None], acc_y * inv[:, None], 0.0),
                    mask=mask_kd,
                )
            if RESEED:
                tl.debug_barrier()
                done_g = tl.atomic_add(GROUP_SEMAPHORE + g, 1, sem="acq_rel")
                if done_g == tl.cdiv(k_g, BLOCK_K) - 1:
                    tl.store(GROUP_SEMAPHORE + g, 0)
                    _reseed_group(
                        g,
                        X,
                        base,
                        n_g,
                        k_g,
                        SIZES,
                        OUT,
                        SQD,
                        max_points,
                        max_clusters,
                        HEAD_DIM,
                        1024,
                        BLOCK_K,
                        BLOCK_D,
                    )


@triton.jit
def _reseed_group(
    g,
    X,
    base,
    n_g,
    k_g,
    SIZES,
    C,
    SQD,
    max_points,
    max_clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Move each empty active cluster of group ``g`` onto the farthest unused point (by the
    last assignment's squared distance), clusters in index order (the reference's top-k
    rule; ties may differ). ``SIZES``/``C`` are the working ``[G, K]``/``[G, K, D]``."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for k0 in range(0, k_g, BLOCK_K):
        ks = k0 + offs_k
        sizes = tl.load(
            SIZES + g * max_clusters + ks, mask=ks < k_g, other=1.0, cache_modifier=".cg"
        )
        empty = (sizes == 0) & (ks < k_g)
        remaining = tl.sum(empty.to(tl.int32))
        while remaining > 0:
            k_e = tl.min(tl.where(empty, ks, 2147483647))
            best = tl.full([], float("-inf"), tl.float32)
            best_i = tl.full([], -1, tl.int32)
            for n0 in range(0, n_g, BLOCK_N):
                d = tl.load(
                    SQD + g * max_points + n0 + offs_n,
                    mask=n0 + offs_n < n_g,
                    other=float("-inf"),
                    cache_modifier=".cg",
                )
                d_max, i_max = tl.max(
                    d, axis=0, return_indices=True, return_indices_tie_break_left=True
                )
                better = d_max > best
                best = tl.where(better, d_max, best)
                best_i = tl.where(better, n0 + i_max, best_i)
            if best_i >= 0:
                row = tl.load(X + base + best_i * HEAD_DIM + offs_d, mask=mask_d, other=0.0)
                tl.store(
                    C + (g * max_clusters + k_e) * HEAD_DIM + offs_d,
                    row.to(tl.float32),
                    mask=mask_d,
                )
                tl.store(SQD + g * max_points + best_i, float("-inf"))
                tl.debug_barrier()
            empty = empty & (ks != k_e)
            remaining -= 1


@triton.jit
def _init_kernel(
    X,
    X_BASE,
    NEW_FROM,
    SEEDS,
    OLD,
    OLD_BASE,
    OLD_COUNT,
    NUM_CLUSTERS,
    C,
    num_seeds,
    max_clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Initial centroids ``C [G, K, D]``: cluster k < old_count[g] keeps its centroid
    ``OLD[old_base[g] + k * D]``, the others start on point ``new_from[g] + SEEDS[g, k -
    old_count]`` (seed index clamped to ``num_seeds - 1``). Grid: (G, cluster tiles)."""
    g = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_g = tl.load(NUM_CLUSTERS + g)
    old_count = tl.load(OLD_COUNT + g)
    mask_k = ks < k_g
    mask_d = offs_d < HEAD_DIM
    is_old = ks < old_count
    slot = tl.minimum(tl.maximum(ks - old_count, 0), num_seeds - 1)
    seed = tl.load(SEEDS + g * num_seeds + slot, mask=mask_k & ~is_old, other=0)
    point = tl.load(NEW_FROM + g) + seed
    x = tl.load(
        X + tl.load(X_BASE + g) + point[:, None] * HEAD_DIM + offs_d[None, :],
        mask=(mask_k & ~is_old)[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    old = tl.load(
        OLD + tl.load(OLD_BASE + g) + ks[:, None] * HEAD_DIM + offs_d[None, :],
        mask=(mask_k & is_old)[:, None] & mask_d[None, :],
        other=0.0,
    )
    tl.store(
        C + (g * max_clusters + ks)[:, None] * HEAD_DIM + offs_d[None, :],
        tl.where(is_old[:, None], old, x),
        mask=(ks < max_clusters)[:, None] & mask_d[None, :],
    )


@triton.jit
def _hash_round(h):
    h = ((h >> 16) ^ h) * 0x45D9F3B
    h = ((h >> 16) ^ h) * 0x45D9F3B
    return (h >> 16) ^ h


@triton.jit
def _priority_kernel(
    OUT,
    HEADS,
    POS_START,
    COUNT,
    seed,
    width,
    BLOCK: tl.constexpr,
):
    """``OUT[r, j] = hash_uniform(seed, heads[r], pos_start[r] + j)`` for ``j < count[r]``,
    ``-inf`` after (bit-exact with the reference). Grid: (rows, cdiv(width, BLOCK))."""
    r = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    head = tl.load(HEADS + r).to(tl.uint32)
    pos = (tl.load(POS_START + r) + js).to(tl.uint32)
    h = tl.full([BLOCK], seed, tl.uint32)
    h = _hash_round(h ^ head)
    h = _hash_round(h ^ pos)
    h = _hash_round(h)
    u = h.to(tl.float32) * 2.3283064365386963e-10  # 2**-32
    u = tl.where(js < tl.load(COUNT + r), u, float("-inf"))
    tl.store(OUT + r * width + js, u, mask=js < width)


# ---------------------------------------------------------------------------------- drivers
def _native(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and not interpreting()


def _splits(groups: int, cluster_tiles: int, max_points: int, device: torch.device) -> int:
    """Point splits of the accumulation, so that groups * tiles * splits fills the GPU."""
    if device.type != "cuda":
        return 2 if max_points > 2 * BLOCK_N else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = round(2 * sms / max(1, groups * cluster_tiles))
    return max(1, min(wanted, max_points // (2 * BLOCK_N)))


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


class Points:
    """Rows of a ``[..., D]`` store seen as groups: group g is ``store.flatten()[base[g] +
    i * D]`` for ``i < num_points[g]`` (row-major rows, e.g. one block of one KV head of the
    cache)."""

    def __init__(
        self, store: torch.Tensor, base: torch.Tensor, num_points: torch.Tensor, max_points: int
    ):
        if store.stride(-1) != 1:
            raise ValueError("kmeans kernel: rows must be contiguous")
        self.store = store
        self.base = base.to(torch.int64).contiguous()
        self.num_points = num_points.to(torch.int32).contiguous()
        self.max_points = max_points
        self.dim = store.shape[-1]

    @property
    def groups(self) -> int:
        return self.base.shape[0]


def assign(points: Points, centroids: torch.Tensor, num_clusters: torch.Tensor, commit=None):
    """Labels ``[G, n]`` int32 and squared distances ``[G, n]`` float32 (see ``_assign_kernel``)
    of ``centroids [G, K, D]`` float32. ``commit``: ``(out_labels, base, offset)`` to also
    write the labels elsewhere."""
    g, n, d = points.groups, points.max_points, points.dim
    k = centroids.shape[1]
    dev = centroids.device
    # 16-bit points: the centroids in two parts of the points' dtype (about 16 mantissa bits,
    # as exact as the fp32 reference in practice, and faster than one tf32 product)
    split = points.store.dtype in (torch.float16, torch.bfloat16)
    c_sq = torch.empty(g, k, dtype=torch.float32, device=dev)
    hi = lo = centroids
    if split:
        hi, lo = (torch.empty(g, k, d, dtype=points.store.dtype, device=dev) for _ in range(2))
    _split_kernel[(triton.cdiv(g * k, SPLIT_ROWS),)](
        centroids,
        hi,
        lo,
        c_sq,
        g * k,
        HEAD_DIM=d,
        BLOCK_R=SPLIT_ROWS,
        BLOCK_D=_pow2(d),
        SPLIT=split,
        PART_MAX=torch.finfo(points.store.dtype).max if split else 0.0,
        num_warps=4,
    )
    labels = torch.empty(g, n, dtype=torch.int32, device=dev)
    sqd = torch.empty(g, n, dtype=torch.float32, device=dev)
    out, out_base, out_off = commit if commit is not None else (labels, points.base, points.base)
    _assign_kernel[(g, triton.cdiv(n, ASSIGN_BLOCK_N))](
        points.store,
        points.base,
        points.num_points,
        hi,
        lo,
        c_sq,
        num_clusters,
        labels,
        sqd,
        out,
        out_base,
        out_off,
        n,
        k,
        HEAD_DIM=d,
        BLOCK_N=ASSIGN_BLOCK_N,
        BLOCK_K=ASSIGN_BLOCK_K,
        BLOCK_D=_pow2(d),
        SPLIT=split,
        NATIVE=_native(points.store.dtype),
        STAGES=ASSIGN_STAGES,
        COMMIT=commit is not None,
        num_warps=WARPS,
    )
    return labels, sqd


class _Accumulator:
    """Scratch of the accumulation for one k-means call: partial sums of the point splits,
    semaphores, and each program's member list (``SCAN`` slots, refilled per scan step)."""

    def __init__(self, points: Points, max_clusters: int, with_y: bool = False):
        g, dev = points.groups, points.store.device
        self.tiles = triton.cdiv(max_clusters, BLOCK_K)
        # a tile's members: about max_points / tiles points
        self.splits = _splits(g, self.tiles, triton.cdiv(points.max_points, self.tiles), dev)
        s = self.splits if self.splits > 1 else 0
        part = g * s * max_clusters * points.dim
        self.psum = torch.empty(part * (2 if with_y else 1), dtype=torch.float32, device=dev)
        self.pcnt = torch.empty(g * s * max_clusters, dtype=torch.float32, device=dev)
        # tile semaphores, then group semaphores; the kernels leave them at 0
        self.semaphore = torch.zeros(g * self.tiles + g, dtype=torch.int32, device=dev)
        self.group_semaphore = self.semaphore[g * self.tiles :]
        self.part = part
        self.max_clusters = max_clusters
        members = g * self.tiles * self.splits * SCAN  # each program's list of its members
        self.members = torch.empty(members, dtype=torch.int32, device=dev)

    def means(
        self,
        points: Points,
        labels: torch.Tensor,
        num_clusters: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor],
        sizes: tuple[torch.Tensor, torch.Tensor],
        old: tuple[torch.Tensor, torch.Tensor] | None = None,
        y: tuple[Points, torch.Tensor, torch.Tensor] | None = None,
        reseed_sqd: torch.Tensor | None = None,
    ) -> None:
        d = points.dim
        y_points, y_out, y_base = y if y is not None else (points, out[0], out[1])
        _accumulate_kernel[(points.groups, self.tiles, self.splits)](
            points.store,
            points.base,
            points.num_points,
            labels,
            num_clusters,
            self.psum,
            self.pcnt,
            self.semaphore,
            *(old if old is not None else out),
            *out,
            *sizes,
            y_points.store,
            y_points.base,
            self.psum[self.part :] if y is not None else self.psum,
            y_out,
            y_base,
            reseed_sqd if reseed_sqd is not None else self.pcnt,
            self.group_semaphore,
            self.members,
            points.max_points,
            self.max_clusters,
            self.splits,
            HEAD_DIM=d,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            BLOCK_D=_pow2(d),
            SCAN=SCAN,
            NATIVE=_native(points.store.dtype),
            KEEP_OLD=old is not None,
            WITH_Y=y is not None,
            RESEED=reseed_sqd is not None,
            num_warps=ACCUMULATE_WARPS,
        )


def lloyd(
    points: Points,
    init: torch.Tensor,
    num_clusters: torch.Tensor,
    iters: int,
    *,
    final: dict | None = None,
    values: tuple[Points, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of every group from ``init [G, K, D]`` float32 (the reference's
    semantics, unit weights); ``init`` is updated in place. Returns ``labels [G, n]`` int32,
    ``centroids [G, K, D]`` and ``sizes [G, K]`` float32 (exact label histogram).

    ``final``: destinations of the last step instead of the returned tensors (which then
    hold the state before it): ``labels=(out, base, offset)`` (labels are also returned),
    ``centroids=(out, base)``, ``sizes=(out, base)``. ``values=(points, out, base)``: also
    write the member means of a second point set under the final labels (0 when empty)."""
    g, k, d = init.shape
    dev = init.device
    num_clusters = num_clusters.to(torch.int32).contiguous()
    centroids = init if init.dtype == torch.float32 and init.is_contiguous() else init.float()
    sizes = torch.zeros(g, k, dtype=torch.float32, device=dev)
    work = (centroids, torch.arange(g, device=dev, dtype=torch.int64) * (k * d))
    work_sizes = (sizes, torch.arange(g, device=dev, dtype=torch.int64) * k)
    acc = _Accumulator(points, k, with_y=values is not None)
    for _ in range(iters):
        labels, sqd = assign(points, centroids, num_clusters)
        acc.means(points, labels, num_clusters, work, work_sizes, old=work, reseed_sqd=sqd)
    final = final or {}
    labels, _ = assign(points, centroids, num_clusters, commit=final.get("labels"))
    acc.means(
        points,
        labels,
        num_clusters,
        final.get("centroids", work),
        final.get("sizes", work_sizes),
        old=work,
        y=values,
    )
    return labels, centroids, sizes


def init_centroids(
    points: Points,
    new_from: torch.Tensor,
    seeds: torch.Tensor,
    old: tuple[torch.Tensor, torch.Tensor],
    old_count: torch.Tensor,
    num_clusters: torch.Tensor,
    max_clusters: int,
) -> torch.Tensor:
    """``[G, K, D]`` float32 initial centroids (see ``_init_kernel``)."""
    g, d = points.groups, points.dim
    out = torch.empty(g, max_clusters, d, dtype=torch.float32, device=points.store.device)
    _init_kernel[(g, triton.cdiv(max_clusters, BLOCK_K))](
        points.store,
        points.base,
        new_from,
        seeds.to(torch.int32).contiguous(),
        *old,
        old_count,
        num_clusters,
        out,
        seeds.shape[1],
        max_clusters,
        HEAD_DIM=d,
        BLOCK_K=BLOCK_K,
        BLOCK_D=_pow2(d),
        num_warps=8,
    )
    return out


def member_means(
    points: Points, labels: torch.Tensor, num_clusters: torch.Tensor, max_clusters: int, out=None
):
    """Means ``[G, K, D]`` float32 of ``points`` under ``labels`` (0 for empty clusters), or
    written to ``out=(tensor, base)``."""
    g, d = points.groups, points.dim
    dev = points.store.device
    if out is None:
        res = torch.zeros(g, max_clusters, d, dtype=torch.float32, device=dev)
        out = (res, torch.arange(g, device=dev, dtype=torch.int64) * (max_clusters * d))
    scratch = torch.empty(g * max_clusters, dtype=torch.float32, device=dev)
    sizes = (scratch, torch.arange(g, device=dev, dtype=torch.int64) * max_clusters)
    _Accumulator(points, max_clusters).means(
        points, labels, num_clusters.to(torch.int32).contiguous(), out, sizes
    )
    return out[0]


def priority(
    seed: int, heads: torch.Tensor, pos_start: torch.Tensor, count: torch.Tensor, width: int
) -> torch.Tensor:
    """``[R, width]``: ``hash_uniform(seed, heads[r], pos_start[r] + j)`` for ``j < count[r]``,
    ``-inf`` after."""
    rows = heads.shape[0]
    out = torch.empty(rows, width, dtype=torch.float32, device=heads.device)
    block = min(1024, _pow2(width))
    _priority_kernel[(rows, triton.cdiv(width, block))](
        out,
        heads.to(torch.int64).contiguous(),
        pos_start.to(torch.int64).contiguous(),
        count.to(torch.int64).contiguous(),
        seed & _MASK32,
        width,
        BLOCK=block,
    )
    return out
