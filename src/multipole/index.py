"""ClusterIndex: blockwise k-means clusters of the keys of every sequence and KV head.

Per sequence the clustered region (tokens ``[sink, sink + clustered_len)``) is cut into blocks
of ``block_size`` tokens. Full blocks are frozen; the last block is *open*: each online update
adds ``interval`` tokens to it, seeds its new clusters on the new keys and refines it with a
few Lloyd steps. When the open block is full it is frozen and the next update opens a new one,
so no frozen token ever points at a cluster that moves.

Cluster ids are per sequence, contiguous per block, in block order. Level 0 clusters tokens;
with ``levels == 2``, level 1 clusters the level-0 centroids of each block (weighted by their
sizes), so every level-1 centroid is the exact mean of its tokens.

Block layout and counts are host-side integers (metadata, O(sequences + blocks)); the tensor
work of a call runs over all blocks, heads and clusters at once.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import MultipoleConfig
from .ops.kernel_utils import kernels_available
from .ops.kmeans import cluster_means, hash_uniform, kmeans

_COARSE_SALT = 0x5BD1E995


@dataclass
class ClusterLevel:
    """Centroids of one level, padded over sequences to a common capacity ``C``.

    Attributes:
        key_centroids: ``[B, H_kv, C, D]`` float32 means of the clustering keys.
        value_centroids: ``[B, H_kv, C, D]`` float32 means of the values.
        sizes: ``[B, H_kv, C]`` int64 tokens per cluster (exact label histogram; 0 = unused).
        attention_key_centroids: ``[B, H_kv, C, D]`` means of the attention keys, or None when
            they are not needed (far field from clustering keys, or the two keys coincide).
        count: clusters in use per sequence.
        open_start: first cluster id of the open block per sequence.
    """

    key_centroids: torch.Tensor
    value_centroids: torch.Tensor
    sizes: torch.Tensor
    attention_key_centroids: torch.Tensor | None
    count: list[int]
    open_start: list[int]

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], attention_keys: bool, device) -> ClusterLevel:
        b, h, c, d = shape

        def zeros() -> torch.Tensor:
            return torch.zeros(b, h, c, d, dtype=torch.float32, device=device)

        return cls(
            zeros(),
            zeros(),
            torch.zeros(b, h, c, dtype=torch.int64, device=device),
            zeros() if attention_keys else None,
            [0] * b,
            [0] * b,
        )

    def reserve(self, needed: int) -> None:
        """Grow the cluster capacity to at least ``needed`` (by 1/8, as :func:`grow`)."""
        if needed <= self.sizes.shape[-1]:
            return
        self.key_centroids = grow(self.key_centroids, 2, needed, 0)
        self.value_centroids = grow(self.value_centroids, 2, needed, 0)
        self.sizes = grow(self.sizes, 2, needed, 0)
        if self.attention_key_centroids is not None:
            self.attention_key_centroids = grow(self.attention_key_centroids, 2, needed, 0)


@dataclass
class _Blocks:
    """A batch of blocks to (re)fit: one row per block, host lists turned into tensors."""

    seq: torch.Tensor  # [nb] sequence of the block
    token_start: torch.Tensor  # [nb] absolute position of the block's first token
    num_tokens: torch.Tensor  # [nb] tokens in the block
    new_from: torch.Tensor  # [nb] tokens before this offset keep their clusters as seeds
    cluster_start: torch.Tensor  # [nb] first level-0 cluster id
    old_clusters: torch.Tensor  # [nb] clusters kept from before (init), the rest are seeded
    num_clusters: torch.Tensor  # [nb] level-0 clusters after the fit
    coarse_start: torch.Tensor  # [nb] first level-1 cluster id
    num_coarse: torch.Tensor  # [nb] level-1 clusters
    max_tokens: int  # maxima known on the host: no device sync to size the work
    max_clusters: int
    max_new_clusters: int
    max_new_tokens: int
    max_coarse: int

    @classmethod
    def from_rows(cls, rows: list[tuple[int, ...]], device: torch.device) -> _Blocks:
        cols = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 9)
        if device.type == "cuda":
            cols = cols.pin_memory().to(device, non_blocking=True)  # asynchronous: no wait
        else:
            cols = cols.to(device)
        return cls(*cols.unbind(1), **_Blocks.maxima(rows))

    @staticmethod
    def maxima(rows: list[tuple[int, ...]]) -> dict[str, int]:
        """The ``max_*`` fields of the blocks of ``rows`` (host integers only)."""
        return dict(
            max_tokens=max(r[2] for r in rows),
            max_clusters=max(r[6] for r in rows),
            max_new_clusters=max(r[6] - r[5] for r in rows),
            max_new_tokens=max(r[2] - r[3] for r in rows),
            max_coarse=max(r[8] for r in rows),
        )


class ClusterIndex:
    """Clusters of the clustered region of every sequence and KV head (see module doc)."""

    def __init__(
        self,
        config: MultipoleConfig,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        token_capacity: int,
        device: torch.device,
        attention_keys: bool,
        first_head: int = 0,
    ) -> None:
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.first_head = first_head  # global index of head 0: seeds are per global head
        self.head_dim = head_dim
        self.open_block_start = [0] * batch  # offset of the open block in the clustered region
        self.labels = torch.full(
            (batch, num_kv_heads, token_capacity), -1, dtype=torch.int64, device=device
        )
        shape = (batch, num_kv_heads, 1, head_dim)  # one unused slot: gathers never see size 0
        self.level0 = ClusterLevel.empty(shape, attention_keys, device)
        self.level1 = (
            ClusterLevel.empty(shape, attention_keys, device) if config.levels == 2 else None
        )
        self.parent = (
            torch.full((batch, num_kv_heads, 1), -1, dtype=torch.int64, device=device)
            if config.levels == 2
            else None
        )
        # scratch buffers of the fused decode step, kept across the layouts of this index
        self.fused_scratch: dict[str, torch.Tensor] = {}
        self.update_graphs = UpdateGraphs()

    def select_sequences(self, rows: list[int], device_rows: torch.Tensor, done: set[int]) -> None:
        """Row ``i`` becomes a copy of row ``rows[i]`` (in place; see
        :meth:`multipole.MultipoleState.select_sequences`)."""
        self.open_block_start = [self.open_block_start[i] for i in rows]
        take_rows_(self.labels, device_rows, done)
        take_rows_(self.parent, device_rows, done)
        for level in (self.level0, self.level1):
            if level is None:
                continue
            for t in (
                level.key_centroids,
                level.value_centroids,
                level.sizes,
                level.attention_key_centroids,
            ):
                take_rows_(t, device_rows, done)
            level.count = [level.count[i] for i in rows]
            level.open_start = [level.open_start[i] for i in rows]

    # ------------------------------------------------------------------ building
    def reserve_tokens(self, needed: int) -> None:
        self.labels = grow(self.labels, 2, needed, -1)

    def prefill(
        self,
        cluster_keys: torch.Tensor,
        values: torch.Tensor,
        attention_keys: torch.Tensor | None,
        clustered_len: list[int],
    ) -> None:
        """Cluster the first ``clustered_len[b]`` tokens after the sink of every sequence."""
        cfg = self.config
        rows = []
        for b, length in enumerate(clustered_len):
            clusters = coarse = 0
            for start, size in zip(
                range(0, length, cfg.block_size), cfg.block_sizes(length), strict=True
            ):
                k, k1 = cfg.clusters_for(size), cfg.coarse_clusters_for(cfg.clusters_for(size))
                rows.append((b, cfg.sink_tokens + start, size, 0, clusters, 0, k, coarse, k1))
                self.open_block_start[b] = start
                self.level0.open_start[b], clusters = clusters, clusters + k
                if self.level1 is not None:
                    self.level1.open_start[b], coarse = coarse, coarse + k1
            self.level0.count[b] = clusters
            if self.level1 is not None:
                self.level1.count[b] = coarse
            self._close_full_open_block(b, length)
        self._fit(rows, cluster_keys, values, attention_keys, cfg.kmeans_iters)

    def advance(
        self,
        cluster_keys: torch.Tensor,
        values: torch.Tensor,
        attention_keys: torch.Tensor | None,
        seqs: list[int],
        clustered_len: list[int],
    ) -> None:
        """Online update: move ``interval`` tokens of each listed sequence into its open block.

        The new tokens are the oldest ``interval`` tokens of the recent window. New clusters
        (to keep ``centroid_ratio``) are seeded on new keys, then ``update_iters`` Lloyd steps
        refine the whole open block; frozen blocks are untouched. ``clustered_len`` holds the
        lengths before the update.
        """
        cfg = self.config
        rows = []
        for b in seqs:
            old_tokens = clustered_len[b] - self.open_block_start[b]
            size = old_tokens + cfg.interval
            k_old = self.level0.count[b] - self.level0.open_start[b]
            k = cfg.clusters_for(size)
            k1 = cfg.coarse_clusters_for(k)
            start1 = self.level1.open_start[b] if self.level1 is not None else 0
            token_start = cfg.sink_tokens + self.open_block_start[b]
            rows.append(
                (b, token_start, size, old_tokens, self.level0.open_start[b], k_old, k, start1, k1)
            )
            self.level0.count[b] = self.level0.open_start[b] + k
            if self.level1 is not None:
                self.level1.count[b] = start1 + k1
            self._close_full_open_block(b, clustered_len[b] + cfg.interval)
        self._fit(rows, cluster_keys, values, attention_keys, cfg.update_iters, update=True)

    def _close_full_open_block(self, b: int, length: int) -> None:
        """Freeze the open block once it holds ``block_size`` tokens."""
        if length - self.open_block_start[b] >= self.config.block_size:
            self.open_block_start[b] = length
            self.level0.open_start[b] = self.level0.count[b]
            if self.level1 is not None:
                self.level1.open_start[b] = self.level1.count[b]

    def _fit(
        self,
        rows: list[tuple[int, ...]],
        cluster_keys: torch.Tensor,
        values: torch.Tensor,
        attention_keys: torch.Tensor | None,
        iters: int,
        update: bool = False,
    ) -> None:
        if not rows:
            return
        kernels = self._kernels(cluster_keys)
        # the block tensors (on the device) serve the PyTorch fits only
        tensors = not kernels or self.level1 is not None
        blocks = _Blocks.from_rows(rows, self.labels.device) if tensors else None
        self.level0.reserve(max(self.level0.count))
        if kernels:
            self._fit_level0_kernels(rows, cluster_keys, values, attention_keys, iters, update)
        else:
            assert blocks is not None
            self._fit_level0(blocks, cluster_keys, values, attention_keys, iters)
        if self.level1 is not None:
            assert blocks is not None
            self.level1.reserve(max(self.level1.count))
            self.parent = grow(self.parent, 2, self.level0.sizes.shape[-1], -1)
            self._fit_level1(blocks)

    def _kernels(self, cluster_keys: torch.Tensor) -> bool:
        """Level-0 k-means on the Triton kernels: on CUDA unless ``backend="reference"``; on
        the CPU (Triton interpreter) only with ``backend="triton"``; never for float64."""
        backend, device = self.config.backend, cluster_keys.device
        if backend == "reference" or cluster_keys.dtype == torch.float64:
            return False
        if not kernels_available(device):
            return False
        return device.type == "cuda" or backend == "triton"

    def _fit_level0_kernels(
        self,
        rows: list[tuple[int, ...]],
        cluster_keys: torch.Tensor,
        values: torch.Tensor,
        attention_keys: torch.Tensor | None,
        iters: int,
        update: bool,
    ) -> None:
        """``_fit_level0`` on the k-means kernels: points read in place from the cache, results
        written straight into the index, per-group metadata built on the host and copied in
        one transfer (no host synchronisation).

        An online ``update`` sizes its work by capacities (the open block's most tokens and
        clusters, ``interval`` new tokens) rather than by this update's sizes, so that every
        update of the same sequences is the same work on other metadata: on CUDA it is one
        CUDA graph (:class:`UpdateGraphs`), replayed after the metadata's copy."""
        from .ops.kmeans import kernel as km

        cfg, h, level = self.config, self.num_kv_heads, self.level0
        stores = [cluster_keys, values, self.labels, level.key_centroids, level.value_centroids]
        stores = [t if _rows_contiguous(t) else t.contiguous() for t in stores[:2]] + stores[2:]
        cluster_keys, values = stores[:2]
        if level.attention_key_centroids is not None:
            assert attention_keys is not None
            if not _rows_contiguous(attention_keys):
                attention_keys = attention_keys.contiguous()
            stores += [attention_keys, level.attention_key_centroids]
        strides = [t.stride() for t in stores]
        size_stride = level.sizes.stride()
        # one row per field, one column per group (block x head): [fields, G] on the device
        table = []
        for b, token_start, size, old_tokens, c_start, k_old, k, _, _ in rows:
            for head in range(h):
                at = [b * st[0] + head * st[1] for st in strides]
                table.append(
                    (
                        at[0] + token_start * strides[0][2],  # 0 cluster-key rows
                        at[1] + token_start * strides[1][2],  # 1 value rows
                        at[2] + token_start,  # 2 labels
                        at[3] + c_start * strides[3][2],  # 3 key centroids
                        at[4] + c_start * strides[4][2],  # 4 value centroids
                        b * size_stride[0] + head * size_stride[1] + c_start,  # 5 sizes
                        c_start,  # 6 label offset
                        size,  # 7 points
                        k,  # 8 clusters
                        k_old,  # 9 kept clusters
                        old_tokens,  # 10 first new point
                        token_start + old_tokens,  # 11 position of the first new point
                        size - old_tokens,  # 12 new points
                        self.first_head + head,  # 13 global head
                        *(
                            (at[5] + token_start * strides[5][2], at[6] + c_start * strides[6][2])
                            if len(stores) > 5
                            else ()
                        ),  # 14, 15 attention-key rows and centroids
                    )
                )
        meta = torch.tensor(list(zip(*table, strict=True)), dtype=torch.int64)
        most = _Blocks.maxima(rows)
        if update:
            n_max = min(cfg.block_size, self.labels.shape[2])
            k_max, width = cfg.clusters_for(n_max), cfg.interval
            new_clusters = min(width, k_max)
            assert most["max_tokens"] <= n_max and most["max_clusters"] <= k_max
            assert most["max_new_tokens"] <= width and most["max_new_clusters"] <= new_clusters
        else:
            n_max, k_max = most["max_tokens"], most["max_clusters"]
            width = max(1, most["max_new_tokens"])
            new_clusters = max(1, min(most["max_new_clusters"], width))

        separate = len(stores) > 5  # attention-key centroids of their own

        def fit(meta: torch.Tensor) -> None:
            num_points, num_clusters = meta[7].to(torch.int32), meta[8].to(torch.int32)
            keys = km.Points(cluster_keys, meta[0], num_points, n_max)
            # Seeds of the clusters new in this fit: the new tokens of highest priority.
            prio = km.priority(cfg.seed, meta[13], meta[11], meta[12], width)
            seeds = prio.topk(new_clusters, dim=-1).indices
            init = km.init_centroids(
                keys, meta[10], seeds, (level.key_centroids, meta[3]), meta[9], num_clusters, k_max
            )
            values_at = km.Points(values, meta[1], num_points, n_max)
            labels, _, _ = km.lloyd(
                keys,
                init,
                num_clusters,
                iters,
                final=dict(
                    labels=(self.labels, meta[2], meta[6]),
                    centroids=(level.key_centroids, meta[3]),
                    sizes=(level.sizes, meta[5]),
                ),
                values=(values_at, level.value_centroids, meta[4]),
            )
            if separate:
                km.member_means(
                    km.Points(attention_keys, meta[14], num_points, n_max),
                    labels,
                    num_clusters,
                    k_max,
                    out=(level.attention_key_centroids, meta[15]),
                )

        device = cluster_keys.device
        if device.type != "cuda":
            fit(meta)
            return
        meta = meta.pin_memory()  # copied without a host wait
        with torch.cuda.device(device):  # every launch on the stores' device
            if not update or torch.cuda.is_current_stream_capturing():
                fit(meta.to(device, non_blocking=True))
                return
            sizing = (n_max, k_max, width, new_clusters, iters, cluster_keys.dtype, cfg)
            addresses = tuple(t.data_ptr() for t in (*stores, level.sizes))
            self.update_graphs.run(meta.shape, (sizing, addresses), meta, fit, device)

    def _fit_level0(
        self,
        blocks: _Blocks,
        cluster_keys: torch.Tensor,
        values: torch.Tensor,
        attention_keys: torch.Tensor | None,
        iters: int,
    ) -> None:
        cfg, h = self.config, self.num_kv_heads
        nb = blocks.seq.shape[0]
        n_max, k_max = blocks.max_tokens, blocks.max_clusters
        offsets = torch.arange(n_max, device=blocks.seq.device)
        positions = blocks.token_start.unsqueeze(1) + offsets  # [nb, n]
        valid = offsets < blocks.num_tokens.unsqueeze(1)  # [nb, n]
        positions = torch.where(valid, positions, blocks.token_start.unsqueeze(1))
        points = _gather_rows(cluster_keys, blocks.seq, positions)  # [nb, H, n, D]

        # Seeds for the clusters that are new in this fit: highest-priority new tokens.
        heads = self.first_head + torch.arange(h, device=points.device).view(1, h, 1)
        priority = hash_uniform(cfg.seed, heads, positions.unsqueeze(1))  # [nb, H, n]
        is_new = valid & (offsets >= blocks.new_from.unsqueeze(1))
        priority = priority.masked_fill(~is_new.unsqueeze(1), float("-inf"))
        num_new = blocks.max_new_clusters
        seed_idx = priority.topk(max(1, min(num_new, n_max)), dim=-1).indices  # [nb, H, s]
        seeds = points.gather(2, seed_idx.unsqueeze(-1).expand(-1, -1, -1, points.shape[-1]))

        slots = torch.arange(k_max, device=points.device)
        cluster_ids = blocks.cluster_start.unsqueeze(1) + slots  # [nb, k]
        old = _gather_rows(
            self.level0.key_centroids,
            blocks.seq,
            cluster_ids.clamp_max(self.level0.sizes.shape[-1] - 1),
        )
        new_slot = (slots - blocks.old_clusters.unsqueeze(1)).clamp(0, seed_idx.shape[-1] - 1)
        seeded = seeds.gather(2, new_slot.view(nb, 1, k_max, 1).expand(-1, h, -1, seeds.shape[-1]))
        keep_old = (slots < blocks.old_clusters.unsqueeze(1)).view(nb, 1, k_max, 1)
        init = torch.where(keep_old, old, seeded.float())

        weights = valid.unsqueeze(1).expand(-1, h, -1).float()
        result = kmeans(
            points.flatten(0, 1),
            blocks.num_clusters.repeat_interleave(h),
            iters,
            weights=weights.flatten(0, 1),
            init=init.flatten(0, 1),
        )
        local = result.labels.view(nb, h, n_max)
        vals = _gather_rows(values, blocks.seq, positions)
        value_means, _ = cluster_means(
            vals.flatten(0, 1), local.flatten(0, 1), weights.flatten(0, 1), k_max
        )

        global_labels = torch.where(local >= 0, local + blocks.cluster_start.view(nb, 1, 1), -1)
        _scatter_rows(self.labels, blocks.seq, positions, global_labels, valid)
        in_block = slots < blocks.num_clusters.unsqueeze(1)  # [nb, k]
        level = self.level0
        _scatter_rows(
            level.key_centroids,
            blocks.seq,
            cluster_ids,
            result.centroids.view(nb, h, k_max, -1),
            in_block,
        )
        _scatter_rows(
            level.value_centroids,
            blocks.seq,
            cluster_ids,
            value_means.view(nb, h, k_max, -1),
            in_block,
        )
        sizes = result.sizes.round().long().view(nb, h, k_max)
        _scatter_rows(level.sizes, blocks.seq, cluster_ids, sizes, in_block)
        if level.attention_key_centroids is not None:
            assert attention_keys is not None
            att = _gather_rows(attention_keys, blocks.seq, positions)
            att_means, _ = cluster_means(
                att.flatten(0, 1), local.flatten(0, 1), weights.flatten(0, 1), k_max
            )
            _scatter_rows(
                level.attention_key_centroids,
                blocks.seq,
                cluster_ids,
                att_means.view(nb, h, k_max, -1),
                in_block,
            )

    def _fit_level1(self, blocks: _Blocks) -> None:
        """Cluster each block's level-0 centroids (weighted by size) into its level-1 clusters."""
        assert self.level1 is not None and self.parent is not None
        cfg, h, fine, coarse = self.config, self.num_kv_heads, self.level0, self.level1
        nb = blocks.seq.shape[0]
        k_max = blocks.max_clusters
        slots = torch.arange(k_max, device=blocks.seq.device)
        in_block = slots < blocks.num_clusters.unsqueeze(1)
        ids = torch.where(
            in_block, blocks.cluster_start.unsqueeze(1) + slots, blocks.cluster_start.unsqueeze(1)
        )
        centroids = _gather_rows(fine.key_centroids, blocks.seq, ids)  # [nb, H, k, D]
        weights = _gather_rows(fine.sizes, blocks.seq, ids).float() * in_block.unsqueeze(1)
        heads = self.first_head + torch.arange(h, device=ids.device).view(1, h, 1)
        priority = hash_uniform(cfg.seed ^ _COARSE_SALT, heads, ids.unsqueeze(1))
        result = kmeans(
            centroids.flatten(0, 1),
            blocks.num_coarse.repeat_interleave(h),
            cfg.kmeans_iters,
            weights=weights.flatten(0, 1),
            priority=priority.flatten(0, 1),
            num_slots=blocks.max_coarse,
        )
        k1 = result.centroids.shape[1]
        local = result.labels.view(nb, h, k_max)
        w = weights.flatten(0, 1)
        parent = torch.where(local >= 0, local + blocks.coarse_start.view(nb, 1, 1), -1)
        _scatter_rows(self.parent, blocks.seq, ids, parent, in_block)
        slots1 = torch.arange(k1, device=ids.device)
        ids1 = blocks.coarse_start.unsqueeze(1) + slots1
        in_block1 = slots1 < blocks.num_coarse.unsqueeze(1)
        value_means, _ = cluster_means(
            _gather_rows(fine.value_centroids, blocks.seq, ids).flatten(0, 1),
            local.flatten(0, 1),
            w,
            k1,
        )
        _scatter_rows(
            coarse.key_centroids, blocks.seq, ids1, result.centroids.view(nb, h, k1, -1), in_block1
        )
        _scatter_rows(
            coarse.value_centroids, blocks.seq, ids1, value_means.view(nb, h, k1, -1), in_block1
        )
        sizes = result.sizes.round().long().view(nb, h, k1)
        _scatter_rows(coarse.sizes, blocks.seq, ids1, sizes, in_block1)
        if coarse.attention_key_centroids is not None:
            assert fine.attention_key_centroids is not None
            att = _gather_rows(fine.attention_key_centroids, blocks.seq, ids).flatten(0, 1)
            att_means, _ = cluster_means(att, local.flatten(0, 1), w, k1)
            _scatter_rows(
                coarse.attention_key_centroids,
                blocks.seq,
                ids1,
                att_means.view(nb, h, k1, -1),
                in_block1,
            )


GROW_MIN = 1024  # slots added at least per growth


class UpdateGraphs:
    """Work that online updates repeat, as CUDA graphs, one per metadata shape: an index's
    k-means (one graph per number of sequences updated together) or a kernel layout's refresh.
    Each is a few dozen launches, which the host takes longer to issue than the GPU to run. A
    graph bakes in its sizes, the config and the addresses of the stores it reads and writes
    (its key): when one of them changes (a store reallocated) the work is captured again.
    Replays run on the stream current at the call; the graphs on one device and stream share
    their scratch, so they must not run concurrently on one stream's pool from two threads.
    If a capture fails, the work runs eagerly from then on (with a warning)."""

    def __init__(self) -> None:
        self._graphs: dict[torch.Size, tuple[tuple, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: _Pool | None = None  # the shared pool, held while there are graphs
        self.enabled = True
        self.captures = self.replays = 0

    def __deepcopy__(self, memo: dict) -> UpdateGraphs:
        """A copy (of a copied index) starts with no graph: these write the original's stores."""
        copy = UpdateGraphs()
        copy.enabled = self.enabled
        return copy

    def run(
        self,
        shape: torch.Size,
        key: tuple,
        meta: torch.Tensor,
        fit: Callable[[torch.Tensor], None],
        device: torch.device,
    ) -> None:
        """``fit(meta on device)``: replayed if captured for this metadata ``shape`` under
        ``key``, else run eagerly and captured for the next update (``meta``: pinned host
        metadata)."""
        entry = self._graphs.get(shape)
        if entry is not None and entry[0] == key:
            _, graph, static = entry
            static.copy_(meta, non_blocking=True)
            graph.replay()
            self.replays += 1
            return
        static = meta.to(device, non_blocking=True)
        fit(static)  # this update (and the kernels compiled outside a capture)
        if not self.enabled:
            return
        self._graphs.pop(shape, None)  # a graph on reallocated stores is never replayed
        from .graphs import capture

        try:
            self._pool = _Pool.of(device)
            graph, _ = capture(lambda: fit(static), device, self._pool.handle)
        except Exception as error:  # noqa: BLE001 (any capture failure: stay eager)
            self.enabled = False
            self._graphs.clear()
            self._pool = None
            warnings.warn(
                f"online update: CUDA graph capture failed, updating eagerly "
                f"({type(error).__name__}: {error})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._graphs[shape] = (key, graph, static)
        self.captures += 1


class _Pool:
    """One memory pool for the update graphs (of every index and kernel layout) on a device and
    stream: their replays never overlap and no tensor made inside one outlives it, so their
    scratch can be shared. A one-op graph holds the pool open while any graphs use it (a pool
    whose graphs were all freed cannot take a new capture); it goes, and the pool with it,
    when the last holder does."""

    _live: weakref.WeakValueDictionary[tuple, _Pool] = weakref.WeakValueDictionary()

    def __init__(self, device: torch.device) -> None:
        from .graphs import capture

        self.handle = torch.cuda.graph_pool_handle()
        self._anchor, _ = capture(lambda: torch.zeros(1, device=device), device, self.handle)

    @classmethod
    def of(cls, device: torch.device) -> _Pool:
        where = (torch.device(device), torch.cuda.current_stream(device).stream_id)
        pool = cls._live.get(where)
        if pool is None:
            pool = cls._live[where] = cls(device)
        return pool


def take_rows_(t: torch.Tensor | None, rows: torch.Tensor, done: set[int]) -> None:
    """``t[i] = t[rows[i]]`` along dim 0, in place (same storage), once per tensor: ``done``
    holds the data pointers already rewritten (a layout may share a tensor with its index)."""
    if t is not None and t.data_ptr() not in done:
        done.add(t.data_ptr())
        t.copy_(t.index_select(0, rows))


def grow(t: torch.Tensor, dim: int, needed: int, fill: float) -> torch.Tensor:
    """Return ``t`` padded with ``fill`` along ``dim`` to at least ``needed``.

    Grows by 1/8 (at least ``GROW_MIN`` slots): a long generation then holds at most ~12.5%
    unused capacity (doubling would hold up to 100%: a second KV cache), for one copy of the
    tensor every 1/8 of its length."""
    size = t.shape[dim]
    if needed <= size:
        return t
    shape = list(t.shape)
    shape[dim] = max(needed, size + max(GROW_MIN, size // 8))
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, size).copy_(t)
    return out


def _rows_contiguous(t: torch.Tensor) -> bool:
    """``[B, H, N, D]`` with contiguous rows of D (strides of any B/H layout)."""
    return t.stride(-1) == 1 and t.stride(2) == t.shape[-1]


def _gather_rows(store: torch.Tensor, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``store[seq[i], :, index[i, j]]`` as ``[nb, H, n, ...]`` for ``store [B, H, N, ...]``."""
    out = store[seq.unsqueeze(1), :, index]  # [nb, n, H, ...]
    return out.transpose(1, 2)


def _scatter_rows(
    store: torch.Tensor,
    seq: torch.Tensor,
    index: torch.Tensor,
    data: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """``store[seq[i], h, index[i, j]] = data[i, h, j]`` wherever ``mask[i, j]``.

    On a GPU without host synchronisation (no ``nonzero``): every (i, j) takes part, masked
    ones adding 0.
    Masked entries may alias written ones (their indices are clamped into the store), so the
    write is two exact accumulations: the targets go to 0 (each adds minus its current value
    once), then the data is added."""
    h = store.shape[1]
    if store.device.type == "cpu":  # nothing to synchronise with: compact the writes
        rows, cols = mask.nonzero(as_tuple=True)
        b = seq[rows].unsqueeze(1).expand(-1, h)
        heads = torch.arange(h, device=store.device).unsqueeze(0).expand(rows.shape[0], -1)
        pos = index[rows, cols].unsqueeze(1).expand(-1, h)
        store[b, heads, pos] = data[rows, :, cols].to(store.dtype)
        return
    nb, n = index.shape
    where = (
        seq.view(nb, 1, 1).expand(nb, h, n),
        torch.arange(h, device=store.device).view(1, h, 1).expand(nb, h, n),
        index.clamp_max(store.shape[2] - 1).view(nb, 1, n).expand(nb, h, n),
    )
    keep = mask.view(nb, 1, n, *([1] * (data.dim() - 3)))
    current = store[where]
    store.index_put_(where, torch.where(keep, -current, torch.zeros_like(current)), accumulate=True)
    store.index_put_(
        where, torch.where(keep, data.to(store.dtype), torch.zeros_like(current)), accumulate=True
    )
