"""Dense decode attention as a :class:`DecodeState`, and what every baseline shares."""

from __future__ import annotations

import torch

from ..config import MultipoleConfig
from ..ops.decode import attend_tokens
from ..state import DecodeState, Reads


def exact_reads(token_mask: torch.Tensor, batch: int, num_kv_heads: int) -> Reads:
    """Reads of a method that reads only the tokens of ``token_mask`` (``[B, 1 or H_kv, N]``)
    and no metadata."""
    tokens = token_mask.sum(-1).expand(batch, num_kv_heads)
    zeros = torch.zeros_like(tokens)
    return Reads(
        tokens_exact=tokens,
        clusters_selected=zeros,
        centroids_scored=zeros,
        metadata_bytes=zeros,
        token_mask=token_mask,
    )


class DenseState(DecodeState):
    """Exact attention over every cached token (the budget is ignored).

    Equals :func:`multipole.dense_attention`; the yardstick of accuracy and of bytes read.
    """

    @classmethod
    def fixed_bytes_per_head(
        cls, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
    ) -> float:
        """Bytes per KV head read whatever the budget: the whole sequence."""
        return float(seq_len * 2 * head_dim * elem_size)

    def _attend(
        self, q: torch.Tensor, lookup_q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, Reads]:
        exact, middle, _ = self._regions()
        token_mask = exact | middle
        out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)
        return out, lse, exact_reads(token_mask, self.batch_size, self.num_kv_heads)
