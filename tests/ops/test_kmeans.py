"""k-means reference: assignment, means, monotone objective, re-seeding, determinism."""

from __future__ import annotations

import pytest
import torch

from multipole.ops.kmeans import assign, cluster_means, hash_uniform, kmeans, kmeans_objective


def _planted(gen, groups=3, centers=6, per=20, dim=8, spread=0.05):
    c = torch.randn(groups, centers, dim, generator=gen) * 3
    which = torch.arange(centers).repeat_interleave(per)
    x = c[:, which] + spread * torch.randn(groups, centers * per, dim, generator=gen)
    perm = torch.randperm(centers * per, generator=gen)
    return x[:, perm]


def _random_priority(gen, g, n):
    return torch.rand(g, n, generator=gen)


@pytest.mark.parametrize("weighted", [False, True], ids=["unit", "weighted"])
def test_converged_labels_are_nearest_and_centroids_are_member_means(gen, weighted):
    x = _planted(gen)
    g, n, _ = x.shape
    w = torch.randint(1, 5, (g, n), generator=gen).float() if weighted else torch.ones(g, n)
    k = torch.full((g,), 6)
    res = kmeans(x, k, 30, weights=w, priority=_random_priority(gen, g, n))
    nearest, _ = assign(x, res.centroids, torch.ones(g, 6, dtype=torch.bool))
    assert torch.equal(res.labels, nearest)
    means, sizes = cluster_means(x, res.labels, w, 6)
    live = sizes > 0
    torch.testing.assert_close(res.centroids[live], means[live], rtol=1e-5, atol=1e-5)
    assert torch.equal(res.sizes, sizes)
    assert torch.allclose(res.sizes.sum(-1), w.sum(-1))


def test_centroids_are_member_means_of_returned_labels_without_convergence(gen):
    x = torch.randn(4, 300, 16, generator=gen)
    res = kmeans(x, torch.tensor([20, 7, 1, 33]), 2, priority=_random_priority(gen, 4, 300))
    means, sizes = cluster_means(x, res.labels, torch.ones(4, 300), res.centroids.shape[1])
    live = sizes > 0
    torch.testing.assert_close(res.centroids[live], means[live], rtol=1e-5, atol=1e-5)
    # clusters past num_clusters are never used
    assert int(res.labels[1].max()) < 7 and int(res.labels[2].max()) == 0


def test_objective_never_increases_over_iterations(gen):
    x = torch.randn(3, 400, 8, generator=gen)
    prio = _random_priority(gen, 3, 400)
    k = torch.tensor([25, 10, 40])
    objectives = []
    for iters in range(0, 8):
        res = kmeans(x, k, iters, priority=prio)
        objectives.append(kmeans_objective(x, res.centroids, res.labels, torch.ones(3, 400)))
    stacked = torch.stack(objectives)  # [iters, G]
    assert (stacked[1:] <= stacked[:-1] * (1 + 1e-6) + 1e-6).all(), stacked


def test_empty_clusters_are_reseeded(gen):
    # All initial centroids on one far point: every cluster but the first starts empty.
    x = torch.randn(2, 200, 4, generator=gen)
    init = x[:, :1].expand(-1, 8, -1).clone() + 100.0
    res = kmeans(x, torch.tensor([8, 8]), 5, init=init)
    assert (res.sizes > 0).all(), res.sizes


def test_padding_points_are_ignored(gen):
    x = torch.randn(2, 100, 8, generator=gen)
    w = torch.ones(2, 100)
    w[:, 60:] = 0
    garbage = x.clone()
    garbage[:, 60:] = 1e6
    prio = _random_priority(gen, 2, 100)
    a = kmeans(x, torch.tensor([5, 5]), 4, weights=w, priority=prio)
    b = kmeans(garbage, torch.tensor([5, 5]), 4, weights=w, priority=prio)
    assert (a.labels[:, 60:] == -1).all()
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centroids, b.centroids)


def test_deterministic_for_a_given_seed(gen):
    x = torch.randn(2, 256, 8, generator=gen)
    positions = torch.arange(256).expand(2, -1)
    heads = torch.arange(2).unsqueeze(1)
    runs = [
        kmeans(x, torch.tensor([16, 16]), 5, priority=hash_uniform(seed, heads, positions))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0].labels, runs[1].labels)
    assert torch.equal(runs[0].centroids, runs[1].centroids)
    assert not torch.equal(runs[0].labels, runs[2].labels)


def test_hash_uniform_is_uniform_and_layout_free():
    pos = torch.arange(100_000)
    u = hash_uniform(3, torch.zeros_like(pos), pos)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    torch.testing.assert_close(hash_uniform(3, torch.tensor([0]), pos[500:501]), u[500:501])


def test_no_groups_returns_empty():
    res = kmeans(
        torch.zeros(0, 10, 4), torch.zeros(0, dtype=torch.int64), 3, init=torch.zeros(0, 2, 4)
    )
    assert res.labels.shape == (0, 10) and res.centroids.shape == (0, 2, 4)
