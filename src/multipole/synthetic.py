"""Synthetic keys, values and queries with planted cluster structure (tests, demo, benchmarks).

Keys of each KV head are drawn around ``num_centers`` random directions, so k-means has
structure to find; values are correlated with the center of their key; decode queries point
at a few centers, so a few clusters hold most of the attention mass and the rest forms a long
tail that only the far field captures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PlantedKV:
    """Generator of clustered keys/values and matching queries for one set of heads."""

    num_kv_heads: int
    head_dim: int
    num_centers: int = 64
    key_norm: float = 3.0
    noise: float = 0.35
    query_norm: float = 2.5
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        d = self.head_dim
        centers = torch.randn(self.num_kv_heads, self.num_centers, d, generator=gen)
        self.centers = centers / centers.norm(dim=-1, keepdim=True)  # [H, M, D]
        self.value_centers = torch.randn(self.num_kv_heads, self.num_centers, d, generator=gen)
        self._gen = gen

    def kv(
        self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, N, D]``: each token near one random center."""
        gen, h, d = self._gen, self.num_kv_heads, self.head_dim
        which = torch.randint(self.num_centers, (batch, h, seq_len), generator=gen)
        heads = torch.arange(h).view(1, h, 1)
        scale = self.key_norm * math.sqrt(math.sqrt(d))
        keys = scale * self.centers[heads, which]
        keys = keys + self.noise * scale / math.sqrt(d) * torch.randn(
            batch, h, seq_len, d, generator=gen
        )
        values = self.value_centers[heads, which] + 0.5 * torch.randn(
            batch, h, seq_len, d, generator=gen
        )
        return keys.to(dtype), values.to(dtype)

    def queries(
        self, batch: int, group_size: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Decode queries ``[B, H_kv * group_size, D]``, each pointing at one random center."""
        gen, h, d = self._gen, self.num_kv_heads, self.head_dim
        which = torch.randint(self.num_centers, (batch, h, group_size), generator=gen)
        heads = torch.arange(h).view(1, h, 1)
        scale = self.query_norm * math.sqrt(math.sqrt(d))
        q = scale * self.centers[heads, which] + 0.3 * torch.randn(
            batch, h, group_size, d, generator=gen
        )
        return q.reshape(batch, h * group_size, d).to(dtype)
