"""The fused decode step: seven Triton launches (nine with a partial far field, two of them on a
second stream beside the expansion), no host synchronisation, fixed shapes.

1. centroid pass (``ops/lookup/kernel.py``): logits of the group against every centroid and
   the far-field softmax state over all clusters, in one read of the centroids, split over
   programs;
2. scores (many programs per row): each cluster's estimated attention mass (the paper's eq. 1,
   summed over the group), and the far field of all clusters reduced over the splits;
3. selection (two launches, many programs per row, one per chunk of clusters): the score bin
   where the budget runs out, from a histogram of cluster sizes over score bins that the
   scoring fills, and each chunk's totals before and in that bin; then each chunk's clusters
   placed from prefix sums of the totals (``take_by_budget``: bins, then cluster order), as
   the compact list of selected clusters (first slot, where their tokens start in ``order``,
   id);
4. expansion (``ops/decode/kernel.py``, many programs per row): the position (and, with the
   full far field, the cluster) of every selected token, so that
5. split-K flash decoding over the sink, the recent window and the selected tokens reads one
   index per token before its key and value; each selected token also removes its cluster's
   far-field term (``(e^x - e^z) v``), so no second pass over the selected centroids;
6. log-sum-exp merge of the splits and the far field.

With a partial far field (``far_field_share < 1``) pass 1 reads no value centroids; the
selection also writes each cluster's estimated mass (score x tokens left) and the row's
largest, ``_band_hist_kernel`` (many programs per row) counts the masses per bin below it, and
``_band_far_field_kernel`` (one program per chunk of clusters) lists the chunk's clusters in
the best bins up to ``far_count`` clusters (``select_band``) and adds their far field, reading
only their logits, sizes and value centroids, into slots after the exact pass's; on CUDA these
two run on a second stream beside the expansion, which they do not need. Of the selected
clusters only the partly taken one can have tokens left, so the exact pass removes a far-field
term from its tokens alone (its logits written by the far-field pass, ``-inf`` when outside the
far field): no cluster ids per token.

On Hopper each kernel after the first is launched while its predecessor finishes
(programmatic dependent launch, ``Tuning.dependent_launch``) and waits for it on the device.

It computes what :class:`~multipole.MultipoleState`'s reference path computes for
``levels == 1`` (up to the rounding of the scores), reading the tokens of a cluster
through a cluster-contiguous permutation of the clustered positions.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from .index import ClusterIndex, UpdateGraphs, take_rows_
from .ops.kernel_utils import dependent_launch_supported, native_dot
from .ops.lookup.reference import BINS, BINS_PER_NAT

BAND_BLOCK = 64  # clusters per tile of a partial far field's member list
SCORE_CHUNK = 256  # clusters per program of the scoring
FAR_SLICE = 32  # head-dim columns per program of the far-field reduction
EXPAND_BLOCK = 64  # selected slots per tile of the expansion
RANK_CHUNK = 1024  # list entries per step when an expansion program finds its first cluster


@dataclass
class Tuning:
    """Launch shapes of the fused step (results do not depend on them). Defaults: the best of
    ``benchmarks/profile_step.py --variants`` on the H100 (128K, batch 1/4/16, 5% budget, the
    full and a partial far field; ``band_chunk`` untuned). Tile and chunk sizes must be powers
    of two."""

    centroid_programs_per_sm: int = 2  # centroid-pass grid target (rows x splits)
    centroid_block: int = 64  # centroids per tile of the centroid pass
    band_chunk: int = 1024  # clusters per program of a partial far field (one state each)
    exact_programs_per_sm: int = 2  # exact-pass grid target
    exact_min_split: int = 64  # fewest token slots per exact-pass program (rounded up to a tile)
    select_chunk: int = 512  # clusters per program of the selection
    expand_programs_per_sm: int = 8  # expansion grid target
    merge_slice: int = 16  # head-dim columns per merge program
    block_n: int = 64  # token slots per tile of the exact pass
    # Without the full far field (a partial one or none) the centroid pass reads key centroids
    # only and the exact pass no cluster logits per token: more programs and longer tiles pay.
    keys_only_programs_per_sm: int = 4
    keys_only_block: int = 64
    keys_only_block_n: int = 128
    # a partial far field's two kernels on a second stream, beside the expansion (on CUDA)
    band_beside_expansion: bool = True
    # each kernel after the first launched while its predecessor finishes (Hopper or newer)
    dependent_launch: bool = True

    def __post_init__(self) -> None:
        tiles = ("centroid_block", "keys_only_block", "band_chunk", "select_chunk", "merge_slice")
        for name in (*tiles, "block_n", "keys_only_block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Tuning.{name}: expected a power of two >= 16, got {value}")

    @classmethod
    def parse(cls, spec: str) -> Tuning:
        """A tuning from ``default`` or ``FIELD=VALUE+...`` (each field once; a count or True /
        False, as its default), as the profiling scripts' ``--tunings`` give it, e.g.
        ``block_n=128+dependent_launch=False``."""
        if spec == "default":
            return cls()
        defaults = {f.name: f.default for f in fields(cls)}
        values: dict[str, int | bool] = {}
        for item in spec.split("+"):
            name, sep, value = item.partition("=")
            if not sep or name not in defaults or name in values:
                raise ValueError(
                    f"tuning {spec!r}: expected 'default' or FIELD=VALUE+... with each FIELD once, "
                    f"one of {sorted(defaults)}, got {item!r}"
                )
            if isinstance(defaults[name], bool):
                if value not in ("True", "False"):
                    raise ValueError(f"tuning {spec!r}: {name}: expected True or False")
                values[name] = value == "True"
            elif value.isdecimal() and value.isascii():
                values[name] = int(value)
            else:
                raise ValueError(f"tuning {spec!r}: {name}: expected a count (digits)")
        return cls(**values)


TUNING = Tuning()


LAYOUT_ROOM_UPDATES = 16  # online updates a layout has room for before it is built again


@dataclass
class FusedLayout:
    """The cluster index as the kernels read it, with room to grow: refreshed in place after
    each online update (:meth:`refresh`), so that a decode step captured as a CUDA graph stays
    valid across updates, and built anew (:meth:`build`) once the index outgrows it.

    Attributes:
        key_centroids, value_centroids: ``[B, H_kv, C, D]`` in the cache dtype; ``C`` is the
            layout's cluster capacity (clusters past the index's have size 0: never scored).
        sizes: ``[B, H_kv, C]`` int32.
        offsets: ``[B, H_kv, C]`` int32, where cluster c starts in ``order``.
        order: ``[B, H_kv, N]`` int32 positions sorted by cluster (stable; unclustered ones
            after every cluster's), ``N`` the layout's position capacity.
        live: ``[B, H_kv]`` int64 number of clusters of nonzero size (centroids scored).
        clustered_len, budget: ``[B]`` int64 device copies of the state's clustered lengths
            and token budgets (None in a layout made without :meth:`build`).
        max_budget: a bound of ``budget`` for the layout's life (sizes the step's buffers).
    """

    key_centroids: torch.Tensor
    value_centroids: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    live: torch.Tensor
    clustered_len: torch.Tensor | None = None
    budget: torch.Tensor | None = None
    max_budget: int = 0
    lengths: list[int] = field(default_factory=list)  # host values of clustered_len, budget
    budgets: list[int] = field(default_factory=list)
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)
    _makers: dict[str, Callable[[FusedLayout], torch.Tensor]] = field(default_factory=dict)
    graphs: UpdateGraphs = field(default_factory=UpdateGraphs)  # the refresh (CUDA graphs)

    def cached(self, name: str, make: Callable[[FusedLayout], torch.Tensor]) -> torch.Tensor:
        """``make(self)``, computed once per layout and again in place at each :meth:`refresh`
        (e.g. the bytes of centroid data a step reads, which change only when the index
        does)."""
        if name not in self.workspace:
            self.workspace[name] = make(self)
            self._makers[name] = make
        return self.workspace[name]

    def buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False
    ) -> torch.Tensor:
        """A scratch tensor kept across decode steps and across the layouts of one index
        (allocated again only if shapes change; ``zero``: zero-filled when allocated, e.g.
        counters that the kernels reset)."""
        t = self.scratch.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            make = torch.zeros if zero else torch.empty
            t = self.scratch[name] = make(shape, dtype=dtype, device=self.sizes.device)
        return t

    def select_rows(self, rows: list[int], device_rows: torch.Tensor, done: set[int]) -> None:
        """Row ``b`` becomes a copy of row ``rows[b]`` (``device_rows`` on the device), in
        place (the scratch buffers hold nothing between steps)."""
        tensors = (self.key_centroids, self.value_centroids, self.sizes, self.offsets, self.order)
        for t in (*tensors, self.live, self.clustered_len, self.budget, *self.workspace.values()):
            take_rows_(t, device_rows, done)
        self.lengths = [self.lengths[i] for i in rows] if self.lengths else []
        self.budgets = [self.budgets[i] for i in rows] if self.budgets else []

    @classmethod
    def build(
        cls,
        index: ClusterIndex,
        dtype: torch.dtype,
        clustered_len: list[int],
        budget_of: Callable[[int], int],
        room_tokens: int,
    ) -> FusedLayout:
        """The layout of ``index`` with room for ``room_tokens`` more clustered tokens per
        sequence: the clusters, positions and budgets (``budget_of(clustered length)``,
        nondecreasing) they can bring."""
        cfg, level = index.config, index.level0
        b, h, _, d = level.key_centroids.shape
        # an update adds about room * ratio clusters, plus rounding at each block it opens
        blocks = room_tokens // cfg.block_size + 2
        clusters = max(level.count) + math.ceil(room_tokens * cfg.centroid_ratio) + 2 * blocks
        positions = cfg.sink_tokens + max(clustered_len) + room_tokens
        dev, i32 = level.sizes.device, torch.int32
        layout = cls(
            key_centroids=torch.zeros(b, h, clusters, d, dtype=dtype, device=dev),
            value_centroids=torch.zeros(b, h, clusters, d, dtype=dtype, device=dev),
            sizes=torch.zeros(b, h, clusters, dtype=i32, device=dev),
            offsets=torch.zeros(b, h, clusters, dtype=i32, device=dev),
            order=torch.zeros(b, h, positions, dtype=i32, device=dev),
            live=torch.zeros(b, h, dtype=torch.int64, device=dev),
            clustered_len=torch.zeros(b, dtype=torch.int64, device=dev),
            budget=torch.zeros(b, dtype=torch.int64, device=dev),
            max_budget=max(budget_of(n + room_tokens) for n in clustered_len),
            scratch=index.fused_scratch,
        )
        budgets = [budget_of(n) for n in clustered_len]
        fits = layout.refresh(index, clustered_len, budgets, graphed=False)
        assert fits, "a new layout holds its own index"
        return layout

    def refresh(
        self,
        index: ClusterIndex,
        clustered_len: list[int],
        budgets: list[int],
        rows: Sequence[int] | None = None,
        graphed: bool = True,
    ) -> bool:
        """Write ``index`` (and the lengths and budgets) into this layout in place, on the
        device (no sync); False, with nothing written, if they no longer fit: more clusters,
        a longer clustered region or a larger budget than the layout has room for.

        ``rows``: the sequences whose clusters changed (None: all). A ragged batch updates
        its rows at different steps; each update then sorts its own rows' labels only.
        ``graphed``: on CUDA, a refresh of the whole batch (every row, or more than half of
        them) runs as a CUDA graph (some 25 operations, whose launches took the host longer
        than the GPU took to run them), captured at its first run and replayed at the
        layout's later refreshes (its key: the index stores' addresses, shapes and strides
        and the cached counts' names), unless the index's update graphs are off."""
        level = index.level0
        clusters, positions = self.sizes.shape[-1], self.order.shape[-1]
        if (
            max(level.count) > clusters
            or index.config.sink_tokens + max(clustered_len) > positions
            or max(budgets) > self.max_budget
        ):
            return False
        batch = self.sizes.shape[0]
        every_row = rows is None or 2 * len(rows) > batch
        # a few rows are sorted one at a time (views: no index tensor to copy to the device)
        parts = [slice(None)] if every_row else [slice(r, r + 1) for r in sorted(set(rows))]
        host = torch.tensor([clustered_len, budgets], dtype=torch.int64)
        self.lengths, self.budgets = list(clustered_len), list(budgets)
        write = functools.partial(self._write, index, parts)  # write(lengths on the device)
        device = self.sizes.device
        if device.type != "cuda":
            write(host)
            return True
        host = host.pin_memory()  # copied without a host wait
        with torch.cuda.device(device):
            graphed = graphed and every_row and index.update_graphs.enabled
            if not graphed or torch.cuda.is_current_stream_capturing():
                write(host.to(device, non_blocking=True))
                return True
            stores = (index.labels, level.key_centroids, level.value_centroids, level.sizes)
            key = (tuple((t.data_ptr(), t.shape, t.stride()) for t in stores), tuple(self._makers))
            self.graphs.run(host.shape, key, host, write, device)
        return True

    def _write(self, index: ClusterIndex, parts: list[slice], lengths: torch.Tensor) -> None:
        """:meth:`refresh`'s device work: ``parts`` of the batch's rows sorted and copied,
        then the offsets, live counts, cached counts and ``lengths`` ([2, B]: clustered
        lengths, budgets) of every row."""
        level = index.level0
        clusters, positions = self.sizes.shape[-1], self.order.shape[-1]
        # the narrowest sort key that holds every cluster id and "outside" (after them): a
        # radix sort's passes scale with the key's bytes
        key_dtype = torch.int16 if clusters < torch.iinfo(torch.int16).max else torch.int32
        # clusters past the index's count have size 0 in its stores too
        width = min(clusters, level.sizes.shape[-1])
        for part in parts:
            labels = index.labels[part, :, :positions]
            keys = labels.to(key_dtype).masked_fill(labels < 0, torch.iinfo(key_dtype).max)
            self.order[part, :, : labels.shape[-1]] = torch.sort(keys, dim=-1, stable=True).indices
            self.key_centroids[part, :, :width] = level.key_centroids[part, :, :width]
            self.value_centroids[part, :, :width] = level.value_centroids[part, :, :width]
            self.sizes[part, :, :width] = level.sizes[part, :, :width]
        torch.cumsum(self.sizes, -1, out=self.offsets)
        self.offsets -= self.sizes
        torch.sum(self.sizes > 0, -1, out=self.live)
        self.clustered_len.copy_(lengths[0])
        self.budget.copy_(lengths[1])
        for name, make in self._makers.items():
            self.workspace[name].copy_(make(self))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second stream of a step on ``device`` (None off CUDA: the interpreter runs launches
    in order). One per device, shared: steps on one device are expected from one thread at a
    time, as CUDA graph capture requires anyway."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _target_programs(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 2 * per_sm
    return per_sm * _num_sms(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def _per_split(total: int, rows: int, block: int, programs: int) -> tuple[int, int]:
    """Items per split (a multiple of ``block``) and splits, so rows * splits ~ programs."""
    splits_wanted = max(1, programs // max(1, rows))
    per = max(block, -(-total // splits_wanted))
    per = -(-per // block) * block
    return per, max(1, -(-total // per))


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def fused_decode(
    q: torch.Tensor,
    lookup_q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: FusedLayout,
    seq_lens: torch.Tensor,
    clustered_len: torch.Tensor,
    budget: torch.Tensor,
    *,
    max_budget: int,
    sink_tokens: int,
    max_recent: int,
    scale: float,
    replacement: bool,
    far_count: torch.Tensor | None = None,
    tuning: Tuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Multipole decode step on the GPU (or the Triton interpreter).

    Args:
        q, lookup_q: ``[B, H_kv, G, D]`` contiguous, in the cache dtype.
        keys, values: the cache ``[B, H_kv, capacity, D]`` (contiguous).
        layout: :class:`FusedLayout` of the current index.
        seq_lens, clustered_len, budget: ``[B]`` integer device tensors (budget at most the
            clustered length).
        max_budget: an upper bound of ``budget`` (sizes the buffers; no sync).
        sink_tokens: sink length; max_recent: bound of the recent window (``2 * interval``).
        scale: softmax scale; replacement: add the far field.
        far_count: ``[B, H_kv]`` int32 (with ``replacement``): a partial far field over this
            many of the clusters with tokens left, those of largest estimated mass
            (``far_field_share``); None: over every cluster.
        tuning: launch shapes (default :data:`TUNING`).
    Returns:
        ``out [B, H_kv, G, D]`` (cache dtype), ``lse [B, H_kv, G]`` float32, ``count [B, H_kv]``
        tokens attended exactly and ``num_selected [B, H_kv]`` clusters selected.
    """
    from .ops.decode.kernel import _expand_kernel, _merge_kernel, _sparse_decode_kernel
    from .ops.lookup.kernel import (
        _band_far_field_kernel,
        _band_hist_kernel,
        _centroid_pass_kernel,
        _score_kernel,
        _select_kernel,
        _select_totals_kernel,
    )

    for name, t in (("keys", keys), ("values", values), ("q", q), ("lookup_q", lookup_q)):
        if not t.is_contiguous():
            raise ValueError(f"fused_decode: {name} must be contiguous (row-major {list(t.shape)})")
    tune = TUNING if tuning is None else tuning
    b, h, g, d = q.shape
    if far_count is not None and (
        far_count.dtype != torch.int32
        or far_count.shape != (b, h)
        or not far_count.is_contiguous()
        or far_count.device != q.device
    ):
        raise ValueError(
            f"fused_decode: far_count must be a contiguous int32 [{b}, {h}] tensor on "
            f"{q.device}, got {far_count.dtype} {list(far_count.shape)} on {far_count.device}"
        )
    # every launch and both streams on the tensors' device, whichever device is current
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        dev = q.device
        rows = b * h
        num_clusters = layout.sizes.shape[-1]
        kv_capacity = keys.shape[2]
        block_g, block_d = _pow2(g), _pow2(d)
        native = native_dot(q.dtype)
        f32, i32 = torch.float32, torch.int32
        buf = layout.buffer
        partial = replacement and far_count is not None
        full_far = replacement and not partial  # the far field of every cluster, from pass 1
        # programmatic dependent launch for a kernel whose one predecessor is a kernel of this
        # step in its stream (each waits for it before reading): not the second stream's first
        # kernel, nor the first after the join
        chained = (
            dict(PDL=True, launch_pdl=True)
            if tune.dependent_launch and dependent_launch_supported(dev)
            else {}
        )

        # 1. Centroid pass: logits z and the far-field state of all clusters, split over programs.
        if full_far:
            c_block, c_per_sm = tune.centroid_block, tune.centroid_programs_per_sm
        else:
            c_block, c_per_sm = tune.keys_only_block, tune.keys_only_programs_per_sm
        per_c, splits_c = _per_split(num_clusters, rows, c_block, _target_programs(dev, c_per_sm))
        z = buf("z", (b, h, g, num_clusters), f32)
        m_c = buf("m_c", (rows, splits_c, g), f32)
        l_c = buf("l_c", (rows, splits_c, g), f32)
        acc_c = buf("acc_c", (rows, splits_c, g, d), f32) if full_far else m_c
        _centroid_pass_kernel[(rows, splits_c)](
            lookup_q,
            layout.key_centroids,
            layout.value_centroids,
            layout.sizes,
            z,
            m_c,
            l_c,
            acc_c,
            scale,
            num_clusters,
            g,
            per_c,
            splits_c,
            HEAD_DIM=d,
            BLOCK_G=block_g,
            BLOCK_C=c_block,
            BLOCK_D=block_d,
            WITH_FAR=full_far,
            NATIVE_DOT=native,
            num_warps=4,
        )

        # 2. Scores and the far field reduced over the splits; 3. selection.
        list_capacity = max(1, min(num_clusters, max_budget))
        block_n = tune.block_n if full_far else tune.keys_only_block_n
        exact_capacity = -(-(sink_tokens + max_recent) // block_n) * block_n
        token_capacity = exact_capacity + max_budget
        score = buf("score", (rows, num_clusters), f32)
        sel_first = buf("sel_first", (rows, list_capacity), i32)
        sel_base = buf("sel_base", (rows, list_capacity), i32)
        sel_cluster = buf("sel_cluster", (rows, list_capacity), i32)
        count = buf("count", (rows,), i32)
        num_selected = buf("num_selected", (rows,), i32)
        far_m = buf("far_m", (rows, g), f32)
        far_l = buf("far_l", (rows, g), f32)
        far_acc = buf("far_acc", (rows, g, d), f32)
        hist = buf("hist", (rows, BINS), i32, zero=True)  # the selection clears it
        score_bins = (math.log(g), BINS_PER_NAT)  # bins below the largest score, log(group)
        rows_g = _pow2(g, 1)
        split_pad_c = _pow2(splits_c, 2)
        _score_kernel[(rows, -(-num_clusters // SCORE_CHUNK))](
            z,
            m_c,
            l_c,
            acc_c,
            score,
            far_m,
            far_l,
            far_acc,
            hist,
            layout.sizes,
            num_clusters,
            g,
            splits_c,
            *score_bins,
            HEAD_DIM=d,
            BINS=BINS,
            ROWS=rows_g,
            SPLIT_PAD=split_pad_c,
            CHUNK=SCORE_CHUNK,
            FAR_SLICE=min(FAR_SLICE, block_d),
            FAR_SPLITS=max(1, min(split_pad_c, 4096 // (rows_g * min(FAR_SLICE, block_d)))),
            WITH_FAR=full_far,
            num_warps=4,
            **chained,
        )
        mass = buf("mass", (rows, num_clusters), f32) if partial else score
        mass_top = buf("mass_top", (rows,), f32) if partial else far_m
        band_hist = buf("band_hist", (rows, BINS), i32) if partial else hist  # selection clears
        boundary = buf("boundary", (rows, 3), i32) if partial else count
        boundary_z = buf("boundary_z", (rows, g), f32) if partial else far_m
        select_chunk = min(tune.select_chunk, _pow2(num_clusters))
        select_chunks = -(-num_clusters // select_chunk)
        row_bin = buf("row_bin", (rows,), i32)
        totals = buf("select_totals", (rows, select_chunks, 4), i32)
        _select_totals_kernel[(rows, select_chunks)](
            score,
            hist,
            layout.sizes,
            budget,
            row_bin,
            totals,
            mass_top,
            band_hist,
            boundary,
            h,
            num_clusters,
            *score_bins,
            BINS=BINS,
            CHUNK=select_chunk,
            PARTIAL_FAR=partial,
            num_warps=4,
            **chained,
        )
        _select_kernel[(rows, select_chunks)](
            score,
            hist,
            layout.sizes,
            layout.offsets,
            budget,
            seq_lens,
            clustered_len,
            row_bin,
            totals,
            sel_first,
            sel_base,
            sel_cluster,
            count,
            num_selected,
            mass,
            mass_top,
            boundary,
            h,
            num_clusters,
            list_capacity,
            sink_tokens,
            *score_bins,
            BINS=BINS,
            CHUNK=select_chunk,
            CHUNKS_PAD=_pow2(select_chunks, 2),
            PARTIAL_FAR=partial,
            num_warps=4,
            **chained,
        )

        # The exact pass's splits and partial states (also the slots of a partial far field's
        # states), set before the fork below.
        per_n, splits_n = _per_split(
            token_capacity,
            rows,
            -(-max(block_n, tune.exact_min_split) // block_n) * block_n,
            _target_programs(dev, tune.exact_programs_per_sm),
        )
        # a partial far field: its clusters' state fills slots after the exact splits
        band_chunk = min(tune.band_chunk, _pow2(num_clusters))
        splits_f = -(-num_clusters // band_chunk) if partial else 0
        slots = splits_n + splits_f
        m_e = buf("m_e", (rows, slots, g), f32)
        l_e = buf("l_e", (rows, slots, g), f32)
        acc_e = buf("acc_e", (rows, slots, g, d), f32)
        # 4. Positions (and clusters) of the selected tokens, many programs per row; with a partial
        # far field, its histogram and far field (which need the selection, not the positions) run
        # at the same time on a second stream, joined before the exact pass (a fork and a join in
        # a captured CUDA graph).
        side = _side_stream(dev) if partial and tune.band_beside_expansion else None
        after_join = {} if side is not None else chained  # a kernel after a cross-stream wait
        if partial:
            band_members = buf("band_members", (rows, num_clusters), i32)
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # (None: the current stream)
                _band_hist_kernel[(rows, -(-num_clusters // SCORE_CHUNK))](
                    mass,
                    mass_top,
                    band_hist,
                    num_clusters,
                    BINS_PER_NAT,
                    BINS=BINS,
                    CHUNK=SCORE_CHUNK,
                    num_warps=4,
                    **after_join,
                )
                _band_far_field_kernel[(rows, splits_f)](
                    z,
                    layout.value_centroids,
                    layout.sizes,
                    mass,
                    mass_top,
                    band_hist,
                    far_count,
                    boundary,
                    boundary_z,
                    band_members,
                    m_e,
                    l_e,
                    acc_e,
                    num_clusters,
                    g,
                    splits_n,
                    slots,
                    BINS_PER_NAT,
                    HEAD_DIM=d,
                    BINS=BINS,
                    CHUNK=band_chunk,
                    BLOCK_G=block_g,
                    BLOCK_M=BAND_BLOCK,
                    BLOCK_D=block_d,
                    NATIVE_DOT=native,
                    num_warps=4,
                    **chained,
                )
        slot_capacity = max(1, max_budget)
        pos = buf("pos", (rows, slot_capacity), i32)
        cluster = buf("cluster", (rows, slot_capacity), i32) if full_far else pos
        per_x, splits_x = _per_split(
            slot_capacity, rows, EXPAND_BLOCK, _target_programs(dev, tune.expand_programs_per_sm)
        )
        _expand_kernel[(rows, splits_x)](
            sel_first,
            sel_base,
            sel_cluster,
            layout.order,
            count,
            num_selected,
            seq_lens,
            clustered_len,
            pos,
            cluster,
            h,
            list_capacity,
            layout.order.shape[-1],
            slot_capacity,
            sink_tokens,
            per_x,
            BLOCK=EXPAND_BLOCK,
            WINDOW=2 * EXPAND_BLOCK,
            RANK_CHUNK=RANK_CHUNK,
            WITH_FAR=full_far,
            num_warps=4,
            **chained,
        )

        if side is not None:
            torch.cuda.current_stream(dev).wait_stream(side)

        # 5. Exact pass over sink, recent window and selected tokens (minus their far field);
        # 6. merge.
        out = torch.empty(b, h, g, d, device=dev, dtype=q.dtype)
        lse = torch.empty(b, h, g, device=dev, dtype=f32)
        split_pad_n = _pow2(slots, 2)
        _sparse_decode_kernel[(rows, splits_n)](
            q,
            keys,
            values,
            pos,
            cluster,
            z,
            boundary,
            boundary_z,
            count,
            seq_lens,
            clustered_len,
            m_e,
            l_e,
            acc_e,
            scale,
            h,
            g,
            num_clusters,
            slot_capacity,
            kv_capacity,
            sink_tokens,
            exact_capacity,
            per_n,
            slots,
            HEAD_DIM=d,
            BLOCK_G=block_g,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            WITH_FAR=replacement,
            BOUNDARY_ONLY=partial,
            NATIVE_DOT=native,
            num_warps=4,
            **after_join,
        )
        merge_d = min(tune.merge_slice, block_d)
        _merge_kernel[(rows, block_d // merge_d)](
            m_e,
            l_e,
            acc_e,
            far_m,
            far_l,
            far_acc,
            out,
            lse,
            g,
            slots,
            HEAD_DIM=d,
            BLOCK_G=rows_g,
            BLOCK_D=merge_d,
            SPLIT_PAD=split_pad_n,
            SPLIT_CHUNK=max(1, min(split_pad_n, 4096 // (rows_g * merge_d))),
            WITH_FAR=full_far,
            num_warps=4,
            **chained,
        )
        return out, lse, count.view(b, h), num_selected.view(b, h)
