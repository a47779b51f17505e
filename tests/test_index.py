"""ClusterIndex invariants through prefill and many online updates."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("levels", [1, 2])
def test_kmeans_kernels_build_the_same_index(gen, levels, kernel_device):
    """backend='triton': level-0 k-means on the Triton kernels (prefill and online updates,
    ragged batch): the index invariants hold and the clusters agree with the reference."""
    device = kernel_device
    cfg = dataclasses.replace(CFG, levels=levels)
    k = torch.randn(2, 1, 300, 8, generator=gen)
    v = torch.randn(2, 1, 300, 8, generator=gen)
    states = [
        MultipoleState.prefill(
            k.to(device), v.to(device), dataclasses.replace(cfg, backend=b), lengths=[300, 90]
        )
        for b in ("triton", "reference")
    ]
    for step in range(2):
        if step:
            nk = torch.randn(2, 1, 40, 8, generator=gen).to(device)
            nv = torch.randn(2, 1, 40, 8, generator=gen).to(device)
            for s in states:
                s.append(nk, nv)
        kern, ref = (s.index for s in states)
        check_invariants(_on_cpu(states[0]))
        assert kern.level0.count == ref.level0.count
        agree = (kern.labels == ref.labels).float().mean()
        assert agree > 0.97, agree  # ties and fp32 rounding of distances may differ


def _on_cpu(state: MultipoleState) -> MultipoleState:
    if state.device.type == "cpu":
        return state
    state = copy.deepcopy(state)
    for name in ("_keys", "_values", "_cluster_keys"):
        t = getattr(state, name)
        if t is not None:
            setattr(state, name, t.cpu().float())
    index = state.index
    index.labels = index.labels.cpu()
    for level in (index.level0, index.level1):
        if level is not None:
            for name in ("key_centroids", "value_centroids", "sizes"):
                setattr(level, name, getattr(level, name).cpu())
    if index.parent is not None:
        index.parent = index.parent.cpu()
    return state


class _Uncopyable:
    """Stands in for a captured CUDA graph, which cannot be copied."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle 'CUDAGraph' object")


def test_a_copied_state_drops_the_update_graphs(gen):
    """``copy.deepcopy`` of a state whose index holds update graphs (which write the original's
    stores): the copy starts with none, graphs still on, and updates like the original."""
    k = torch.randn(1, 2, 300, 16, generator=gen)
    state = MultipoleState.prefill(k, k, CFG)
    graphs = state.index.update_graphs
    graphs._graphs[torch.Size([14, 2])] = ((), _Uncopyable(), None)
    twin = copy.deepcopy(state)
    assert twin.index.update_graphs._graphs == {} and twin.index.update_graphs.enabled
    assert graphs._graphs  # the original keeps its own
    graphs._graphs.clear()
    new = torch.randn(1, 2, 2 * CFG.interval, 16, generator=gen)
    for s in (state, twin):
        s.append(new, new)
    assert twin.clustered_len == state.clustered_len > [300 - CFG.sink_tokens - 64]
    assert torch.equal(twin.index.labels, state.index.labels)


@pytest.mark.gpu
def test_online_update_on_the_kernels_does_not_sync(gen):
    """An append that runs an online update on the k-means kernels launches work only."""
    cfg = dataclasses.replace(CFG, backend="triton", interval=64, block_size=512)
    k = torch.randn(1, 4, 4 + 448 + 128, 64, generator=gen).to(torch.bfloat16).cuda()
    states = [MultipoleState.prefill(k[:, :, :-1], k[:, :, :-1], cfg) for _ in range(2)]
    q = torch.randn(1, 8, 64, generator=gen).to(torch.bfloat16).cuda()
    for state in states:
        state.attend(q)  # the kernels' layout, which the update then writes in place
    assert states[0].clustered_len == [448]
    states[0].append(k[:, :, -1:], k[:, :, -1:])  # compiles the kernels
    assert states[0].clustered_len == [512]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        states[1].append(k[:, :, -1:], k[:, :, -1:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert states[1].clustered_len == [512]
    check_invariants(_on_cpu(states[1]))
