"""Oracle top-k: the budget spent on the middle tokens of highest true attention."""

from __future__ import annotations

import torch

from ..ops.decode import attend_tokens
from ..ops.lookup import cluster_logits, log_importance, select_by_budget
from ..state import DecodeState, Reads
from .dense import exact_reads


class OracleTopKState(DecodeState):
    """Sink + recent window + the ``budget`` middle tokens of highest true importance.

    The importance of a token for a KV head is the sum over its ``G`` query heads of the
    token's softmax probability over the whole cache, computed with the attention query ``q``
    (``lookup_q`` is ignored); ties go to the lower position. Deciding reads every key: that
    is what makes it an oracle, the upper bound of any token selector at this budget. Its
    reads report only the exactly attended tokens (``metadata_bytes = 0``).
    """

    def _attend(
        self, q: torch.Tensor, lookup_q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, Reads]:
        exact, middle, _ = self._regions()
        b, h, n = self.batch_size, self.num_kv_heads, exact.shape[-1]
        logits = cluster_logits(q, self.keys, scale)  # every token a cluster of one  [B, H, G, N]
        valid = (exact | middle).unsqueeze(-2)
        log_denominator = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=-1)
        candidates = middle.expand(b, h, n)
        score = log_importance(logits, candidates, log_denominator)
        ones = torch.ones(b, h, n, dtype=torch.int64, device=self.device)
        budget = self._per_sequence(self.config.budget_tokens)
        top = select_by_budget(score, ones, candidates, budget)
        token_mask = exact | top
        out, lse = attend_tokens(q, self.keys, self.values, token_mask, scale)
        return out, lse, exact_reads(token_mask, b, h)
