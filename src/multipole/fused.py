"""The fused decode step: five Triton launches, no host synchronisation, fixed shapes.

1. centroid pass (``ops/lookup/kernel.py``): logits of the group against every centroid and
   the far-field softmax state over all clusters, in one read of the centroids;
2. scores: each cluster's estimated attention mass (the paper's eq. 1, summed over the group);
3. selection: budget threshold by bisection, compacted token positions (sink, recent window,
   tokens of selected clusters), the selected clusters' part of the far field (to subtract);
4. split-K flash decoding over those positions (``ops/decode/kernel.py``);
5. log-sum-exp merge of the splits, the far field and its correction.

It computes what :class:`~multipole.MultipoleState`'s reference path computes for
``levels == 1`` (cluster ties at the budget boundary aside), reading the tokens of a cluster
through a cluster-contiguous permutation of the clustered positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .index import ClusterIndex
from .ops.kernel_utils import native_dot

BLOCK_C = 64  # centroids per tile of the centroid pass
BLOCK_N = 64  # tokens per tile of the exact pass
CHUNK = 1024  # clusters / slots per step of the selection
SCORE_CHUNK = 256  # clusters per program of the scoring
SEL_CHUNK = 64  # selected clusters per step of the far-field correction
TOKENS_PER_SPLIT = 256  # granularity (and minimum) of the exact pass's split-K
BISECT_STEPS = 32  # threshold resolution: (max - min score) / 2**32
SELECT_WARPS = 8


@dataclass
class FusedLayout:
    """The cluster index as the kernels read it (rebuilt after prefill and each update).

    Attributes:
        key_centroids, value_centroids: ``[B, H_kv, C, D]`` in the cache dtype.
        sizes: ``[B, H_kv, C]`` int32.
        offsets: ``[B, H_kv, C]`` int32, where cluster c starts in ``order``.
        order: ``[B, H_kv, N]`` int32 clustered positions sorted by cluster (stable).
        live: ``[B, H_kv]`` int64 number of clusters of nonzero size (centroids scored).
    """

    key_centroids: torch.Tensor
    value_centroids: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    live: torch.Tensor
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)

    def metadata_bytes(self, per_centroid: int) -> torch.Tensor:
        """``[B, H_kv]`` bytes of centroid data a step reads (computed once per layout)."""
        name = f"metadata_bytes_{per_centroid}"
        if name not in self.workspace:
            self.workspace[name] = self.live * per_centroid
        return self.workspace[name]

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor kept across decode steps (allocated again only if shapes change)."""
        t = self.workspace.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = self.workspace[name] = torch.empty(shape, dtype=dtype, device=self.sizes.device)
        return t

    @classmethod
    def build(cls, index: ClusterIndex, num_tokens: int, dtype: torch.dtype) -> FusedLayout:
        level = index.level0
        labels = index.labels[:, :, :num_tokens]
        outside = torch.iinfo(labels.dtype).max
        order = torch.sort(labels.masked_fill(labels < 0, outside), dim=-1, stable=True).indices
        sizes = level.sizes.to(torch.int32)
        return cls(
            key_centroids=level.key_centroids.to(dtype).contiguous(),
            value_centroids=level.value_centroids.to(dtype).contiguous(),
            sizes=sizes.contiguous(),
            offsets=(sizes.cumsum(-1, dtype=torch.int32) - sizes).contiguous(),
            order=order.to(torch.int32).contiguous(),
            live=(sizes > 0).sum(-1),
        )


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _per_split(total: int, rows: int, block: int, device: torch.device) -> tuple[int, int]:
    """Items per split (a multiple of ``block``) and splits, so rows * splits fills the GPU."""
    splits_wanted = max(1, _target_programs(device) // max(1, rows))
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
    Returns:
        ``out [B, H_kv, G, D]`` (cache dtype), ``lse [B, H_kv, G]`` float32, ``count [B, H_kv]``
        tokens attended exactly and ``num_selected [B, H_kv]`` clusters selected.
    """
    from .ops.decode.kernel import _merge_kernel, _sparse_decode_kernel
    from .ops.lookup.kernel import _centroid_pass_kernel, _score_kernel, _select_kernel

    for name, t in (("keys", keys), ("values", values), ("q", q), ("lookup_q", lookup_q)):
        if not t.is_contiguous():
            raise ValueError(f"fused_decode: {name} must be contiguous (row-major {list(t.shape)})")
    b, h, g, d = q.shape
    dev = q.device
    rows = b * h
    num_clusters = layout.sizes.shape[-1]
    kv_capacity = keys.shape[2]
    block_g, block_d = _pow2(g), _pow2(d)
    native = native_dot(q.dtype)
    f32, i32 = torch.float32, torch.int32
    buf = layout.buffer

    per_c, splits_c = _per_split(num_clusters, rows, BLOCK_C, dev)
    z = buf("z", (b, h, g, num_clusters), f32)
    m_c = buf("m_c", (rows, splits_c, g), f32)
    l_c = buf("l_c", (rows, splits_c, g), f32)
    acc_c = buf("acc_c", (rows, splits_c, g, d), f32) if replacement else m_c
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
        BLOCK_C=BLOCK_C,
        BLOCK_D=block_d,
        WITH_FAR=replacement,
        NATIVE_DOT=native,
        num_warps=4,
    )

    list_capacity = -(-max(max_budget, 1) // CHUNK) * CHUNK + CHUNK
    exact_capacity = sink_tokens + max_recent
    token_capacity = max_budget + exact_capacity
    scratch_f = buf("score", (rows, num_clusters), f32)
    mark = buf("mark", (rows, list_capacity), i32)
    sel_base = buf("sel_base", (rows, list_capacity), i32)
    sel_cluster = buf("sel_cluster", (rows, list_capacity), i32)
    tokens = buf("tokens", (rows, token_capacity), i32)
    count = buf("count", (rows,), i32)
    num_selected = buf("num_selected", (rows,), i32)
    far_m = buf("far_m", (rows, g), f32)
    far_l = buf("far_l", (rows, g), f32)
    far_acc = buf("far_acc", (rows, g, d), f32)
    _score_kernel[(rows, -(-num_clusters // SCORE_CHUNK))](
        z,
        m_c,
        l_c,
        scratch_f,
        num_clusters,
        g,
        splits_c,
        ROWS=_pow2(g, 1),
        SPLIT_PAD=_pow2(splits_c, 2),
        CHUNK=SCORE_CHUNK,
        num_warps=4,
    )
    _select_kernel[(rows,)](
        z,
        layout.sizes,
        layout.offsets,
        layout.order,
        layout.value_centroids,
        m_c,
        l_c,
        seq_lens,
        clustered_len,
        budget,
        scratch_f,
        mark,
        sel_base,
        sel_cluster,
        tokens,
        count,
        num_selected,
        far_m,
        far_l,
        far_acc,
        h,
        num_clusters,
        g,
        splits_c,
        token_capacity,
        layout.order.shape[-1],
        list_capacity,
        sink_tokens,
        HEAD_DIM=d,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        SPLIT_PAD=_pow2(splits_c, 2),
        CLUSTER_PAD=_pow2(num_clusters),
        CHUNK=CHUNK,
        SEL_CHUNK=SEL_CHUNK,
        EXACT_PAD=_pow2(exact_capacity),
        WITH_FAR=replacement,
        NATIVE_DOT=native,
        BISECT_STEPS=BISECT_STEPS,
        num_warps=SELECT_WARPS,
    )

    per_n, splits_n = _per_split(token_capacity, rows, TOKENS_PER_SPLIT, dev)
    m_e = buf("m_e", (rows, splits_n, g), f32)
    l_e = buf("l_e", (rows, splits_n, g), f32)
    acc_e = buf("acc_e", (rows, splits_n, g, d), f32)
    _sparse_decode_kernel[(rows, splits_n)](
        q,
        keys,
        values,
        tokens,
        count,
        m_e,
        l_e,
        acc_e,
        scale,
        g,
        token_capacity,
        kv_capacity,
        per_n,
        splits_n,
        HEAD_DIM=d,
        BLOCK_G=block_g,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        NATIVE_DOT=native,
        num_warps=4,
    )

    out = torch.empty(b, h, g, d, device=dev, dtype=q.dtype)
    lse = torch.empty(b, h, g, device=dev, dtype=f32)
    merge_d = min(32, block_d)
    _merge_kernel[(rows, block_d // merge_d)](
        m_e,
        l_e,
        acc_e,
        m_c,
        acc_c,
        far_m,
        far_l,
        far_acc,
        out,
        lse,
        g,
        splits_n,
        splits_c,
        HEAD_DIM=d,
        BLOCK_G=_pow2(g, 1),
        BLOCK_D=merge_d,
        SPLIT_CHUNK=max(1, 64 // _pow2(g, 1)),
        WITH_FAR=replacement,
        num_warps=4,
    )
    return out, lse, count.view(b, h), num_selected.view(b, h)
