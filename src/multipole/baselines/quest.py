"""Quest (Tang et al., 2024): pages of keys ranked by an upper bound of their attention logit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import MultipoleConfig
from ..ops.decode import attend_tokens
from ..ops.decode.reference import compute_dtype
from ..ops.lookup import select_by_budget
from ..state import DecodeState, Reads, initial_clustered_len


def page_size(config: MultipoleConfig) -> int:
    """Tokens per Quest page: ``1 / centroid_ratio`` (16 by default), so Quest keeps one
    summary per as many tokens as Multipole keeps one cluster, and both spend the same
    metadata bytes."""
    return max(1, round(1 / config.centroid_ratio))


def page_bounds(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over the keys of each page: ``sum_d max(q_d min_d, q_d max_d)``.

    Args:
        q: ``[B, H_kv, G, D]``.
        page_min, page_max: ``[B, H_kv, P, D]`` elementwise min and max of each page's keys.
    Returns:
        ``[B, H_kv, G, P]`` in the accumulation dtype (unscaled dot products).
    """
    dtype = compute_dtype(q.dtype)
    q = q.to(dtype)
    upper = torch.matmul(q.clamp_min(0), page_max.to(dtype).transpose(-1, -2))
    lower = torch.matmul(q.clamp_max(0), page_min.to(dtype).transpose(-1, -2))
    return upper + lower


class QuestState(DecodeState):
    """Quest: the middle region in pages of :func:`page_size` tokens (16 at the default
    ``centroid_ratio``), the pages of highest bound read exactly.

    Pages start at the first middle token (the last page may be partial). Each page is
    summarised by the elementwise min and max of its keys per KV head; this reference
    computes the summaries from the cache at every attend (a real implementation keeps them,
    so only the summaries count as read). A page's score for a KV head is the largest
    :func:`page_bounds` over its query heads; pages are taken in descending score while their
    tokens fit in the budget. Sink and recent window are exact.
    """

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head read whatever the budget: sink, recent window, and the min and
        max key of every page."""
        pages = math.ceil(initial_clustered_len(seq_len, config) / page_size(config))
        page_bytes = 2 * head_dim * elem_size
        return (
            super().fixed_bytes_per_head(config, seq_len, head_dim, elem_size) + pages * page_bytes
        )

    def _attend(
        self, q: torch.Tensor, lookup_q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, Reads]:
        exact, middle, clustered = self._regions()
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        n = exact.shape[-1]
        size = page_size(self.config)
        num_pages = max(1, math.ceil(max(self.clustered_len) / size))
        # Page of every token; tokens outside the middle go to an extra page that is dropped.
        page = torch.where(middle, (middle.cumsum(-1) - 1) // size, num_pages)  # [B, 1, N]
        index = page.unsqueeze(-1).expand(b, h, n, d)
        keys = self.keys.to(compute_dtype(self.dtype))
        shape = (b, h, num_pages + 1, d)
        page_min = keys.new_full(shape, float("inf")).scatter_reduce(2, index, keys, "amin")
        page_max = keys.new_full(shape, float("-inf")).scatter_reduce(2, index, keys, "amax")

        first = size * torch.arange(num_pages, device=self.device)
        sizes = (clustered.unsqueeze(1) - first).clamp(0, size).unsqueeze(1).expand(b, h, -1)
        live = sizes > 0
        # Empty pages hold +-inf summaries: zero them so the (masked) bound stays finite.
        page_min = torch.where(live.unsqueeze(-1), page_min[:, :, :num_pages], 0.0)
        page_max = torch.where(live.unsqueeze(-1), page_max[:, :, :num_pages], 0.0)
        score = page_bounds(q, page_min, page_max).amax(dim=-2)  # [B, H, P]
        selected = select_by_budget(
            score, sizes, live, self._per_sequence(self.config.budget_tokens)
        )
        chosen = F.pad(selected, (0, 1)).gather(-1, page.expand(b, h, n))
        token_mask = exact | chosen
        out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)
        scored = live.sum(-1)
        reads = Reads(
            tokens_exact=token_mask.sum(-1),
            clusters_selected=selected.sum(-1),
            centroids_scored=scored,
            metadata_bytes=scored * 2 * d * self._keys.element_size(),
            token_mask=token_mask,
        )
        return out, lse, reads
