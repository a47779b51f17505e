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


# Bins of a partial far field's mass cut: 1/64 nat wide below the row's largest mass; masses 32
# nats or more below it share the last bin (the fused kernels count the same bins)
MASS_BINS = 2048
MASS_BINS_PER_NAT = 64.0


def select_band(mass: torch.Tensor, include: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The clusters of a partial far field: the included clusters of largest ``mass``, at most
    ``count`` per row, taken a bin of ``1 / MASS_BINS_PER_NAT`` nat at a time down from the
    row's largest mass; the bin that would pass ``count`` is left out whole (so ties never
    depend on cluster order, and a step needs no search below the bin: the fused kernels
    count the bins with many programs at once).

    Args:
        mass: ``[B, H_kv, C]``; include: ``[B, H_kv, C]`` bool; count: ``[B, H_kv]`` int.
    Returns:
        ``[B, H_kv, C]`` bool.
    """
    masked = mass.masked_fill(~include, NEG_INF)
    top = masked.amax(-1, keepdim=True)
    bins = ((top - masked) * MASS_BINS_PER_NAT).clamp(0, MASS_BINS - 1)
    bins = torch.where(include, bins, MASS_BINS - 1).to(torch.int64)  # (nan where excluded)
    counts = torch.zeros(*mass.shape[:-1], MASS_BINS, dtype=torch.int64, device=mass.device)
    counts.scatter_add_(-1, bins, include.to(torch.int64))
    # the first bin at which the running count passes `count` (MASS_BINS: none does)
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
    score: torch.Tensor, sizes: torch.Tensor, include: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Tokens taken from each cluster to fill the budget: whole clusters in descending score,
    then the rest of the budget from the next cluster (its first tokens), so no budget is left
    unused because the next cluster is larger than what remains.

    Precisely (the fused kernels' threshold rule): let ``b`` be the score of the first cluster,
    in descending score order, at which the running size exceeds the budget. Every included
    cluster scored above ``b`` is taken whole; the included cluster of score ``b`` with the
    lowest index gives ``min(rest, size)`` tokens, ``rest`` being the budget left; other
    clusters give none. When everything fits, every included cluster is taken whole.

    Args:
        score: ``[B, H_kv, C]``; sizes: ``[B, H_kv, C]`` int; include: ``[B, H_kv, C]`` bool.
        budget: ``[B]`` int tokens per KV head.
    Returns:
        ``[B, H_kv, C]`` int64, tokens taken per cluster.
    """
    include = include & (sizes > 0)
    sizes = torch.where(include, sizes, 0).to(torch.int64)
    ranked = score.masked_fill(~include, NEG_INF)
    sorted_score, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    budget = budget.view(-1, 1, 1).to(torch.int64)
    over = sizes.gather(-1, order).cumsum(-1) > budget
    spills = over.any(-1, keepdim=True)
    boundary_score = sorted_score.gather(-1, over.to(torch.int8).argmax(-1, keepdim=True))
    whole = include & ((ranked > boundary_score) | ~spills)
    taken = torch.where(whole, sizes, 0)
    # the boundary cluster: first in score order (lowest index) among those scored b
    boundary = order.gather(-1, (sorted_score > boundary_score).sum(-1, keepdim=True))
    rest = (budget - taken.sum(-1, keepdim=True)).clamp_min(0)
    part = torch.minimum(rest, sizes.gather(-1, boundary)) * spills
    return taken.scatter_add(-1, boundary, part)
