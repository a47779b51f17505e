"""Centroid-only ("Squeezed") attention, and the fixed bytes of every Multipole variant."""

from __future__ import annotations

import dataclasses

import torch

from ..config import MultipoleConfig
from ..state import MultipoleState, initial_clustered_len
from .dense import exact_region_bytes


def multipole_fixed_bytes(
    config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
) -> float:
    """Bytes per KV head that :class:`MultipoleState` reads whatever its token budget, right
    after prefill of ``seq_len`` tokens: sink, recent window, and every centroid scored.

    Each centroid costs its key centroid (plus its value centroid with ``replacement``) and a
    4-byte size. With ``levels == 2``: every level-1 centroid, plus the level-0 clusters of
    ``coarse_budget_tokens`` tokens (the children of the opened coarse clusters).
    """
    length = initial_clustered_len(seq_len, config)
    blocks = [min(config.block_size, length - s) for s in range(0, length, config.block_size)]
    fine = [config.clusters_for(n) for n in blocks]
    if config.levels == 1:
        centroids = sum(fine)
    else:
        opened = min(config.coarse_budget_tokens(length), length)
        centroids = sum(config.coarse_clusters_for(k) for k in fine) + config.clusters_for(opened)
    vectors = 2 if config.replacement else 1
    centroid_bytes = vectors * head_dim * elem_size + 4
    return exact_region_bytes(config, seq_len, head_dim, elem_size) + centroids * centroid_bytes


class CentroidOnlyState(MultipoleState):
    """Multipole Attention without the far field (the paper's "Squeezed" baseline).

    Same clustering, lookup and selection, but unselected clusters are dropped instead of
    entering the softmax as centroids: ``replacement`` is forced to False, whatever the
    config says.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        config: MultipoleConfig,
        cluster_keys: torch.Tensor | None,
        seq_lens: list[int],
    ) -> None:
        config = dataclasses.replace(config, replacement=False)
        super().__init__(keys, values, config, cluster_keys, seq_lens)

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head read whatever the budget: sink, recent window, key centroids."""
        config = dataclasses.replace(config, replacement=False)
        return multipole_fixed_bytes(config, seq_len, head_dim, elem_size)
