"""Centroid lookup: score clusters against a query group and select them to a token budget."""

from __future__ import annotations

import torch

from ..decode.reference import compute_dtype

NEG_INF = float("-inf")


def cluster_logits(q: torch.Tensor, key_centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits ``s q . Kc`` of every query head of a group against every cluster.

    Args:
        q: ``[B, H_kv, G, D]``; key_centroids: ``[B, H_kv, C, D]``.
    Returns:
        ``[B, H_kv, G, C]`` in the accumulation dtype.
    """
    dtype = compute_dtype(q.dtype)
    return torch.matmul(q.to(dtype), key_centroids.to(dtype).transpose(-1, -2)) * scale


def log_importance(
    logits: torch.Tensor, include: torch.Tensor, log_denominator: torch.Tensor
) -> torch.Tensor:
    """Log of each cluster's estimated per-key attention probability, summed over the group.

    ``P[g, c] = exp(z[g, c]) / sum_j N_j exp(z[g, j])`` (the paper's eq. 1), the importance of
    cluster c is ``sum_g P[g, c]``; this returns its log (no underflow at extreme logits).

    Args:
        logits: ``[B, H_kv, G, C]``.
        include: ``[B, H_kv, C]`` bool, the clusters to rank (others get ``-inf``).
        log_denominator: ``[B, H_kv, G]``, ``log sum_j N_j exp(z[g, j])``.
    Returns:
        ``[B, H_kv, C]``.
    """
    safe = torch.where(torch.isfinite(log_denominator), log_denominator, 0.0)
    score = torch.logsumexp(logits - safe.unsqueeze(-1), dim=-2)
    return score.masked_fill(~include, NEG_INF)


# Both orders that the fused kernels count with many programs at once use bins of 1/64 nat:
# the selection bins scores below ``log(group)``, the largest possible one, and a partial far
# field bins masses below the row's largest. Values 32 nats or more below the top share the last
# bin (a 1/64 nat step is 1.6% of estimated attention mass: below the estimate's own error).
BINS = 2048
BINS_PER_NAT = 64.0


def bins_below(top: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Bin of each value: ``floor((top - x) * BINS_PER_NAT)`` clamped to ``[0, BINS)``, int64
    (bin 0 holds the best; ``-inf`` the last). In ``x``'s dtype: for float32 scores, bit for bit
    the bins the kernels count."""
    return ((top - x) * BINS_PER_NAT).clamp(0, BINS - 1).to(torch.int64)


def select_band(mass: torch.Tensor, include: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The clusters of a partial far field: the included clusters of largest ``mass``, at most
    ``count`` per row, taken a bin of ``1 / BINS_PER_NAT`` nat at a time down from the
    row's largest mass; the bin that would pass ``count`` is left out whole (so ties never
    depend on cluster order, and a step needs no search below the bin: the fused kernels
    count the bins with many programs at once).

    Args:
        mass: ``[B, H_kv, C]``; include: ``[B, H_kv, C]`` bool; count: ``[B, H_kv]`` int.
    Returns:
        ``[B, H_kv, C]`` bool.
    """
    masked = mass.masked_fill(~include, NEG_INF)
    bins = bins_below(masked.amax(-1, keepdim=True), masked)
    bins = torch.where(include, bins, BINS - 1)  # (the clamp of nan where excluded)
    counts = torch.zeros(*mass.shape[:-1], BINS, dtype=torch.int64, device=mass.device)
    counts.scatter_add_(-1, bins, include.to(torch.int64))
    # the first bin at which the running count passes `count` (BINS: none does)
    cut = (counts.cumsum(-1) <= count.unsqueeze(-1)).sum(-1, keepdim=True)
    return include & (bins < cut)


def select_by_budget(
    score: torch.Tensor, sizes: torch.Tensor, include: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Take clusters in descending score while their total size stays within the budget.

    The selection is the longest prefix of the included clusters, ordered by score (ties by
    lower index), whose sizes sum to at most ``budget``: no partial clusters; a cluster larger
    than what is left ends the selection.

    Args:
        score: ``[B, H_kv, C]``; sizes: ``[B, H_kv, C]`` int; include: ``[B, H_kv, C]`` bool.
        budget: ``[B]`` int tokens per KV head.
    Returns:
        ``[B, H_kv, C]`` bool.
    """
    include = include & (sizes > 0)
    ranked = score.masked_fill(~include, NEG_INF)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    sorted_sizes = torch.where(include, sizes, 0).gather(-1, order)
    fits = sorted_sizes.cumsum(-1) <= budget.view(-1, 1, 1)
    selected = torch.zeros_like(include)
    selected.scatter_(-1, order, fits)
    return selected & include


def take_by_budget(
    score: torch.Tensor,
    sizes: torch.Tensor,
    include: torch.Tensor,
    budget: torch.Tensor,
    top: float,
) -> torch.Tensor:
    """Tokens taken from each cluster to fill the budget: clusters in descending score, each
    whole while the budget holds, then the rest of the budget from the next one (its first
    tokens), so no budget is left unused because the next cluster is larger than what remains.

    Descending score is counted in bins of ``1 / BINS_PER_NAT`` nat below ``top``
    (``bins_below``), and in cluster order within a bin: the fused kernels then find each
    cluster's place from a histogram and prefix sums, many programs per row, with no sort and no
    search. Precisely: in the order (bin, index), cluster c takes
    ``clamp(budget - tokens of the clusters before it, 0, size_c)`` tokens; at most one cluster
    is taken in part.

    Args:
        score: ``[B, H_kv, C]``; sizes: ``[B, H_kv, C]`` int; include: ``[B, H_kv, C]`` bool.
        budget: ``[B]`` int tokens per KV head.
        top: the largest possible score (``log(group)`` for ``log_importance``); bins start
            there so that they do not depend on the scores.
    Returns:
        ``[B, H_kv, C]`` int64, tokens taken per cluster.
    """
    include = include & (sizes > 0) & (score > NEG_INF)  # (as the kernels: -inf is dead)
    sizes = torch.where(include, sizes, 0).to(torch.int64)
    bins = torch.where(include, bins_below(top, score), BINS)
    order = torch.sort(bins, dim=-1, stable=True).indices
    ordered = sizes.gather(-1, order)
    before = ordered.cumsum(-1) - ordered
    budget = budget.view(-1, 1, 1).to(torch.int64)
    taken = torch.minimum((budget - before).clamp_min(0), ordered)
    return torch.zeros_like(sizes).scatter(-1, order, taken)
