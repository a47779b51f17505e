"""MultipoleConfig: every knob of Multipole Attention, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

FarFieldKeys = Literal["clustering", "attention"]
Backend = Literal["auto", "reference", "triton"]


def _fail(field: str, expected: str, got: Any) -> None:
    raise ValueError(f"MultipoleConfig.{field}: expected {expected}, got {got!r}")


MAX_TOKENS = 2**62  # token counts the tensors index with int64, sums included
MAX_SEED = 2**32 - 1  # k-means seeds hash (seed, head, position) in 32 bits


def _check_budget(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"MultipoleConfig.{field}: expected an int (tokens) or a float in (0, 1) "
            f"(fraction of the clustered region), got {type(value).__name__}"
        )
    if isinstance(value, int) and value < 0:
        _fail(field, "an int >= 0 (tokens per KV head)", value)
    if isinstance(value, int) and value > MAX_TOKENS:
        _fail(field, "an int <= 2**62 (tokens per KV head; int64 counts)", value)
    if isinstance(value, float) and not 0.0 < value < 1.0:
        _fail(field, "a float in (0, 1) (fraction of the clustered region)", value)


@dataclass(frozen=True)
class MultipoleConfig:
    """Settings of Multipole Attention (defaults follow the paper's code unless noted).

    The cache of each sequence is cut into three regions: ``sink_tokens`` first tokens and a
    recent window of ``interval`` to ``2 * interval - 1`` tokens, both always attended exactly,
    and the clustered region between them. The clustered region is cut into blocks of
    ``block_size`` tokens, each clustered on its own with k-means into
    ``centroid_ratio * block_len`` clusters. At decode, clusters are ranked by their estimated
    attention mass and taken in that order until ``token_budget`` tokens are taken: whole
    clusters, then the first tokens of the next one (the paper's code stops at the first
    cluster that does not fit, which leaves budget unused). Those tokens are attended exactly;
    every token not taken enters the softmax through its cluster's centroid (the far field,
    ``replacement=True``: a cluster counts as its untaken tokens, at its key centroid with their
    mean value) or is dropped (``replacement=False``, the centroid-only variant).
    ``far_field_share < 1`` keeps the far field to the unselected clusters of largest estimated
    mass and drops the rest: fewer value centroids read, so more tokens within the same bytes.

    Attributes:
        centroid_ratio: clusters per clustered token (1/16: one centroid per 16 keys).
        token_budget: tokens of the clustered region attended exactly per KV head; an int is
            a number of tokens, a float in (0, 1) a fraction of the clustered region.
        sink_tokens: first tokens always attended exactly (the paper's code uses 10).
        interval: online update period; the recent window holds [interval, 2 * interval).
        block_size: tokens per k-means block; a block is frozen once it is full. Must be a
            multiple of ``interval``.
        kmeans_iters: Lloyd iterations when a block is clustered at prefill.
        update_iters: Lloyd iterations over the open (final) block at each online update (its
            level-1 clusters, with ``levels == 2``, are re-fit with ``kmeans_iters``).
        levels: 1, or 2 for a hierarchy: coarse clusters of the level-0 centroids are scored
            first and only the children of the most important ones are scored and selected.
        level_ratio: coarse clusters per level-0 cluster when ``levels == 2``.
        coarse_budget: tokens whose level-0 clusters are opened (scored) when ``levels == 2``;
            an int is a number of tokens, a float in (0, 1) a fraction of the clustered region.
        replacement: add the far-field term of unselected clusters (Multipole); False gives
            the centroid-only ("Squeezed") variant.
        far_field_share: the far field holds at most ``max(1, round(share x live))``
            clusters: those of largest estimated attention mass among the clusters with tokens
            left after selection, taken in whole bins of 1/64 nat of mass (``select_band``),
            so fewer, even none, when masses tie within the bin at the cut. Only their value
            centroids are read; the other unselected clusters are dropped. 1.0 (default) is
            the paper's far field over every unselected cluster.
            Values below 1 need ``levels == 1``; without ``replacement`` it has no effect.
        far_field_keys: key centroids used for the far-field logits: ``"clustering"`` scores
            the clustering-key centroids with the lookup query (the paper's code);
            ``"attention"`` uses the means of the attention keys with the attention query.
            The two coincide when the clustering keys are the attention keys.
        position_free_keys: for model integrations (``multipole.hf``): cluster the keys
            before RoPE and score centroids with the query rotated at ``lookup_position``, as
            the paper's code does; False (default) clusters the cached RoPE'd keys and scores
            with the real query. Costs one extra copy of the keys (the pre-RoPE keys are
            kept for the online update).
        lookup_position: fixed RoPE position at which lookup queries are rotated when
            ``position_free_keys`` is set: every cluster is scored as if its keys sat
            ``lookup_position`` tokens before the query.
        seed: seed of k-means initialisation; seeds are drawn from (seed, KV head, position),
            so a sequence is seeded the same alone or in any batch.
        validate: check inputs for NaN/inf; None checks CPU tensors only (a CUDA check syncs).
        backend: ``"reference"`` (PyTorch, any device), ``"triton"`` (fused kernels: CUDA, or
            the CPU under ``TRITON_INTERPRET=1``), or ``"auto"``: Triton on CUDA where the
            kernels cover the call (``levels == 1``, a float16/bfloat16/float32 cache, far field
            from the lookup query), the reference otherwise.
    """

    centroid_ratio: float = 1 / 16
    token_budget: int | float = 128
    sink_tokens: int = 16
    interval: int = 128
    block_size: int = 8192
    kmeans_iters: int = 10
    update_iters: int = 3
    levels: int = 1
    level_ratio: float = 1 / 4
    coarse_budget: int | float = 0.25
    replacement: bool = True
    far_field_share: float = 1.0
    far_field_keys: FarFieldKeys = "clustering"
    position_free_keys: bool = False
    lookup_position: int = 2048
    seed: int = 0
    validate: bool | None = None
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        for field in ("centroid_ratio", "level_ratio", "far_field_share"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"MultipoleConfig.{field}: expected a float, got {value!r}")
            if not (0.0 < value <= 1.0) or math.isnan(value):
                _fail(field, "a float in (0, 1]", value)
        _check_budget("token_budget", self.token_budget)
        _check_budget("coarse_budget", self.coarse_budget)
        for field, minimum, maximum in (
            ("sink_tokens", 0, MAX_TOKENS),
            ("interval", 1, MAX_TOKENS),
            ("block_size", 1, MAX_TOKENS),
            ("kmeans_iters", 1, MAX_TOKENS),
            ("update_iters", 1, MAX_TOKENS),
            ("lookup_position", 0, MAX_TOKENS),
            ("seed", 0, MAX_SEED),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"MultipoleConfig.{field}: expected an int, got {type(value).__name__}"
                )
            if value < minimum:
                _fail(field, f"an int >= {minimum}", value)
            if value > maximum:
                _fail(field, f"an int <= {maximum}", value)
        if self.block_size % self.interval:
            _fail("block_size", f"a multiple of interval={self.interval}", self.block_size)
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise TypeError(
                f"MultipoleConfig.levels: expected an int, got {type(self.levels).__name__}"
            )
        if self.levels not in (1, 2):
            _fail("levels", "1 or 2", self.levels)
        for field in ("replacement", "position_free_keys"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(
                    f"MultipoleConfig.{field}: expected a bool, got {getattr(self, field)!r}"
                )
        if self.far_field_share < 1 and self.levels != 1:
            _fail(
                "far_field_share",
                "1.0 when levels=2 (a partial far field needs levels=1)",
                self.far_field_share,
            )
        if self.far_field_keys not in ("clustering", "attention"):
            _fail("far_field_keys", "'clustering' or 'attention'", self.far_field_keys)
        if self.backend not in ("auto", "reference", "triton"):
            _fail("backend", "'auto', 'reference' or 'triton'", self.backend)
        if self.validate is not None and not isinstance(self.validate, bool):
            _fail("validate", "None, True or False", self.validate)

    def budget_tokens(self, clustered_len: int) -> int:
        """Token budget for a clustered region of ``clustered_len`` tokens."""
        return _resolve(self.token_budget, clustered_len)

    def coarse_budget_tokens(self, clustered_len: int) -> int:
        """Tokens whose level-0 clusters are scored, for ``levels == 2``."""
        return _resolve(self.coarse_budget, clustered_len)

    def block_sizes(self, clustered_len: int) -> list[int]:
        """Tokens of each k-means block of a clustered region (full blocks, then the rest)."""
        return [
            min(self.block_size, clustered_len - start)
            for start in range(0, clustered_len, self.block_size)
        ]

    def clusters_for(self, num_tokens: int) -> int:
        """Number of level-0 clusters of a block of ``num_tokens`` tokens."""
        return 0 if num_tokens <= 0 else max(1, round(num_tokens * self.centroid_ratio))

    def coarse_clusters_for(self, num_clusters: int) -> int:
        """Number of level-1 clusters over ``num_clusters`` level-0 clusters of one block."""
        return 0 if num_clusters <= 0 else max(1, round(num_clusters * self.level_ratio))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(budget: int | float, clustered_len: int) -> int:
    if isinstance(budget, float):
        return int(budget * clustered_len)
    return budget
