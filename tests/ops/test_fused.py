"""Fused Triton decode step against the float32 reference path (interpreter on CPU, GPU too)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from multipole import MultipoleConfig, MultipoleState, dense_attention

triton = pytest.importorskip("triton")


BASE = MultipoleConfig(interval=32, block_size=256, sink_tokens=4, token_budget=96)
# output tolerance vs the reference path on the same values, per cache dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _planted(gen, b, h, n, d, dtype):
    """Keys near a few directions (so clusters matter), random values, queries along keys."""
    centers = torch.randn(h, 12, d, generator=gen)
    which = torch.randint(12, (b, h, n), generator=gen)
    keys = 2.5 * centers[torch.arange(h).view(1, h, 1), which] + torch.randn(
        b, h, n, d, generator=gen
    )
    values = torch.randn(b, h, n, d, generator=gen)
    return keys.to(dtype), values.to(dtype)


def _run(state: MultipoleState, q: torch.Tensor, backend: str) -> torch.Tensor:
    state.config = dataclasses.replace(state.config, backend=backend)
    return state.attend(q)


CASES = [
    # (batch, lengths, kv heads, group, head dim, dtype, far_field_share (None: no far
    # field), budget)
    (2, [1500, 1100], 2, 4, 32, torch.float32, 1.0, 96),
    (2, [1500, 1100], 2, 4, 32, torch.float32, None, 96),
    (2, [1500, 1100], 2, 4, 32, torch.float32, 0.1, 96),  # a partial far field
    (3, [700, 1, 333], 1, 8, 64, torch.float32, 1.0, 48),  # MQA, a one-token sequence
    (3, [700, 1, 333], 1, 8, 64, torch.float32, 0.3, 48),
    (1, [900], 4, 1, 16, torch.float16, 1.0, 200),  # MHA
    (1, [900], 4, 1, 16, torch.float16, 0.5, 200),
    (2, [640, 999], 2, 2, 32, torch.float32, 1.0, 10**6),  # budget >= context: dense
    (2, [640, 999], 2, 2, 32, torch.float32, 0.3, 10**6),  # (no cluster left, no boundary)
    (1, [800], 2, 4, 32, torch.float32, 1.0, 0),  # nothing selected: far field only
    (1, [800], 2, 4, 32, torch.float32, 0.2, 0),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[
        f"B{c[0]}-T{max(c[1])}-Hkv{c[2]}-G{c[3]}-D{c[4]}-{str(c[5])[6:]}-far{c[6]}-bud{c[7]}"
        for c in CASES
    ],
)
def test_fused_matches_reference(gen, case, kernel_device):
    b, lengths, h, g, d, dtype, share, budget = case
    device = kernel_device
    k, v = _planted(gen, b, h, max(lengths), d, dtype)
    cfg = dataclasses.replace(
        BASE, replacement=share is not None, far_field_share=share or 1.0, token_budget=budget
    )
    state = MultipoleState.prefill(k.to(device), v.to(device), cfg, lengths=lengths)
    q = (torch.randn(b, h * g, d, generator=gen) * 2).to(dtype).to(device)
    # The kernels read centroids in the cache dtype: give the reference the same rounding, so
    # both select the same clusters (not only nearly the same output).
    level = state.index.level0
    level.key_centroids = level.key_centroids.to(dtype).float()
    level.value_centroids = level.value_centroids.to(dtype).float()
    ref = _run(state, q, "reference")
    ref_reads = state._reads
    out = _run(state, q, "triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < REL_TOL[dtype]
    for name in ("tokens_exact", "clusters_selected", "metadata_bytes"):
        got, expected = getattr(state._reads, name), getattr(ref_reads, name)
        assert got.cpu().tolist() == expected.cpu().tolist(), name
    filled = [n - c + min(budget, c) for n, c in zip(lengths, state.clustered_len, strict=True)]
    assert ref_reads.tokens_exact.cpu().tolist() == [[t] * h for t in filled]
    if budget >= max(lengths):
        assert rel_err(out, dense_attention(q, k.to(device), v.to(device), lengths=lengths)) < 1e-5


@pytest.mark.parametrize("share", [1.0, 0.2])
def test_fused_follows_appends_and_online_updates(gen, kernel_device, share):
    device = kernel_device
    k, v = _planted(gen, 2, 2, 600, 32, torch.float32)
    cfg = dataclasses.replace(BASE, far_field_share=share)
    state = MultipoleState.prefill(k.to(device), v.to(device), cfg, lengths=[600, 450])
    for _ in range(3):
        nk, nv = _planted(gen, 2, 2, 40, 32, torch.float32)
        state.append(nk.to(device), nv.to(device))
        q = torch.randn(2, 8, 32, generator=gen).to(device)
        ref = _run(state, q, "reference")
        ref_tokens = state._reads.tokens_exact.cpu()
        assert rel_err(_run(state, q, "triton"), ref) < 1e-5
        assert torch.equal(state._reads.tokens_exact.cpu(), ref_tokens.to(torch.int32))


def test_stats_after_an_updating_append_describe_the_last_attend(gen, kernel_device):
    """The layout is written in place at an online update; ``stats()`` read before the next
    attend still reports what the last attend read (not the new index's centroid counts)."""
    device = kernel_device
    k, v = _planted(gen, 1, 2, 600, 32, torch.float32)
    state = MultipoleState.prefill(
        k.to(device), v.to(device), dataclasses.replace(BASE, backend="triton")
    )
    state.attend(torch.randn(1, 8, 32, generator=gen).to(device))
    before = state.stats()
    clustered = list(state.clustered_len)
    while state.clustered_len == clustered:  # one token at a time, up to the next update
        state.append(*(t.to(device) for t in _planted(gen, 1, 2, 1, 32, torch.float32)))
    after = state.stats()
    assert dataclasses.replace(after, dense_bytes=before.dense_bytes) == before
    state.attend(torch.randn(1, 8, 32, generator=gen).to(device))
    assert state.stats().centroids_scored > before.centroids_scored  # the update's clusters


def _same_layout(layout, fresh) -> None:
    """``layout`` (with room) holds what ``fresh`` (just built) holds: clusters, their order of
    positions, lengths and budgets; its clusters past ``fresh``'s are empty."""
    c = min(layout.sizes.shape[-1], fresh.sizes.shape[-1])
    for big in (layout, fresh):
        assert not big.sizes[..., c:].any()
    assert torch.equal(layout.sizes[..., :c], fresh.sizes[..., :c])
    assert torch.equal(layout.offsets[..., :c], fresh.offsets[..., :c])
    assert torch.equal(layout.live, fresh.live)
    live = fresh.sizes[..., :c] > 0
    for name in ("key_centroids", "value_centroids"):
        a, b = getattr(layout, name)[..., :c, :], getattr(fresh, name)[..., :c, :]
        assert torch.equal(a[live], b[live]), name
    for row, total in enumerate(fresh.sizes.sum(-1).view(-1).tolist()):
        a, b = layout.order.flatten(0, 1)[row], fresh.order.flatten(0, 1)[row]
        assert torch.equal(a[:total], b[:total])
    for name in ("clustered_len", "budget"):
        assert torch.equal(getattr(layout, name), getattr(fresh, name)), name
    assert (layout.lengths, layout.budgets) == (fresh.lengths, fresh.budgets)
    for name, t in layout.workspace.items():  # e.g. a partial far field's cluster count
        assert torch.equal(t, layout._makers[name](layout)), name


def test_layout_is_written_in_place_across_online_updates(gen, kernel_device, monkeypatch):
    """Online updates write the kernels' layout in place (the same tensors: a decode step
    captured as a CUDA graph stays valid) while it has room, and build it anew when not; it
    always holds what a layout built for the index holds (the rows updated at a step written
    alone, the others kept), and the fused step equals the reference. Updates run before
    their append (``advance_before_append``, as graphed steps do) leave the same index as
    those the append runs."""
    import multipole.state as state_mod
    from multipole.fused import FusedLayout

    monkeypatch.setattr(state_mod, "LAYOUT_ROOM_UPDATES", 2)
    device = kernel_device
    cfg = dataclasses.replace(
        BASE, interval=16, token_budget=0.1, far_field_share=0.2, backend="triton"
    )
    k, v = _planted(gen, 2, 2, 420, 32, torch.float32)
    state, twin = (
        MultipoleState.prefill(k.to(device), v.to(device), cfg, lengths=[420, 391])
        for _ in range(2)
    )
    q = torch.randn(2, 8, 32, generator=gen).to(device)
    state.attend(q)
    layouts, pointers, updates, one_row = [state._fused], set(), 0, 0
    for _ in range(5 * cfg.interval):
        before = list(state.clustered_len)
        if state.appends_before_update() == 0:
            state.advance_before_append()
            assert state.appends_before_update() > 0
        nk, nv = (t.to(device) for t in _planted(gen, 2, 2, 1, 32, torch.float32))
        state.append(nk, nv)
        twin.append(nk, nv)
        assert state.clustered_len == twin.clustered_len
        assert torch.equal(state.index.labels, twin.index.labels)
        assert torch.equal(state.index.level0.key_centroids, twin.index.level0.key_centroids)
        if state.clustered_len == before:
            continue
        updates += 1
        one_row += sum(a != b for a, b in zip(state.clustered_len, before, strict=True)) == 1
        layout = state._fused
        if layout is layouts[-1]:  # written in place
            pointers.add(tuple(t.data_ptr() for t in (layout.order, layout.sizes, layout.budget)))
        else:
            layouts.append(layout)
        fresh = FusedLayout.build(
            state.index, state.dtype, state.clustered_len, state._fused_budget, 0
        )
        _same_layout(layout, fresh)
        q = torch.randn(2, 8, 32, generator=gen).to(device)
        ref = _run(state, q, "reference")
        assert rel_err(_run(state, q, "triton"), ref) < 1e-5
        assert state._fused is layout  # the step found it current
    assert updates >= 5 and one_row >= 2  # ragged: rows refreshed alone too
    assert 2 <= len(layouts) <= updates // 2 + 1  # built anew once its room (2 updates) is used
    assert len(pointers) >= 2


def test_fused_on_a_non_contiguous_cache_and_a_huge_budget(gen, kernel_device):
    device = kernel_device
    k, v = _planted(gen, 1, 2, 700, 32, torch.float32)
    k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v  # same values, other strides
    cfg = dataclasses.replace(BASE, token_budget=10**9)
    state = MultipoleState.prefill(k.to(device), v.to(device), cfg)
    q = torch.randn(1, 8, 32, generator=gen).to(device)
    dense = dense_attention(q, k.to(device), v.to(device))
    assert rel_err(_run(state, q, "triton"), dense) < 1e-5
    state.config = dataclasses.replace(cfg, token_budget=0, backend="triton")  # config change
    assert rel_err(state.attend(q), _run(state, q, "reference")) < 1e-5


@pytest.mark.gpu
def test_decode_steps_do_not_sync_with_the_host(gen):
    """append + attend between online updates launch work only: no device-to-host sync."""
    cfg = dataclasses.replace(BASE, backend="triton")
    k, v = _planted(gen, 2, 2, 4 + 320 + 32, 64, torch.bfloat16)  # recent window = interval
    state = MultipoleState.prefill(k.cuda(), v.cuda(), cfg)
    q = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16).cuda()
    new = [[t.cuda() for t in _planted(gen, 2, 2, 1, 64, torch.bfloat16)] for _ in range(3)]
    state.attend(q)  # builds the kernel layout once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for nk, nv in new:
            state.append(nk, nv)
            state.attend(q)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert state.clustered_len == [320, 320]  # no update ran in between


@pytest.mark.gpu
@pytest.mark.parametrize("share", [1.0, 0.05])
def test_a_captured_step_replays_the_eager_step(gen, share, monkeypatch):
    """The step captured as a CUDA graph (with a partial far field, a fork to a second stream
    and a join; each kernel launched while its predecessor finishes, on Hopper) replays, bit
    for bit, what the eager step computes on one stream with plain and with dependent
    launches, and on two streams with dependent launches, for new query values each time;
    large enough that the second stream's kernels still run while the expansion does."""
    from multipole import fused
    from multipole.bench.kernels import graph_of

    cfg = dataclasses.replace(
        BASE, backend="triton", block_size=8192, token_budget=0.05, far_field_share=share
    )
    k, v = _planted(gen, 4, 2, 16384, 128, torch.bfloat16)
    state = MultipoleState.prefill(k.cuda(), v.cuda(), cfg)
    q = torch.randn(4, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    out = torch.empty_like(q)
    monkeypatch.setattr(fused, "TUNING", fused.Tuning(dependent_launch=True))
    replay = graph_of(lambda: out.copy_(state.attend(q)))
    previous = out.clone()
    for _ in range(3):
        q.copy_(torch.randn(4, 8, 128, generator=gen) * 2)
        replay()
        for streams, dependent in ((False, False), (False, True), (True, True)):
            eager = fused.Tuning(band_beside_expansion=streams, dependent_launch=dependent)
            monkeypatch.setattr(fused, "TUNING", eager)
            assert torch.equal(out, state.attend(q))
        assert out.isfinite().all() and not torch.equal(out, previous)  # the new query's
        previous = out.clone()


TUNINGS = {
    # a selection over many chunks, many small exact-pass programs with 32-slot tiles,
    # one-tile expansion programs, small centroid tiles and partial far-field chunks; one long
    # exact-pass and one expansion program per row, large centroid tiles, one selection chunk
    "tiles": dict(
        select_chunk=16,
        block_n=32,
        keys_only_block_n=32,
        exact_programs_per_sm=8,
        expand_programs_per_sm=64,
        centroid_block=16,
        keys_only_block=16,
        band_chunk=64,
    ),
    "long": dict(
        exact_min_split=4096,
        centroid_programs_per_sm=1,
        keys_only_programs_per_sm=1,
        expand_programs_per_sm=1,
        centroid_block=128,
        keys_only_block=128,
        select_chunk=1024,
    ),
}


@pytest.mark.parametrize("share", [1.0, 0.3], ids=["far1", "far0.3"])
@pytest.mark.parametrize("name", list(TUNINGS))
def test_launch_variants_match_reference(gen, name, share, monkeypatch, kernel_device):
    """Many small clusters (ratio 1/2), so one tile of the exact pass holds tokens of many
    clusters and the selected list is longer than a window (with a partial far field: the
    masses written and counted over several tiles and chunks)."""
    from multipole import fused

    monkeypatch.setattr(fused, "TUNING", fused.Tuning(**TUNINGS[name]))
    device = kernel_device
    cfg = dataclasses.replace(BASE, centroid_ratio=0.5, token_budget=300, far_field_share=share)
    k, v = _planted(gen, 2, 1, 560, 16, torch.float32)
    state = MultipoleState.prefill(k.to(device), v.to(device), cfg, lengths=[560, 523])
    for _ in range(2):  # a second step: counters and histograms were left for it
        q = (torch.randn(2, 4, 16, generator=gen) * 2).to(device)
        ref = _run(state, q, "reference")
        ref_reads = state._reads
        out = _run(state, q, "triton")
        assert rel_err(out, ref) < 1e-5
        assert torch.equal(state._reads.tokens_exact.cpu(), ref_reads.tokens_exact.cpu().int())
        assert torch.equal(
            state._reads.clusters_selected.cpu(), ref_reads.clusters_selected.cpu().int()
        )
    assert int(ref_reads.clusters_selected.min()) > 128  # longer than a window of the list


def _selection_layout(gen, kind: str, b: int, h: int, c: int, d: int, sink: int, device):
    """A :class:`FusedLayout` (on ``device``) of ``c`` clusters (some empty) over ``sink + n``
    positions, and a lookup query. ``kind``: "spread" (random centroids), "ties" (20 distinct
    centroids, so equal scores), "far" (5 dominant clusters; the others score > 32 nats below
    the best, in the histogram's last bin)."""
    from multipole.fused import FusedLayout

    sizes = torch.randint(1, 12, (c,), generator=gen)
    sizes[::17] = 0  # empty clusters
    sizes = sizes[torch.stack([torch.randperm(c, generator=gen) for _ in range(b * h)])]
    sizes = sizes.view(b, h, c)
    n = int(sizes[0, 0].sum())
    q = torch.randn(b, h, 4, d, generator=gen)
    kc = torch.randn(b, h, c, d, generator=gen)
    if kind == "ties":
        kc = kc[:, :, torch.randint(20, (c,), generator=gen)]
    if kind == "far":  # one query direction u; z = 60 for the first 5 clusters, ~N(0, 1) else
        u = q[:, :, :1]
        q = u + 0.01 * q
        kc[:, :, :5] = 60 * d**0.5 * u / u.square().sum(-1, keepdim=True)
    labels = torch.repeat_interleave(torch.arange(c).expand(b * h, c), sizes.view(-1, c).flatten())
    labels = labels.view(b, h, n)[..., torch.randperm(n, generator=gen)]  # clustered positions
    order = sink + torch.sort(labels, dim=-1, stable=True).indices
    order = torch.cat([order, torch.arange(sink).expand(b, h, sink)], -1).to(torch.int32)
    sizes = sizes.to(torch.int32)
    tensors = dict(
        key_centroids=kc,
        value_centroids=torch.randn(b, h, c, d, generator=gen),
        sizes=sizes,
        offsets=sizes.cumsum(-1, dtype=torch.int32) - sizes,
        order=order,
        live=(sizes > 0).sum(-1),
    )
    layout = FusedLayout(**{name: t.to(device) for name, t in tensors.items()})
    return layout, q, n


def _budgets_at_exact_ends(
    score: torch.Tensor, sizes: torch.Tensor, top: float, tied: bool
) -> torch.Tensor:
    """Per sequence (from its first head, in ``take_by_budget``'s order), a budget that ends
    exactly where a cluster ends with another of its score bin after it (sequences 0 and 1;
    ``tied``: there must be such a bin), where a bin ends (2: nothing left of the boundary bin),
    then nothing (3) and everything (4)."""
    from multipole.ops.lookup.reference import bins_below

    budgets = []
    for seq in range(3):
        live = sizes[seq, 0] > 0
        bins = torch.where(live, bins_below(top, score[seq, 0]), 1 << 20)
        order = torch.sort(bins, stable=True).indices[: int(live.sum())]
        ends = sizes[seq, 0][order].cumsum(0)
        same_bin = bins[order][1:] == bins[order][:-1]  # the next cluster is in the same bin
        inside, at_bin_end = ends[:-1][same_bin], ends[:-1][~same_bin]
        assert len(inside) or not tied, "no bin holds two clusters"
        pick = inside if seq < 2 and len(inside) else at_bin_end
        budgets.append(int(pick[len(pick) // (2 + seq)]))
    return torch.tensor(budgets + [0, int(sizes[4, 0].sum())])


@pytest.mark.parametrize("partial", [False, True], ids=["far1", "partial"])
@pytest.mark.parametrize("chunk", [512, 64, 16])
@pytest.mark.parametrize("kind", ["spread", "ties", "far"])
def test_selection_takes_clusters_by_score_to_the_budget(gen, kind, chunk, partial, kernel_device):
    """The kernels' selection is ``take_by_budget`` on their own scores, token for token, for
    budgets from nothing to everything (one per sequence), then budgets that end exactly at a
    cluster's or a bin's end, over one chunk of clusters or many (the crossing of the budget
    then in a chunk before, at or after a program's own); the expansion lists the taken
    clusters' tokens in order; the score histogram is left cleared for the next step. With a
    partial far field also the masses of the clusters with tokens left, their largest and the
    one cluster taken in part (reset when a step has none)."""
    from multipole import fused
    from multipole.ops.lookup.reference import take_by_budget

    b, h, c, d, sink, dev = 5, 2, 300, 16, 4, kernel_device
    layout, q, n = _selection_layout(gen, kind, b, h, c, d, sink, dev)
    budget = torch.tensor([0, n * 3 // 100, n * 2 // 5, n * 97 // 100, n])
    keys, values = torch.randn(2, b, h, sink + n, d, generator=gen).to(dev)
    lengths = torch.full((b,), sink + n)
    q = q.to(dev)
    far_count = torch.full((b, h), 12, dtype=torch.int32, device=dev) if partial else None
    tuning = fused.Tuning(select_chunk=chunk)
    sizes = layout.sizes.cpu().long()
    everything = torch.ones_like(sizes, dtype=torch.bool)
    for step in range(2):  # the second step must not see the first step's histogram or part
        fused.fused_decode(
            q,
            q,
            keys,
            values,
            layout,
            lengths.to(dev),
            torch.full((b,), n).to(dev),
            budget.to(dev),
            max_budget=n,
            sink_tokens=sink,
            max_recent=0,
            scale=d**-0.5,
            replacement=True,
            far_count=far_count,
            tuning=tuning,
        )
        scratch = {k: t.cpu() for k, t in layout.scratch.items()}
        assert not scratch["hist"].any()
        score = scratch["score"].view(b, h, c)
        expect = take_by_budget(score, sizes, everything, budget, math.log(4))
        # the expansion: selected slot after slot, each taken cluster's first tokens in order
        order, offsets = layout.order.cpu().view(b * h, -1), layout.offsets.cpu().view(b * h, c)
        for row, want in enumerate(expect.view(b * h, c)):
            used = int(scratch["count"][row]) - sink
            clusters = want.nonzero().flatten()
            positions = [order[row, :0]]
            positions += [order[row, offsets[row, x] : offsets[row, x] + want[x]] for x in clusters]
            assert used == int(want.sum())
            assert int(scratch["num_selected"][row]) == len(clusters)
            assert torch.equal(scratch["pos"][row, :used], torch.cat(positions).to(torch.int32))
            if not partial:
                assert torch.equal(
                    scratch["cluster"][row, :used].long(),
                    clusters.repeat_interleave(want[clusters]),
                )
        # the budget is used to the last token (or everything is taken), at most one in part
        assert expect.sum(-1).tolist() == [[int(x)] * h for x in budget]
        in_part = (expect > 0) & (expect < sizes)
        assert (in_part.sum(-1) <= 1).all()
        if partial:
            left = sizes - expect
            mass = torch.where(left > 0, score + torch.log(left.float()), float("-inf"))
            got = scratch["mass"].view(b, h, c)
            torch.testing.assert_close(got, mass, rtol=1e-6, atol=1e-6)  # (log's last bit)
            assert torch.equal(scratch["mass_top"].view(b, h), got.amax(-1))
            for row, part in enumerate(in_part.view(b * h, c)):
                want = [-1, 0, 0]
                if part.any():
                    x = int(part.nonzero())
                    taken = expect.view(b * h, c)[row]
                    want = [x, int(taken[:x].sum()), int(taken[x])]
                assert scratch["boundary"][row].tolist() == want
        if step == 0:
            budget = _budgets_at_exact_ends(score, sizes, math.log(4), kind == "ties")
    assert not in_part[:4, 0].any()  # the exact ends: no cluster in part


@pytest.mark.parametrize("chunk", [16, 64], ids=["chunks4", "chunk1"])
def test_partial_far_field_keeps_the_bins_of_largest_mass(gen, kernel_device, chunk):
    """``_band_hist_kernel`` and ``_band_far_field_kernel`` keep what the reference's
    ``select_band`` keeps (masses with many ties, values spread past the bins' range, rows
    asking for more clusters than have tokens left, a row with none left), add exactly their
    far field, and hand the partly taken cluster's logits to the exact pass (``-inf`` when
    outside the far field)."""
    from multipole.ops.lookup import select_band
    from multipole.ops.lookup.kernel import _band_far_field_kernel, _band_hist_kernel
    from multipole.ops.lookup.reference import BINS, BINS_PER_NAT

    rows, clusters, group, d = 5, 50, 3, 16
    # ties on a coarse grid, and values spread over more than the bins' range
    mass = torch.randint(0, 6, (rows, clusters), generator=gen).float() * 0.5 - 1.0
    spread = torch.rand(rows, clusters, generator=gen) < 0.4
    mass[spread] = torch.randn(int(spread.sum()), generator=gen) * 30
    mass[torch.rand(rows, clusters, generator=gen) < 0.2] = float("-inf")  # nothing left
    mass[3] = float("-inf")
    mass[0, 7] = 100.0  # alone in its bin: row 0 (one cluster asked for) keeps it
    left = mass > float("-inf")
    want = torch.tensor([1, 7, 50, 3, 20], dtype=torch.int32)
    z = torch.randn(rows, group, clusters, generator=gen)
    vc = torch.randn(rows, clusters, d, generator=gen)
    sizes = torch.randint(1, 9, (rows, clusters), generator=gen, dtype=torch.int32)
    top = mass.amax(-1)  # as the selection writes it (-inf for row 3: nothing left)
    hist = torch.full((rows, BINS), 0, dtype=torch.int32)
    dev = kernel_device
    zk, histk = z.clone().to(dev), hist.to(dev)
    mass_k, top_k = mass.to(dev), top.to(dev)
    _band_hist_kernel[(rows, -(-clusters // chunk))](
        mass_k, top_k, histk, clusters, BINS_PER_NAT, BINS=BINS, CHUNK=chunk
    )
    # the partly taken cluster of each row (-1: none), in and out of the far field; its first
    # slot and tokens taken
    expected = select_band(mass[:, None], left[:, None], want[:, None].long())[:, 0]
    outside = left & ~expected
    boundary_ids = [
        -1,
        int(expected[1].nonzero()[-1]),
        int(expected[2].nonzero()[0]),  # (row 2 asks for every cluster)
        0,  # (row 3 has nothing left)
        int(outside[4].nonzero()[0]),
    ]
    boundary = torch.tensor([[c, 5, 2] for c in boundary_ids], dtype=torch.int32).to(dev)
    boundary_z = torch.full((rows, group), float("nan"), device=dev)
    first, splits = 1, -(-clusters // chunk)  # partial states after one (unused) exact slot
    members = torch.full((rows, clusters), -1, dtype=torch.int32, device=dev)
    slots = first + splits
    m_e = torch.full((rows, slots, group), float("nan"), device=dev)
    l_e, acc_e = m_e.clone(), torch.full((rows, slots, group, d), float("nan"), device=dev)
    _band_far_field_kernel[(rows, splits)](
        zk,
        vc.to(dev),
        sizes.to(dev),
        mass_k,
        top_k,
        histk,
        want.to(dev),
        boundary,
        boundary_z,
        members,
        m_e,
        l_e,
        acc_e,
        clusters,
        group,
        first,
        slots,
        BINS_PER_NAT,
        HEAD_DIM=d,
        BINS=BINS,
        CHUNK=chunk,
        BLOCK_G=4,
        BLOCK_M=16,
        BLOCK_D=d,
        NATIVE_DOT=False,
    )
    assert torch.equal(zk.cpu(), z)  # logits untouched
    boundary_z = boundary_z.cpu()
    for r, c in enumerate(boundary_ids):
        if c < 0:
            assert boundary_z[r].isnan().all()  # nothing written
        else:
            in_far = expected[r, c]
            assert torch.equal(boundary_z[r], torch.where(in_far, z[r, :, c], -torch.inf))
    assert (expected.sum(-1) <= torch.minimum(want, left.sum(-1))).all()
    assert expected[[0, 1, 2, 4]].any(-1).all()  # (row 3 has nothing left)
    # the partial states combine to the far field of exactly those clusters
    m_s, l_s, a_s = m_e[:, first:].cpu(), l_e[:, first:].cpu(), acc_e[:, first:].cpu()
    m = m_s.amax(1, keepdim=True)
    w = torch.exp(m_s - torch.where(m > float("-inf"), m, 0.0)).nan_to_num(0.0)
    den, acc = (w * l_s).sum(1), (w[..., None] * a_s).sum(1)
    weights = sizes[:, None].double() * torch.exp(z.double()) * expected[:, None]  # [R, G, C]
    for r in range(rows):
        if expected[r].any():
            brute = (weights[r] @ vc[r].double()) / weights[r].sum(-1, keepdim=True)
            assert torch.allclose((acc[r] / den[r][:, None]).double(), brute, atol=1e-5)
            lse = (m[r, 0] + den[r].log()).double()
            assert torch.allclose(lse, weights[r].sum(-1).log(), atol=1e-5)
        else:
            assert (den[r] == 0).all()
    members = members.cpu()  # each chunk lists its clusters of the far field first, in order
    for r, c0 in itertools.product(range(rows), range(0, clusters, chunk)):
        ids = expected[r, c0 : c0 + chunk].nonzero().flatten() + c0
        assert torch.equal(members[r, c0 : c0 + len(ids)].long(), ids)


def test_dependent_launch_only_on_a_gpu_that_has_it():
    """Kernels are never launched with ``launch_pdl`` off CUDA or in the interpreter (which
    cannot run the grid-dependency instructions)."""
    from multipole.ops.kernel_utils import dependent_launch_supported, interpreting

    assert not dependent_launch_supported(torch.device("cpu"))
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        expected = major >= 9 and not interpreting()
        assert dependent_launch_supported(torch.device("cuda", 0)) == expected


_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from multipole.ops.decode.kernel import _merge_kernel

constants = dict(HEAD_DIM=128, BLOCK_G=4, BLOCK_D=16, SPLIT_PAD=64, SPLIT_CHUNK=16, WITH_FAR=True)
constants["PDL"] = sys.argv[1] == "1"
names = _merge_kernel.arg_names
signature = {
    n: "constexpr" if n in constants else ("*fp32" if n.isupper() else "i32") for n in names
}
constexprs = {(names.index(k),): v for k, v in constants.items()}
source = ASTSource(_merge_kernel, signature, constexprs=constexprs)
options = dict(launch_pdl=constants["PDL"])
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
print(" ".join(line.split()[0] for line in ptx.splitlines() if "griddepcontrol" in line))
"""


def test_dependent_launch_compiles_to_grid_dependency_instructions():
    """Compiled for Hopper (no GPU needed; in a process without the interpreter), a kernel of
    the chain with ``PDL`` waits for its predecessor and then releases its successor, and
    without ``PDL`` does neither."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))

    def instructions(pdl: bool) -> list[str]:
        args = [sys.executable, "-c", _COMPILE_FOR_HOPPER, "1" if pdl else "0"]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert instructions(True) == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
    assert instructions(False) == []


def test_tuning_rejects_tiles_that_are_not_powers_of_two():
    from multipole import fused

    with pytest.raises(ValueError, match=r"Tuning\.band_chunk: expected a power of two >= 16"):
        fused.Tuning(band_chunk=1000)
    with pytest.raises(ValueError, match=r"Tuning\.block_n"):
        fused.Tuning(block_n=8)
    assert fused.Tuning(centroid_block=128).centroid_block == 128


def test_tuning_parse_reads_the_profiling_scripts_form_and_names_bad_fields():
    from multipole import fused

    assert fused.Tuning.parse("default") == fused.Tuning()
    parsed = fused.Tuning.parse("block_n=128+dependent_launch=False")
    assert parsed == fused.Tuning(block_n=128, dependent_launch=False)
    with pytest.raises(ValueError, match=r"each FIELD once, one of .*got 'blocks=4'"):
        fused.Tuning.parse("blocks=4")
    with pytest.raises(ValueError, match=r"got 'block_n=128'"):
        fused.Tuning.parse("block_n=64+block_n=128")
    for bad in ("big", "-64", "1.5", "True"):
        with pytest.raises(ValueError, match=r"block_n: expected a count"):
            fused.Tuning.parse(f"block_n={bad}")
    with pytest.raises(ValueError, match=r"dependent_launch: expected True or False"):
        fused.Tuning.parse("dependent_launch=1")
    with pytest.raises(ValueError, match=r"Tuning\.block_n: expected a power of two"):
        fused.Tuning.parse("block_n=100")
