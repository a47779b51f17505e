"""Centroid-only ("Squeezed") attention: Multipole Attention without the far field."""

from __future__ import annotations

import dataclasses

import torch

from ..config import MultipoleConfig
from ..state import MultipoleState


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
        first_kv_head: int = 0,
    ) -> None:
        config = dataclasses.replace(config, replacement=False)
        super().__init__(keys, values, config, cluster_keys, seq_lens, first_kv_head)

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head read whatever the budget: sink, recent window, key centroids."""
        config = dataclasses.replace(config, replacement=False)
        return super().fixed_bytes_per_head(config, seq_len, head_dim, elem_size)
