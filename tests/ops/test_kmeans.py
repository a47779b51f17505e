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


# ---------------------------------------------------------------------- Triton kernels


def _ragged(gen, device, dtype=torch.float32):
    """Three groups of 300 / 257 / 1 valid points (one-point group), 20 / 7 / 1 clusters, read
    through per-group bases from one store (with a gap between groups)."""
    from multipole.ops.kmeans import kernel as km

    g, n, d = 3, 300, 16
    x = _planted(gen, groups=g, centers=6, per=50, dim=d, spread=0.5)
    store = torch.cat([x, torch.randn(g, 7, d, generator=gen)], 1).to(dtype).to(device)
    npts = torch.tensor([300, 257, 1])
    kc = torch.tensor([20, 7, 1])
    init = torch.zeros(g, 20, d)
    for i in range(g):
        init[i, : kc[i]] = x[i, torch.randperm(int(npts[i]), generator=gen)[: kc[i]]]
    base = torch.arange(g) * (n + 7) * d
    pts = km.Points(store, base.to(device), npts.to(device), n)
    weights = (torch.arange(n) < npts[:, None]).float()
    return pts, store[:, :n].float().cpu(), weights, kc, init


def test_kernel_lloyd_matches_the_reference(gen, kernel_device):
    from multipole.ops.kmeans import kernel as km

    device = kernel_device
    pts, x, w, kc, init = _ragged(gen, device)
    labels, cent, sizes = km.lloyd(pts, init.clone().to(device), kc.to(device), 3)
    ref = kmeans(x, kc, 3, weights=w, init=init)
    labels, cent, sizes = labels.long().cpu(), cent.cpu(), sizes.cpu()
    # fp32 distances may round differently from the reference's matmul: compare invariants
    # and require near-total agreement
    assert (labels == ref.labels).float().mean() > 0.98
    assert (labels[w == 0] == -1).all() and (labels[w > 0] >= 0).all()
    means, counts = cluster_means(x, labels, w, 20)
    assert torch.equal(sizes, counts)
    live = counts > 0
    torch.testing.assert_close(cent[live], means[live], rtol=1e-5, atol=1e-5)
    for i, k in enumerate(kc.tolist()):
        assert int(labels[i].max()) < k and float(sizes[i, k:].sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_assignment_is_nearest(gen, kernel_device, dtype):
    """Labels and squared distances against the float32 reference on the same (rounded)
    points; 16-bit points meet the centroids in two 16-bit parts."""
    from multipole.ops.kmeans import kernel as km

    device = kernel_device
    pts, x, w, kc, _ = _ragged(gen, device, dtype)
    cent = torch.randn(3, 20, 16, generator=gen) * 3.0  # not representable in 16 bits
    labels, sqd = km.assign(pts, cent.to(device), kc.to(device, torch.int32))
    labels, sqd = labels.long().cpu(), sqd.cpu()
    nearest, ref_sqd = assign(x, cent, torch.arange(20) < kc[:, None])

    def dist(lab):
        return (x - cent.gather(1, lab.clamp_min(0)[..., None].expand(-1, -1, 16))).square().sum(-1)

    valid = w > 0
    assert (labels[~valid] == -1).all() and torch.isneginf(sqd[~valid]).all()
    assert (labels[valid] < kc[:, None].expand_as(labels)[valid]).all()
    assert (dist(labels)[valid] <= dist(nearest)[valid] + 1e-4).all()  # ties may differ
    torch.testing.assert_close(sqd[valid], ref_sqd[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_split_centroids_keep_about_16_bits(gen, kernel_device, dtype):
    """The assignment's operands: hi + lo within 2^-15 of each fp32 centroid (one 16-bit
    number: 2^-8 for bfloat16; float16's lo part is subnormal below 2^-14: 2^-24 apart),
    squared norms of the fp32 centroids."""
    import triton

    from multipole.ops.kmeans import kernel as km

    rows, d = 70, 24  # two programs of SPLIT_ROWS, the last partly full; d not a power of 2
    c = torch.randn(rows, d, generator=gen) * torch.logspace(-2, 2, rows).unsqueeze(1)
    c[-1, 0] = 7e4  # past float16's range: clamped, not inf
    c_dev = c.to(kernel_device)
    hi, lo = (torch.full((rows, d), float("nan"), dtype=dtype, device=kernel_device) for _ in "ab")
    c_sq = torch.full((rows,), float("nan"), device=kernel_device)
    top = torch.finfo(dtype).max
    km._split_kernel[(triton.cdiv(rows, km.SPLIT_ROWS),)](
        c_dev,
        hi,
        lo,
        c_sq,
        rows,
        HEAD_DIM=d,
        BLOCK_R=km.SPLIT_ROWS,
        BLOCK_D=32,
        SPLIT=True,
        PART_MAX=top,
    )
    both = hi.cpu().float() + lo.cpu().float()
    floor = 2.0**-24 if dtype == torch.float16 else 0.0
    in_range = c.abs() < torch.finfo(dtype).max
    assert torch.isfinite(hi.cpu().float()).all() and torch.isfinite(lo.cpu().float()).all()
    assert (((both - c).abs() <= c.abs() * 2.0**-15 + floor) | ~in_range).all()
    assert ((hi.cpu().float() - c).abs() > c.abs() * 2.0**-12).any()  # one part alone is not
    torch.testing.assert_close(c_sq.cpu()[:-1], c[:-1].square().sum(-1), rtol=1e-6, atol=0)


def test_kernel_reseeds_empty_clusters_and_means_of_values(gen, kernel_device):
    from multipole.ops.kmeans import kernel as km

    device = kernel_device
    pts, x, w, kc, _ = _ragged(gen, device, torch.float16)
    init = x[:, :1].expand(-1, 20, -1).clone() + 100.0  # every cluster but one starts empty
    labels, cent, sizes = km.lloyd(pts, init.to(device), kc.to(device), 4)
    for i, k in enumerate(kc.tolist()):
        assert (sizes[i, :k] > 0).all(), sizes[i]
    vm = km.member_means(pts, labels, kc.to(device), 20).cpu()
    means, counts = cluster_means(x, labels.long().cpu(), w, 20)
    torch.testing.assert_close(vm, torch.where(counts[..., None] > 0, means, 0.0))


@pytest.mark.parametrize("scan", [None, 64])
def test_kernel_member_means_over_several_cluster_tiles(gen, kernel_device, monkeypatch, scan):
    """Means and sizes with clusters over three tiles of the accumulation, uneven tiles (one
    empty for a group: its clusters get 0), padding points (labelled, still ignored) and
    several point splits, groups of one point and of none; ``scan``: members listed over
    several steps of that many labels."""
    from multipole.ops.kmeans import kernel as km

    if scan is not None:
        monkeypatch.setattr(km, "SCAN", scan)

    device, g, n, d, k = kernel_device, 4, 700, 16, 2 * km.BLOCK_K + km.BLOCK_K // 3
    x = torch.randn(g, n, d, generator=gen)
    npts = torch.tensor([700, 611, 1, 0])  # and groups of one point and of none
    skewed = torch.randint(km.BLOCK_K, (g, n), generator=gen)  # tile 0 holds most points
    labels = torch.where(
        torch.rand(g, n, generator=gen) < 0.7, skewed, torch.randint(k, (g, n), generator=gen)
    )
    labels[1] = labels[1] % (2 * km.BLOCK_K)  # group 1: the last tile is empty
    labels = labels.to(torch.int32)  # labelled padding too (past num_points): never counted
    pts = km.Points(x.to(device), (torch.arange(g) * n * d).to(device), npts.to(device), n)
    kc = torch.full((g,), k, dtype=torch.int32, device=device)
    got = km.member_means(pts, labels.to(device), kc, k).cpu()
    w = (torch.arange(n) < npts[:, None]).float()
    means, counts = cluster_means(x, labels.long(), w, k)
    tiles = counts.view(g, -1).split(km.BLOCK_K, dim=1)
    assert [int(t[0].sum() > 0) for t in tiles] == [1, 1, 1]  # group 0: every tile has members
    assert (counts[1, 2 * km.BLOCK_K :] == 0).all() and (counts == 0).any()
    torch.testing.assert_close(got, torch.where(counts[..., None] > 0, means, 0.0))


def test_kernel_priority_is_hash_uniform(kernel_device):
    from multipole.ops.kmeans import kernel as km

    device = kernel_device
    heads, starts = torch.tensor([0, 3, 7]), torch.tensor([5, 1000, 2**31 + 7])
    count = torch.tensor([10, 3, 20])
    prio = km.priority(2**32 + 12345, heads.to(device), starts.to(device), count.to(device), 20)
    prio = prio.cpu()
    for r in range(3):
        pos = starts[r] + torch.arange(int(count[r]))
        expect = hash_uniform(2**32 + 12345, heads[r].expand(int(count[r])), pos)
        assert torch.equal(prio[r, : count[r]], expect)
        assert torch.isneginf(prio[r, count[r] :]).all()
