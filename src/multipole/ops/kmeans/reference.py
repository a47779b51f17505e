"""Batched, masked, weighted Lloyd k-means: many independent problems in one call.

A *group* is one k-means problem (one block of one KV head of one sequence). Groups are padded
to a common number of points ``n`` (padding has weight 0) and of clusters ``K`` (clusters at
index >= ``num_clusters[g]`` are inactive). No Python loop runs over groups except to bound
memory (chunks of groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Upper bound on elements of one [groups, points, clusters] distance tensor.
_MAX_DISTANCE_ELEMENTS = 1 << 26
_MASK32 = 0xFFFFFFFF


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``[G, K, D]`` float32; each is the weighted mean of its members (an empty or
            inactive cluster keeps its last position and has size 0).
        labels: ``[G, n]`` int64 cluster of each point, ``-1`` for padding (weight 0).
        sizes: ``[G, K]`` float32 total weight of each cluster (tokens, for unit weights).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor


def hash_uniform(seed: int, *coords: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random numbers in [0, 1) from integer coordinates.

    The same ``(seed, coords)`` give the same number on every device and in every batch
    layout, so clustering a sequence does not depend on what else is in the batch.
    """
    h = torch.full_like(coords[0], seed & _MASK32, dtype=torch.int64)
    for c in (*coords, None):
        if c is not None:
            h = h ^ (c.to(torch.int64) & _MASK32)
        h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
        h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
        h = (h >> 16) ^ h
    return h.to(torch.float64).div(2.0**32).to(torch.float32)


def assign(
    points: torch.Tensor, centroids: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest active centroid of every point (ties go to the lower index).

    Args:
        points: ``[G, n, D]``; centroids: ``[G, K, D]``; active: ``[G, K]`` bool.
    Returns:
        ``labels [G, n]`` int64 and ``sq_dist [G, n]`` float32 squared distances.
    """
    x = points.float()
    c = centroids.float()
    # ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c); the bracket decides the argmin, in one op.
    c_sq = c.square().sum(-1).masked_fill(~active, float("inf")).unsqueeze(-2)  # [G, 1, K]
    partial = torch.baddbmm(c_sq, x, c.transpose(-1, -2), alpha=-2.0)  # [G, n, K]
    best, labels = partial.min(dim=-1)
    sq_dist = best + x.square().sum(-1)
    return labels, sq_dist.clamp_min(0.0)


def cluster_means(
    data: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-cluster means of ``data`` under ``labels``.

    Args:
        data: ``[G, n, D]``; labels: ``[G, n]`` (``-1`` = no cluster); weights: ``[G, n]``.
        num_slots: K, the number of cluster slots.
    Returns:
        ``means [G, K, D]`` float32 (0 for empty clusters) and ``sizes [G, K]`` float32.
    """
    g, _, d = data.shape
    w = torch.where(labels >= 0, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    idx = labels.clamp_min(0)
    sizes = torch.zeros(g, num_slots, dtype=torch.float32, device=data.device)
    sizes.scatter_add_(1, idx, w)
    sums = torch.zeros(g, num_slots, d, dtype=torch.float32, device=data.device)
    sums.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), data.float() * w.unsqueeze(-1))
    means = sums / sizes.clamp_min(1e-30).unsqueeze(-1)
    return means, sizes


def kmeans_objective(
    points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted sum of squared distances of points to their cluster's centroid, ``[G]``."""
    d = points.shape[-1]
    mine = centroids.float().gather(1, labels.clamp_min(0).unsqueeze(-1).expand(-1, -1, d))
    err = (points.float() - mine).square().sum(-1)
    w = torch.where(labels >= 0, weights.float(), torch.zeros_like(err))
    return (err * w).sum(-1)


def _reseed_empty(
    points: torch.Tensor,
    centroids: torch.Tensor,
    empty: torch.Tensor,
    sq_dist: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Move each empty active cluster onto a distinct point far from its current centroid."""
    n, k = points.shape[1], centroids.shape[1]
    far = sq_dist.masked_fill(~valid, float("-inf")).topk(min(k, n), dim=-1).indices
    rank = (empty.long().cumsum(-1) - 1).clamp(0, far.shape[1] - 1)
    source = far.gather(1, rank)
    seeds = points.float().gather(1, source.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return torch.where(empty.unsqueeze(-1), seeds, centroids)


def _kmeans_chunk(
    points: torch.Tensor,
    num_clusters: torch.Tensor,
    iters: int,
    weights: torch.Tensor,
    init: torch.Tensor,
) -> KMeansResult:
    k = init.shape[1]
    valid = weights > 0
    active = torch.arange(k, device=points.device) < num_clusters.unsqueeze(-1)
    centroids = init.float()
    for _ in range(iters):
        labels, sq_dist = assign(points, centroids, active)
        labels = labels.masked_fill(~valid, -1)
        means, sizes = cluster_means(points, labels, weights, k)
        centroids = torch.where((sizes > 0).unsqueeze(-1), means, centroids)
        centroids = _reseed_empty(points, centroids, active & (sizes == 0), sq_dist, valid)
    labels, _ = assign(points, centroids, active)
    labels = labels.masked_fill(~valid, -1)
    means, sizes = cluster_means(points, labels, weights, k)
    centroids = torch.where((sizes > 0).unsqueeze(-1), means, centroids)
    return KMeansResult(centroids, labels, sizes)


def kmeans(
    points: torch.Tensor,
    num_clusters: torch.Tensor,
    iters: int,
    *,
    weights: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    priority: torch.Tensor | None = None,
    num_slots: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means on many independent groups at once.

    Each iteration assigns every point to its nearest active centroid, moves every centroid to
    the weighted mean of its members and re-seeds empty clusters on far points. A final
    assignment follows, and the returned centroids are the member means of the returned
    labels, so sizes are exactly the label histogram. The objective never increases from one
    iteration to the next; for fixed inputs the result is deterministic.

    Args:
        points: ``[G, n, D]``.
        num_clusters: ``[G]`` int, clusters of each group (at most its number of valid points).
        iters: Lloyd iterations (>= 0).
        weights: ``[G, n]`` point weights; 0 marks padding. Default: all 1.
        init: ``[G, K, D]`` initial centroids. Exactly one of ``init`` / ``priority``.
        priority: ``[G, n]`` seeding scores: the ``num_clusters`` valid points of highest
            priority are the initial centroids (pass random numbers for random seeding).
        num_slots: with ``priority``, the number of cluster slots K (at least
            ``num_clusters.max()``); given, no host synchronisation reads that maximum.
    Returns:
        :class:`KMeansResult`.
    """
    if (init is None) == (priority is None):
        raise ValueError("kmeans: pass exactly one of init= or priority=")
    g, n, d = points.shape
    if g == 0:
        k = 0 if init is None else init.shape[1]
        return KMeansResult(
            points.new_zeros(0, k, d, dtype=torch.float32),
            torch.zeros(0, n, dtype=torch.int64, device=points.device),
            points.new_zeros(0, k, dtype=torch.float32),
        )
    if weights is None:
        weights = torch.ones(g, n, dtype=torch.float32, device=points.device)
    if init is None:
        assert priority is not None
        k = max(int(num_clusters.max()) if num_slots is None else num_slots, 1)
        seed_order = priority.masked_fill(weights <= 0, float("-inf")).topk(min(k, n), dim=-1)
        init = points.float().gather(1, seed_order.indices.unsqueeze(-1).expand(-1, -1, d))
    k = init.shape[1]
    step = max(1, _MAX_DISTANCE_ELEMENTS // max(1, n * k))
    parts = [
        _kmeans_chunk(
            points[i : i + step],
            num_clusters[i : i + step],
            iters,
            weights[i : i + step],
            init[i : i + step],
        )
        for i in range(0, g, step)
    ]
    if len(parts) == 1:
        return parts[0]
    return KMeansResult(
        torch.cat([p.centroids for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.sizes for p in parts]),
    )
