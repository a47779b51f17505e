"""ClusterIndex invariants through prefill and many online updates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from multipole import MultipoleConfig, MultipoleState
from multipole.ops.kmeans import cluster_means

CFG = MultipoleConfig(interval=32, block_size=128, sink_tokens=4, centroid_ratio=1 / 8)


def check_invariants(state: MultipoleState) -> None:
    """Sizes = label histogram, centroids = member means, labels exactly on the middle region."""
    cfg, index = state.config, state.index
    n = max(state.seq_lens)
    labels = index.labels[:, :, :n]
    pos = torch.arange(n)
    for b, length in enumerate(state.clustered_len):
        recent = state.seq_lens[b] - cfg.sink_tokens - length
        if length:
            assert cfg.interval <= recent < 2 * cfg.interval, (b, recent)
        inside = (pos >= cfg.sink_tokens) & (pos < cfg.sink_tokens + length)
        assert (labels[b][:, inside] >= 0).all()
        assert (labels[b][:, ~inside] == -1).all()
        assert (labels[b] < index.level0.count[b]).all()
        sizes = index.level0.sizes[b]
        assert (sizes.sum(-1) == length).all()
        c = sizes.shape[-1]
        lab = labels[b].clone()
        for data, centroids in (
            (state.cluster_keys[b], index.level0.key_centroids[b]),
            (state.values[b], index.level0.value_centroids[b]),
        ):
            means, counts = cluster_means(data, lab, torch.ones_like(lab, dtype=torch.float32), c)
            assert torch.equal(counts.long(), sizes)
            live = counts > 0
            torch.testing.assert_close(centroids[live], means[live], rtol=1e-5, atol=1e-5)
        if index.level1 is not None:
            parent = index.parent[b, :, : index.level0.count[b]]
            live = sizes[:, : index.level0.count[b]] > 0
            assert (parent[live] >= 0).all()
            coarse = torch.zeros_like(index.level1.sizes[b])
            coarse.scatter_add_(1, parent.clamp_min(0), sizes[:, : index.level0.count[b]])
            assert torch.equal(coarse, index.level1.sizes[b])


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 64], ids=lambda t: f"append{t}")
def test_online_update_keeps_the_index_exact(gen, chunk, levels):
    cfg = dataclasses.replace(CFG, levels=levels)
    k = torch.randn(2, 2, 300, 16, generator=gen)
    v = torch.randn(2, 2, 300, 16, generator=gen)
    state = MultipoleState.prefill(k, v, cfg, lengths=[300, 90])
    check_invariants(state)
    frozen_seen = False
    for _ in range(max(1, 420 // chunk)):
        before_frozen = [s for s in state.index.open_block_start]
        level = state.index.level0
        snapshot = (
            state.index.labels.clone(),
            level.key_centroids.clone(),
            level.value_centroids.clone(),
            level.sizes.clone(),
        )
        nk = torch.randn(2, 2, chunk, 16, generator=gen)
        state.append(nk, torch.randn(2, 2, chunk, 16, generator=gen))
        for b, frozen_tokens in enumerate(before_frozen):
            # tokens of frozen blocks keep their labels; their clusters keep their centroids
            end = cfg.sink_tokens + frozen_tokens
            assert torch.equal(state.index.labels[b, :, :end], snapshot[0][b, :, :end])
            n_frozen = (
                int(snapshot[0][b, :, cfg.sink_tokens : end].max()) + 1 if frozen_tokens else 0
            )
            for now, before in zip(
                (level.key_centroids, level.value_centroids, level.sizes),
                snapshot[1:],
                strict=True,
            ):
                assert torch.equal(now[b, :, :n_frozen], before[b, :, :n_frozen])
            frozen_seen |= frozen_tokens > 0
    check_invariants(state)
    assert frozen_seen  # a block boundary was crossed
    assert state.clustered_len[1] > 256  # the short sequence grew across several intervals


def test_clusters_keep_the_configured_ratio(gen):
    k = torch.randn(1, 1, 1000, 8, generator=gen)
    state = MultipoleState.prefill(k, k, CFG)
    for _ in range(5):
        state.append(
            torch.randn(1, 1, 32, 8, generator=gen), torch.randn(1, 1, 32, 8, generator=gen)
        )
    length = state.clustered_len[0]
    blocks = [min(CFG.block_size, length - s) for s in range(0, length, CFG.block_size)]
    assert blocks == CFG.block_sizes(length)
    assert state.index.level0.count[0] == sum(CFG.clusters_for(n) for n in blocks)


def test_position_free_cluster_keys_drive_the_clusters(gen):
    # Clustering keys are what k-means sees; the attention keys only enter attention.
    ck = torch.randn(1, 1, 400, 8, generator=gen)
    k = torch.randn(1, 1, 400, 8, generator=gen)
    a = MultipoleState.prefill(k, k, CFG, cluster_keys=ck)
    b = MultipoleState.prefill(ck, k, CFG)
    assert torch.equal(a.index.labels, b.index.labels)
    with pytest.raises(ValueError, match="cluster_keys"):
        a.append(k[:, :, :1], k[:, :, :1])
    a.append(k[:, :, :1], k[:, :, :1], cluster_keys=ck[:, :, :1])


def test_attention_far_field_keys_are_member_means_of_attention_keys(gen):
    ck = torch.randn(1, 2, 400, 8, generator=gen)
    k = torch.randn(1, 2, 400, 8, generator=gen)
    cfg = dataclasses.replace(CFG, far_field_keys="attention")
    state = MultipoleState.prefill(k, k, cfg, cluster_keys=ck)
    att = state.index.level0.attention_key_centroids
    assert att is not None
    labels = state.index.labels[0]
    means, counts = cluster_means(k[0], labels, torch.ones(2, 400), att.shape[2])
    live = counts > 0
    torch.testing.assert_close(att[0][live], means[live], rtol=1e-5, atol=1e-5)


def test_seeds_follow_the_global_kv_head(gen):
    """Heads [2, 4) clustered alone with first_kv_head=2 (a tensor-parallel rank) give the
    same clusters as in the full 4-head tensor."""
    cfg = MultipoleConfig(interval=16, block_size=64, sink_tokens=2, token_budget=20)
    keys, values = (
        torch.randn(2, 4, 300, 8, generator=gen),
        torch.randn(2, 4, 300, 8, generator=gen),
    )
    q = torch.randn(2, 8, 8, generator=gen)
    full = MultipoleState.prefill(keys, values, cfg)
    shard = MultipoleState.prefill(keys[:, 2:], values[:, 2:], cfg, first_kv_head=2)
    assert torch.equal(shard.index.labels, full.index.labels[:, 2:])
    torch.testing.assert_close(shard.attend(q[:, 4:]), full.attend(q)[:, 4:])
    other = MultipoleState.prefill(keys[:, 2:], values[:, 2:], cfg)
    assert not torch.equal(other.index.labels, full.index.labels[:, 2:])
