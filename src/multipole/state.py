"""Decode states: a KV cache that answers one query per sequence, reading part of the cache.

:class:`DecodeState` holds the keys and values of a ragged batch and the split of every
sequence into sink, clustered (middle) and recent regions; subclasses decide what each query
reads. :class:`MultipoleState` is Multipole Attention; ``multipole.baselines`` holds the others,
behind the same ``prefill`` / ``attend`` / ``append`` / ``stats`` interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from . import checks
from .config import MultipoleConfig
from .fused import LAYOUT_ROOM_UPDATES, FusedLayout, fused_decode
from .index import ClusterIndex, grow, take_rows_
from .ops.decode import attend_tokens, far_field, merge_states
from .ops.kernel_utils import kernels_available, triton_installed
from .ops.lookup import (
    cluster_logits,
    log_importance,
    select_band,
    select_by_budget,
    take_by_budget,
)


@dataclass(frozen=True)
class AttendStats:
    """What the last ``attend`` read, for comparisons at an equal number of bytes.

    Attributes:
        tokens_exact: tokens attended exactly, mean over (sequence, KV head).
        clusters_selected: clusters whose tokens were attended exactly, mean over (sequence,
            KV head).
        centroids_scored: centroids (all levels) or page summaries read, mean per KV head.
        bytes_read: bytes of keys, values, centroids and metadata read, whole batch.
        dense_bytes: bytes of keys and values a dense step reads, whole batch, at the
            current lengths (after an ``append``: one step later than the rest).
    """

    tokens_exact: float
    clusters_selected: float
    centroids_scored: float
    bytes_read: int
    dense_bytes: int

    @property
    def read_fraction(self) -> float:
        """``bytes_read / dense_bytes``."""
        return self.bytes_read / max(1, self.dense_bytes)


@dataclass
class Reads:
    """Per (sequence, KV head) counts of one attend: ``[B, H_kv]`` tensors (no host sync), and
    the exactly attended tokens ``[B, 1 or H_kv, N]`` where the implementation forms them (the
    PyTorch paths; the fused kernels never materialise a mask)."""

    tokens_exact: torch.Tensor
    clusters_selected: torch.Tensor
    centroids_scored: torch.Tensor
    metadata_bytes: torch.Tensor
    token_mask: torch.Tensor | None = None


def initial_clustered_len(seq_len: int, config: MultipoleConfig) -> int:
    """Length of the clustered region after prefill: the largest multiple of ``interval`` that
    leaves ``interval`` to ``2 * interval - 1`` recent tokens after the sink (0 if too short)."""
    free = seq_len - config.sink_tokens
    return config.interval * (free // config.interval - 1) if free >= 2 * config.interval else 0


class DecodeState:
    """Keys and values of a ragged batch, with the regions of Multipole Attention.

    Per sequence: tokens ``[0, sink_tokens)`` (sink) and ``[sink_tokens + clustered_len, n)``
    (recent window) are always attended exactly; the middle ``clustered_len`` tokens are where
    methods differ. The recent window holds ``interval`` to ``2 * interval - 1`` tokens once
    the sequence is long enough: when it reaches ``2 * interval``, its oldest ``interval`` tokens
    join the middle region (for Multipole Attention, that is the online cluster update).

    Use :meth:`prefill` to build one; subclasses implement :meth:`_attend`.
    """

    config: MultipoleConfig

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        config: MultipoleConfig,
        cluster_keys: torch.Tensor | None,
        seq_lens: list[int],
        first_kv_head: int = 0,
    ) -> None:
        self.config = config
        self.first_kv_head = first_kv_head
        self._keys = keys
        self._values = values
        self._cluster_keys = cluster_keys
        self.seq_lens = seq_lens
        self.clustered_len = [initial_clustered_len(n, config) for n in seq_lens]
        self._reads: Reads | None = None
        # lengths kept on the device too, so that a decode step copies nothing from the host
        self._seq_lens_device = torch.tensor(seq_lens, dtype=torch.int64, device=keys.device)
        self._row_ids = torch.arange(len(seq_lens), device=keys.device).unsqueeze(1)  # [B, 1]
        self._device_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def prefill(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        config: MultipoleConfig | None = None,
        *,
        cluster_keys: torch.Tensor | None = None,
        lengths: torch.Tensor | list[int] | None = None,
        first_kv_head: int = 0,
    ):
        """Build the state from the prompt's keys and values.

        Args:
            keys, values: ``[B, H_kv, N, D]`` (float16, bfloat16, float32 or float64).
            config: settings; default ``MultipoleConfig()``.
            cluster_keys: ``[B, H_kv, N, D]`` keys used only for clustering (e.g. keys before
                RoPE); default: ``keys``.
            lengths: ``[B]`` valid lengths in ``[1, N]`` (right padding); default: all ``N``.
            first_kv_head: global index of the first KV head of ``keys``: with tensor
                parallelism each rank holds a slice of the heads, and k-means seeds are drawn
                per global head, so results do not depend on the number of ranks.
        """
        config = MultipoleConfig() if config is None else config
        if not isinstance(config, MultipoleConfig):
            raise TypeError(f"config: expected a MultipoleConfig, got {type(config).__name__}")
        dims = ("B", "num_kv_heads", "N", "head_dim")
        checks.check_tensor("keys", keys, dims)
        b, h, n, d = keys.shape
        if min(b, h, n, d) < 1:
            raise ValueError(
                f"keys: expected non-empty [B, num_kv_heads, N, head_dim], got {list(keys.shape)}"
            )
        checks.check_tensor("values", values, dims)
        checks.check_shape("values", values, dims, keys.shape)
        checks.check_like("values", values, "keys", keys)
        if cluster_keys is not None:
            checks.check_tensor("cluster_keys", cluster_keys, dims)
            checks.check_shape("cluster_keys", cluster_keys, dims, keys.shape)
            checks.check_like("cluster_keys", cluster_keys, "keys", keys)
        seq_lens = checks.check_lengths("lengths", lengths, b, n, keys.device)
        if checks.should_validate(config.validate, keys):
            for name, t in (("keys", keys), ("values", values), ("cluster_keys", cluster_keys)):
                if t is not None:
                    checks.check_finite(name, t, seq_lens)
        if (
            isinstance(first_kv_head, bool)
            or not isinstance(first_kv_head, int)
            or first_kv_head < 0
        ):
            raise ValueError(f"first_kv_head: expected an int >= 0, got {first_kv_head!r}")
        seq_lens = seq_lens.tolist()
        keys, values, cluster_keys = (_clone(t, seq_lens) for t in (keys, values, cluster_keys))
        return cls(keys, values, config, cluster_keys, seq_lens, first_kv_head)

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head this method reads whatever its token budget, right after prefill
        of ``seq_len`` tokens (used to compare methods at equal bytes). The base: the sink and
        the recent window, which every method reads exactly."""
        exact_tokens = seq_len - initial_clustered_len(seq_len, config)
        return float(exact_tokens * 2 * head_dim * elem_size)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self._keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self._keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self._keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._keys.dtype

    @property
    def device(self) -> torch.device:
        return self._keys.device

    @property
    def keys(self) -> torch.Tensor:
        """``[B, H_kv, max(seq_lens), D]`` cached keys (past a sequence's length: padding)."""
        return self._keys[:, :, : max(self.seq_lens)]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : max(self.seq_lens)]

    @property
    def cluster_keys(self) -> torch.Tensor:
        """Keys used for clustering (the attention keys unless others were given)."""
        store = self._keys if self._cluster_keys is None else self._cluster_keys
        return store[:, :, : max(self.seq_lens)]

    # ------------------------------------------------------------------ decode
    def attend(
        self, q: torch.Tensor, *, lookup_q: torch.Tensor | None = None, scale: float | None = None
    ) -> torch.Tensor:
        """Attention output of one decode query per sequence.

        Args:
            q: ``[B, num_q_heads, D]``, ``num_q_heads`` a multiple of ``num_kv_heads``.
            lookup_q: ``[B, num_q_heads, D]`` query used only to score centroids (e.g. rotated
                at ``config.lookup_position``); default ``q``.
            scale: softmax scale; default ``1 / sqrt(D)``.
        Returns:
            ``[B, num_q_heads, D]`` in the dtype of ``q``.
        """
        qg = self._check_query("q", q)
        if lookup_q is not None:
            checks.check_tensor("lookup_q", lookup_q, ("B", "num_q_heads", "head_dim"))
            checks.check_shape("lookup_q", lookup_q, ("B", "num_q_heads", "head_dim"), q.shape)
        lg = qg if lookup_q is None else self._check_query("lookup_q", lookup_q)
        scale = _check_scale(scale, self.head_dim)
        out, _, reads = self._attend(qg, lg, scale)
        self._reads = reads
        return out.reshape(q.shape).to(q.dtype)

    def _attend(
        self, q: torch.Tensor, lookup_q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, Reads]:
        """Return ``(out [B, H_kv, G, D], lse [B, H_kv, G], reads)`` for grouped queries."""
        raise NotImplementedError  # abstract: every state class defines what it reads

    def _check_query(self, name: str, q: torch.Tensor) -> torch.Tensor:
        dims = ("B", "num_q_heads", "head_dim")
        checks.check_tensor(name, q, dims)
        checks.check_shape(name, q, dims, (self.batch_size, None, self.head_dim))
        checks.check_like(name, q, "keys", self._keys)
        group = checks.check_heads(name, q.shape[1], self.num_kv_heads)
        if checks.should_validate(self.config.validate, q):
            checks.check_finite(name, q)
        return q.reshape(self.batch_size, self.num_kv_heads, group, self.head_dim)

    # ------------------------------------------------------------------ append
    def append(
        self, keys: torch.Tensor, values: torch.Tensor, *, cluster_keys: torch.Tensor | None = None
    ) -> None:
        """Append ``T`` new tokens to every sequence and run the online updates that fall due.

        Args:
            keys, values: ``[B, H_kv, T, D]``, same dtype and device as the cache.
            cluster_keys: ``[B, H_kv, T, D]``; required if and only if prefill had them.
        """
        dims = ("B", "num_kv_heads", "T", "head_dim")
        expected = (self.batch_size, self.num_kv_heads, None, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            checks.check_tensor(name, t, dims)
            checks.check_shape(name, t, dims, expected)
            checks.check_like(name, t, "the cache", self._keys)
        checks.check_shape("values", values, dims, keys.shape)
        if (cluster_keys is None) != (self._cluster_keys is None):
            state = "had" if self._cluster_keys is not None else "had no"
            raise ValueError(
                f"cluster_keys: prefill {state} cluster_keys, so append must "
                f"{'pass' if self._cluster_keys is not None else 'not pass'} them"
            )
        if cluster_keys is not None:
            checks.check_tensor("cluster_keys", cluster_keys, dims)
            checks.check_shape("cluster_keys", cluster_keys, dims, keys.shape)
            checks.check_like("cluster_keys", cluster_keys, "the cache", self._keys)
        t = keys.shape[2]
        if t < 1:
            raise ValueError("keys: expected at least one new token (T >= 1), got T = 0")
        if checks.should_validate(self.config.validate, keys):
            for name, x in (("keys", keys), ("values", values), ("cluster_keys", cluster_keys)):
                if x is not None:
                    checks.check_finite(name, x)

        self._reserve_tokens(max(self.seq_lens) + t)
        positions = self._seq_lens_device.unsqueeze(1)  # [B, T]: each row from its length
        if t > 1:  # (a decode step launches no kernel for the positions)
            positions = positions + torch.arange(t, device=self.device)
        for store, new in (
            (self._keys, keys),
            (self._values, values),
            (self._cluster_keys, cluster_keys),
        ):
            if store is not None and new is not None:
                store[self._row_ids, :, positions] = new.transpose(1, 2)
        self.seq_lens = [n + t for n in self.seq_lens]
        self._seq_lens_device += t
        self._advance_due()

    def select_sequences(self, index: torch.Tensor | Sequence[int]) -> None:
        """Make row ``i`` of the batch a copy of row ``index[i]`` (beam search reorders its
        beams this way: a row can be copied several times or dropped).

        The batch size stays; tensors are rewritten in place, so decode steps captured as CUDA
        graphs (:class:`multipole.graphs.GraphedStep`) stay valid. Reads ``index`` on the host
        (one sync when it is a device tensor).
        """
        rows = checks.check_row_index("index", index, self.batch_size)
        device_rows = (  # a device index is used where it is, not copied back from the host
            index.to(self.device, torch.int64)
            if isinstance(index, torch.Tensor)
            else torch.tensor(rows, dtype=torch.int64, device=self.device)
        )
        done: set[int] = set()
        for t in (self._keys, self._values, self._cluster_keys, self._seq_lens_device):
            take_rows_(t, device_rows, done)
        self.seq_lens = [self.seq_lens[i] for i in rows]
        self.clustered_len = [self.clustered_len[i] for i in rows]
        if self._reads is not None:  # the last attend's counts follow their rows (stats())
            counts = {f.name: getattr(self._reads, f.name) for f in fields(Reads)}
            rows_of = {
                k: t if t is None else t.index_select(0, device_rows) for k, t in counts.items()
            }
            self._reads = Reads(**rows_of)
        self._select_rows(rows, device_rows, done)

    def drop_newest(self, count: int) -> None:
        """Forget the newest ``count`` tokens of every sequence (speculative decoding drops its
        rejected draft tokens this way); the next :meth:`append` writes over them.

        Only tokens of the recent window can go, never clustered ones, and at least one token
        stays: after an online update the window still holds ``interval`` tokens, so drafts
        shorter than ``interval`` can always be dropped. Host only, no sync.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count: expected an int >= 0, got {count!r}")
        if count == 0:
            return
        sink = self.config.sink_tokens
        floors = [sink + c if c > 0 else 1 for c in self.clustered_len]
        most = min(n - f for n, f in zip(self.seq_lens, floors, strict=True))
        if count > most:
            raise ValueError(
                f"count: at most {most} tokens can be dropped (those of the recent window, "
                f"which no online update has clustered yet), got {count}"
            )
        self.seq_lens = [n - count for n in self.seq_lens]
        self._seq_lens_device -= count  # stats() still describe the last attend

    def _select_rows(self, rows: list[int], device_rows: torch.Tensor, done: set[int]) -> None:
        """Hook of :meth:`select_sequences` for a subclass's own per-sequence state (``done``:
        see :func:`~multipole.index.take_rows_`)."""

    def advance_before_append(self) -> None:
        """Run now the online updates that the next one-token :meth:`append` would run. They
        cluster only tokens already in the cache, so the result is the same and that append
        runs none: a decode step captured as a CUDA graph then replays across updates
        (``multipole.graphs``). No host sync. Call it only right before that append: until
        it, the recent window holds one token fewer than ``interval``."""
        self._reserve_tokens(max(self.seq_lens) + 1)  # as that append would, first
        self._advance_due(ahead=1)

    def _advance_due(self, ahead: int = 0) -> None:
        """Move ``interval`` tokens from the recent window into the middle while it is too long
        (``ahead``: as if that many more tokens were appended)."""
        cfg = self.config
        advanced = False
        while True:
            due = [
                b
                for b, (n, length) in enumerate(zip(self.seq_lens, self.clustered_len, strict=True))
                if n + ahead - cfg.sink_tokens - length >= 2 * cfg.interval
            ]
            if not due:
                break
            self._on_advance(due)
            advanced = True
            for b in due:
                self.clustered_len[b] += cfg.interval
        if advanced:
            self._after_advance()

    def appends_before_update(self) -> int:
        """One-token appends that can run before one moves tokens into the middle region (for
        Multipole Attention: an online update); 0 when the next append does. Host only, no
        sync (``multipole.graphs`` replays captured steps until then)."""
        limit = self.config.sink_tokens + 2 * self.config.interval
        lengths = zip(self.seq_lens, self.clustered_len, strict=True)
        return min(limit + c - n for n, c in lengths) - 1

    def _on_advance(self, seqs: list[int]) -> None:
        """Hook: ``interval`` tokens of each listed sequence are about to join the middle."""

    def _after_advance(self) -> None:
        """Hook: tokens joined the middle (``clustered_len`` holds the new lengths)."""

    def _reserve_tokens(self, needed: int) -> None:
        for name in ("_keys", "_values", "_cluster_keys"):
            store = getattr(self, name)
            if store is not None and store.shape[2] < needed:
                setattr(self, name, grow(store, 2, needed, 0))

    # ------------------------------------------------------------------ regions and stats
    def _regions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks ``[B, 1, N]`` over positions: always-exact tokens, middle tokens, and the
        lengths ``[B]`` of the middle regions."""
        n = max(self.seq_lens)
        pos = torch.arange(n, device=self.device)
        seq_lens = self._seq_lens_device.unsqueeze(1)
        clustered = self._device_ints("clustered_len", self.clustered_len)
        start = min(self.config.sink_tokens, n)
        valid = pos < seq_lens
        middle = (pos >= start) & (pos < start + clustered.unsqueeze(1)) & valid
        exact = valid & ~middle
        return exact.unsqueeze(1), middle.unsqueeze(1), clustered

    def _per_sequence(self, resolve: Callable[[int], int]) -> torch.Tensor:
        """``[B]`` int64 tensor of ``resolve(clustered_len)`` (budgets per middle region)."""
        return self._device_ints(resolve.__name__, [resolve(n) for n in self.clustered_len])

    def _device_ints(self, name: str, values: list[int]) -> torch.Tensor:
        """``values`` as a ``[B]`` int64 device tensor, copied from the host only when they
        change (after an update or a config change), not at every decode step."""
        key = (name, tuple(values))
        tensor = self._device_cache.get(key)
        if tensor is None:
            if len(self._device_cache) > 32:
                self._device_cache.clear()
            tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
            self._device_cache[key] = tensor
        return tensor

    def exact_tokens(self) -> torch.Tensor:
        """``[B, H_kv, N]`` bool: the tokens the last ``attend`` read exactly (for evaluation:
        attention mass captured). Available from the PyTorch paths (``backend="reference"``)."""
        if self._reads is None or self._reads.token_mask is None:
            raise RuntimeError(
                "exact_tokens: needs a previous attend() on the PyTorch path "
                "(config.backend='reference'); the fused kernels do not form a token mask"
            )
        mask = self._reads.token_mask
        return mask.expand(self.batch_size, self.num_kv_heads, mask.shape[-1])

    def stats(self) -> AttendStats:
        """What the last :meth:`attend` read (syncs with the device)."""
        read, dense = self.bytes_read()
        r = self._reads
        counts = torch.stack(
            [r.tokens_exact.float().mean(), r.clusters_selected.float().mean(),
             r.centroids_scored.float().mean(), read.double()]
        ).tolist()  # fmt: skip
        return AttendStats(
            tokens_exact=counts[0],
            clusters_selected=counts[1],
            centroids_scored=counts[2],
            bytes_read=round(counts[3]),
            dense_bytes=dense,
        )

    def bytes_read(self) -> tuple[torch.Tensor, int]:
        """Bytes the last :meth:`attend` read (a device scalar, no sync: a caller summing many
        states syncs once) and the bytes a dense step reads."""
        if self._reads is None:
            raise RuntimeError("stats: no attend has run on this state yet")
        r = self._reads
        token_bytes = 2 * self.head_dim * self._keys.element_size()
        dense = sum(self.seq_lens) * self.num_kv_heads * token_bytes
        read = r.tokens_exact.sum(dtype=torch.int64) * token_bytes + r.metadata_bytes.sum(
            dtype=torch.int64
        )
        return read, dense


class MultipoleState(DecodeState):
    """Multipole Attention over a ragged batch.

    ``config.backend`` picks the implementation: the PyTorch reference (float32 accumulation,
    any device; the specification) or the fused Triton kernels (CUDA, ``levels == 1``).

    Each decode step scores the centroids of every KV head with the query group, takes the
    clusters of highest estimated attention mass until the token budget is filled (the last
    one in part: ``take_by_budget``), attends exactly to those tokens plus the sink and the
    recent window, and adds every token not taken through its cluster's size-weighted centroid
    (the far field) in the same softmax. With a budget that covers the whole middle region the
    result is dense attention.

    Example:
        >>> import torch, multipole
        >>> k, v = torch.randn(2, 2, 600, 64), torch.randn(2, 2, 600, 64)
        >>> state = multipole.MultipoleState.prefill(k, v, multipole.MultipoleConfig())
        >>> state.attend(torch.randn(2, 8, 64)).shape
        torch.Size([2, 8, 64])
    """

    def __init__(self, keys, values, config, cluster_keys, seq_lens, first_kv_head=0) -> None:
        super().__init__(keys, values, config, cluster_keys, seq_lens, first_kv_head)
        separate_attention_keys = config.far_field_keys == "attention" and cluster_keys is not None
        self.index = ClusterIndex(
            config,
            self.batch_size,
            self.num_kv_heads,
            self.head_dim,
            self._keys.shape[2],
            self.device,
            separate_attention_keys,
            first_kv_head,
        )
        self.index.prefill(*self._index_inputs(), self.clustered_len)
        self._fused: FusedLayout | None = None  # built at the first fused step (_layout)
        self._stale_rows: set[int] = set()  # sequences updated since the layout was written
        self._ranks: torch.Tensor | None = None  # of the PyTorch path; same lifetime

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head read whatever the token budget, right after prefill of
        ``seq_len`` tokens: sink, recent window and every centroid scored (with
        ``levels == 2``: every level-1 centroid plus the level-0 clusters of
        ``coarse_budget_tokens`` tokens). With ``position_free_keys`` and
        ``far_field_keys="attention"`` the far field's own key centroids are counted too (the
        state keeps them when prefill gets ``cluster_keys``, which ``multipole.hf`` passes
        exactly when ``position_free_keys`` is set)."""
        length = initial_clustered_len(seq_len, config)
        fine = [config.clusters_for(n) for n in config.block_sizes(length)]
        if config.levels == 1:
            centroids = sum(fine)
        else:
            opened = min(config.coarse_budget_tokens(length), length)
            centroids = sum(config.coarse_clusters_for(k) for k in fine)
            centroids += config.clusters_for(opened)
        exact = super().fixed_bytes_per_head(config, seq_len, head_dim, elem_size)
        separate = config.position_free_keys and config.far_field_keys == "attention"
        metadata = _metadata_bytes(config, torch.tensor(centroids), head_dim, elem_size, separate)
        return exact + float(metadata)

    def _index_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attention = self._keys if self.index.level0.attention_key_centroids is not None else None
        return self.cluster_keys, self.values, None if attention is None else self.keys

    def _reserve_tokens(self, needed: int) -> None:
        super()._reserve_tokens(needed)
        self.index.reserve_tokens(self._keys.shape[2])
        self._ranks = None

    def _on_advance(self, seqs: list[int]) -> None:
        self.index.advance(*self._index_inputs(), seqs, self.clustered_len)
        self._stale_rows.update(seqs)
        self._ranks = None

    def _after_advance(self) -> None:
        if self._fused is not None:  # refreshed at once: a captured step reads it next
            if self._reads is not None:  # the last attend's counts, before the layout moves on
                r = self._reads
                self._reads = replace(
                    r,
                    centroids_scored=r.centroids_scored.clone(),
                    metadata_bytes=r.metadata_bytes.clone(),
                )
            self._layout()

    def _select_rows(self, rows: list[int], device_rows: torch.Tensor, done: set[int]) -> None:
        self.index.select_sequences(rows, device_rows, done)
        if self._stale_rows:  # (none while a layout exists: it is refreshed at each update)
            self._stale_rows = set(range(self.batch_size))
        if self._fused is not None:
            self._fused.select_rows(rows, device_rows, done)
        take_rows_(self._ranks, device_rows, done)

    def _attend(self, q, lookup_q, scale):
        if self._backend(lookup_q is q) == "triton":
            return self._attend_fused(q, lookup_q, scale)
        return self._attend_reference(q, lookup_q, scale)

    def _backend(self, lookup_is_query: bool) -> str:
        """Resolve ``config.backend`` for this call (the one place that decides)."""
        cfg = self.config
        far_from_lookup = cfg.far_field_keys == "clustering" or lookup_is_query
        supported = (
            cfg.levels == 1
            and self.index.level0.attention_key_centroids is None
            and (far_from_lookup or not cfg.replacement)
            and self.dtype != torch.float64
        )
        if cfg.backend == "reference":
            return "reference"
        if cfg.backend == "triton":
            if not kernels_available(self.device):
                raise RuntimeError(
                    "backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1), "
                    f"got device {self.device} (triton installed: {triton_installed()})"
                )
            if not supported:
                raise ValueError(
                    "backend='triton' supports levels=1, float16/bfloat16/float32 caches and a far "
                    "field from the lookup query; use backend='reference' or 'auto' for this state"
                )
            return "triton"
        return (
            "triton"
            if supported and self.device.type == "cuda" and kernels_available(self.device)
            else "reference"
        )

    def _attend_fused(self, q, lookup_q, scale):
        cfg = self.config
        layout = self._layout()
        # what depends on the index and the config only is computed once per layout
        far_key = f"{cfg.replacement}_{cfg.far_field_share}"
        far_count = None
        if cfg.replacement and cfg.far_field_share < 1:
            far_count = layout.cached(
                f"far_count_{far_key}",
                lambda fresh: _far_field_clusters(cfg, fresh.live).to(torch.int32).contiguous(),
            )
        out, lse, count, selected = fused_decode(
            q.contiguous(),
            lookup_q.contiguous(),
            self._keys,
            self._values,
            layout,
            self._seq_lens_device,
            layout.clustered_len,
            layout.budget,
            max_budget=layout.max_budget,
            sink_tokens=cfg.sink_tokens,
            max_recent=2 * cfg.interval,
            scale=scale,
            replacement=cfg.replacement,
            far_count=far_count,
        )
        reads = Reads(
            tokens_exact=count,
            clusters_selected=selected,
            centroids_scored=layout.live,
            metadata_bytes=layout.cached(
                f"metadata_bytes_{far_key}",
                lambda fresh: _metadata_bytes(  # (no closure over self: copies stay apart)
                    cfg,
                    fresh.live,
                    fresh.key_centroids.shape[-1],
                    fresh.key_centroids.element_size(),
                    False,
                ),
            ),
        )
        return out, lse, reads

    def _layout(self) -> FusedLayout:
        """The kernels' layout of the index, the clustered lengths and the budgets: written in
        place while it has room (a captured decode step keeps reading it), else built anew
        with room for ``LAYOUT_ROOM_UPDATES`` more online updates."""
        lengths = list(self.clustered_len)
        budgets = [self._fused_budget(n) for n in lengths]
        layout = self._fused
        changed = layout is not None and (
            self._stale_rows or layout.lengths != lengths or layout.budgets != budgets
        )
        stale = sorted(self._stale_rows)
        if changed and not layout.refresh(self.index, lengths, budgets, rows=stale):
            layout = None
        if layout is None:
            room = LAYOUT_ROOM_UPDATES * self.config.interval
            layout = FusedLayout.build(self.index, self.dtype, lengths, self._fused_budget, room)
        self._fused, self._stale_rows = layout, set()
        return layout

    def _fused_budget(self, clustered_len: int) -> int:
        """The kernels' token budget: one past the middle region selects the same clusters,
        so it is clamped (buffers are sized by what can be read)."""
        return min(self.config.budget_tokens(clustered_len), clustered_len)

    def _attend_reference(self, q, lookup_q, scale):
        cfg, index = self.config, self.index
        level0 = index.level0
        n = max(self.seq_lens)
        z0 = cluster_logits(lookup_q, level0.key_centroids, scale)  # [B, H, G, C]
        log_n0 = torch.log(level0.sizes.to(z0.dtype)).unsqueeze(-2)
        live0 = level0.sizes > 0

        if index.level1 is None:
            candidates = live0
            unopened = None
            log_denominator = _masked_logsumexp(z0 + log_n0, live0)
            scored = live0.sum(-1)
        else:
            level1 = index.level1
            z1 = cluster_logits(lookup_q, level1.key_centroids, scale)
            live1 = level1.sizes > 0
            log_n1 = torch.log(level1.sizes.to(z1.dtype)).unsqueeze(-2)
            score1 = log_importance(z1, live1, _masked_logsumexp(z1 + log_n1, live1))
            opened = select_by_budget(
                score1, level1.sizes, live1, self._per_sequence(cfg.coarse_budget_tokens)
            )
            parent = index.parent.clamp_min(0)
            candidates = live0 & opened.gather(-1, parent) & (index.parent >= 0)
            unopened = live1 & ~opened
            log_denominator = torch.logaddexp(
                _masked_logsumexp(z0 + log_n0, candidates), _masked_logsumexp(z1 + log_n1, unopened)
            )
            scored = live1.sum(-1) + candidates.sum(-1)

        score0 = log_importance(z0, candidates, log_denominator)
        budget = self._per_sequence(cfg.budget_tokens)
        # scores are at most log(group): a cluster with every query head's whole probability
        top = math.log(lookup_q.shape[2])
        taken = take_by_budget(score0, level0.sizes, candidates, budget, top)

        exact, middle, _ = self._regions()
        labels = index.labels[:, :, :n]
        if self._ranks is None:  # labels change only at prefill, updates and growth
            self._ranks = _rank_in_cluster(index.labels).to(torch.int32)
        # a cluster's first `taken` tokens (in position order) are attended exactly
        chosen = (labels >= 0) & (self._ranks[:, :, :n] < taken.gather(-1, labels.clamp_min(0)))
        token_mask = exact | (middle & chosen)
        out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)

        if cfg.replacement:
            # the far field of every cluster counts the tokens not taken: their number and
            # the mean of their values (a partly taken cluster keeps its key centroid)
            far_q, keys0 = self._far_field_inputs(q, lookup_q, level0)
            left = torch.where(candidates, level0.sizes - taken, 0)
            in_far = left > 0
            if cfg.far_field_share < 1:
                # the clusters of largest estimated mass (per-key score x tokens left)
                mass = score0 + torch.log(left.to(score0.dtype))
                in_far &= select_band(mass, in_far, _far_field_clusters(cfg, scored))
            far = far_field(
                far_q,
                keys0,
                self._values_left(level0, taken, middle & chosen),
                left,
                in_far,
                scale,
            )
            out, lse = merge_states(out, lse, *far)
            if unopened is not None:
                _, keys1 = self._far_field_inputs(q, lookup_q, index.level1)
                far = far_field(
                    far_q, keys1, index.level1.value_centroids, index.level1.sizes, unopened, scale
                )
                out, lse = merge_states(out, lse, *far)

        separate = level0.attention_key_centroids is not None
        elem_size = self._keys.element_size()
        reads = Reads(
            tokens_exact=token_mask.sum(-1),
            clusters_selected=(taken > 0).sum(-1),
            centroids_scored=scored,
            metadata_bytes=_metadata_bytes(cfg, scored, self.head_dim, elem_size, separate),
            token_mask=token_mask,
        )
        return out, lse, reads

    def _values_left(self, level, taken, chosen):
        """Mean values ``[B, H_kv, C, D]`` of the tokens of each cluster not taken: the value
        centroid, except for the one partly taken cluster of a row (``take_by_budget`` cuts
        at most one), whose untaken tokens average ``(N Vc - sum of taken values) / (N - t)``."""
        partial = (taken > 0) & (taken < level.sizes)  # [B, H_kv, C], at most one per row
        n = chosen.shape[-1]
        in_partial = chosen & partial.gather(-1, self.index.labels[:, :, :n].clamp_min(0))
        values = self.values[:, :, :n].to(level.value_centroids.dtype)
        taken_sum = torch.matmul(in_partial.unsqueeze(-2).to(values.dtype), values)  # [B,H,1,D]
        total = level.value_centroids * level.sizes.unsqueeze(-1)
        rest = (total - taken_sum) / (level.sizes - taken).clamp_min(1).unsqueeze(-1)
        return torch.where(partial.unsqueeze(-1), rest, level.value_centroids)

    def _far_field_inputs(self, q, lookup_q, level):
        """Query and key centroids of the far-field logits (see ``config.far_field_keys``)."""
        if level.attention_key_centroids is not None:
            return q, level.attention_key_centroids
        if self.config.far_field_keys == "attention":
            return q, level.key_centroids  # clustering keys are the attention keys
        return lookup_q, level.key_centroids


def dense_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    lengths: torch.Tensor | list[int] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention: the reference every method is measured against.

    Args:
        q: ``[B, num_q_heads, D]``, ``num_q_heads`` a multiple of ``num_kv_heads``.
        keys, values: ``[B, num_kv_heads, N, D]``.
        lengths: ``[B]`` valid lengths in ``[0, N]`` (right padding); a sequence of length 0
            returns zeros (and ``lse = -inf``).
        scale: softmax scale; default ``1 / sqrt(D)``.
        return_lse: also return the float32 natural-log softmax denominator ``[B, num_q_heads]``.
        validate: reject NaN/inf in the inputs; None checks CPU tensors only.
    Returns:
        ``[B, num_q_heads, D]`` in the dtype of ``q`` (and ``lse`` if asked).
    """
    checks.check_tensor("q", q, ("B", "num_q_heads", "head_dim"))
    dims = ("B", "num_kv_heads", "N", "head_dim")
    checks.check_tensor("keys", keys, dims)
    b, h, n, d = keys.shape
    if min(b, h, d) < 1:
        raise ValueError(
            f"keys: expected non-empty [B, num_kv_heads, N, head_dim], got {list(keys.shape)}"
        )
    checks.check_shape("q", q, ("B", "num_q_heads", "head_dim"), (b, None, d))
    checks.check_like("q", q, "keys", keys)
    checks.check_tensor("values", values, dims)
    checks.check_shape("values", values, dims, keys.shape)
    checks.check_like("values", values, "keys", keys)
    group = checks.check_heads("q", q.shape[1], h)
    seq_lens = checks.check_lengths("lengths", lengths, b, n, keys.device, min_len=0)
    scale = _check_scale(scale, d)
    if checks.should_validate(validate, keys):
        checks.check_finite("q", q)
        checks.check_finite("keys", keys, seq_lens)
        checks.check_finite("values", values, seq_lens)
    mask = (torch.arange(n, device=keys.device) < seq_lens.unsqueeze(1)).unsqueeze(1)
    if lengths is not None:  # padding may hold NaN, and a masked token adds 0 x NaN = NaN
        values = values.masked_fill(~mask.unsqueeze(-1), 0)
    out, lse = attend_tokens(q.reshape(b, h, group, d), keys, values, mask, scale)
    out = out.reshape(q.shape).to(q.dtype)
    return (out, lse.reshape(b, -1).float()) if return_lse else out


def _far_field_clusters(config: MultipoleConfig, scored: torch.Tensor) -> torch.Tensor:
    """Value centroids a step is charged for the far field, out of ``scored`` live centroids:
    ``far_field_share`` of them (rounded, at least one), none without the far field. An upper
    bound: fewer are read when fewer clusters have tokens left or when ``select_band`` leaves
    out the bin of masses at its cut."""
    if not config.replacement:
        return torch.zeros_like(scored)
    share = torch.round(scored.to(torch.float64) * config.far_field_share).to(scored.dtype)
    return torch.minimum(share.clamp_min(1), scored)


def _metadata_bytes(
    config: MultipoleConfig,
    scored: torch.Tensor,
    head_dim: int,
    elem_size: int,
    separate_attention_keys: bool,
) -> torch.Tensor:
    """Bytes of centroid data read per (sequence, KV head): every scored key centroid and its
    4-byte size, and the value centroids of the far field (with as many attention-key
    centroids when those are kept apart)."""
    far = _far_field_clusters(config, scored) * (2 if separate_attention_keys else 1)
    return (scored + far) * head_dim * elem_size + scored * 4


def _rank_in_cluster(labels: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]``: how many earlier positions carry the same label (the fused kernels'
    order within a cluster is by position too)."""
    n = labels.shape[-1]
    positions = torch.arange(n, device=labels.device)
    order = torch.sort(labels.to(torch.int64) * n + positions, dim=-1).indices
    sorted_labels = labels.gather(-1, order)
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[..., 1:] = sorted_labels[..., 1:] != sorted_labels[..., :-1]
    first = torch.where(starts, positions, 0).cummax(-1).values
    return torch.empty_like(order).scatter_(-1, order, positions - first)


def _masked_logsumexp(x: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis of ``x [B, H, G, C]`` where ``include [B, H, C]``."""
    return torch.logsumexp(x.masked_fill(~include.unsqueeze(-2), float("-inf")), dim=-1)


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
    return float(scale)


def _clone(t: torch.Tensor | None, seq_lens: list[int]) -> torch.Tensor | None:
    """A contiguous copy (the kernels address the cache as ``[B, H_kv, N, D]`` row-major) with
    the right padding past each row's length zeroed: padding may hold anything, NaN included,
    and a masked-out token still enters ``weights @ values`` as ``0 x value``."""
    if t is None:
        return None
    copy = t.clone(memory_format=torch.contiguous_format)
    for row, length in enumerate(seq_lens):
        if length < copy.shape[2]:
            copy[row, :, length:] = 0
    return copy
