"""Sliding-window attention that spends the budget on the most recent middle tokens."""

from __future__ import annotations

import torch

from ..ops.decode import attend_tokens
from ..state import DecodeState, Reads
from .dense import exact_reads


class WindowState(DecodeState):
    """Sink + recent window + the last ``budget`` tokens of the middle region, all exact.

    A longer sliding window (StreamingLLM-style, with attention sinks): what a method that
    does no lookup gets for the same bytes. With ``budget >= clustered_len`` it is dense.
    """

    def _attend(
        self, q: torch.Tensor, lookup_q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, Reads]:
        exact, middle, clustered = self._regions()
        budget = self._per_sequence(self.config.budget_tokens)
        offset = middle.cumsum(-1)  # 1-based position inside the middle region  [B, 1, N]
        recent = offset > (clustered - budget).view(-1, 1, 1)
        token_mask = exact | (middle & recent)
        out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)
        return out, lse, exact_reads(token_mask, self.batch_size, self.num_kv_heads)
