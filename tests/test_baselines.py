"""Baselines: each against an independent reference, at full budget against dense attention,
and at equal bytes read (``budget_for_read_fraction``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from multipole import MultipoleConfig, dense_attention
from multipole.baselines import (
    METHODS,
    CentroidOnlyState,
    DenseState,
    MultipoleState,
    OracleTopKState,
    QuestState,
    WindowState,
    budget_for_read_fraction,
)
from multipole.baselines.quest import page_bounds, page_size

CFG = MultipoleConfig(interval=32, block_size=256, sink_tokens=4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_kv(
    gen: torch.Generator, b: int, h: int, n: int, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)


def middle_len(n: int, config: MultipoleConfig) -> int:
    """Clustered length after prefill, from the spec: leave interval..2*interval-1 recent."""
    free = n - config.sink_tokens
    return config.interval * (free // config.interval - 1) if free >= 2 * config.interval else 0


def masked_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Dense attention of each (sequence, KV head) over the tokens of ``mask [B, H_kv, N]``,
    computed by packing those tokens into a ragged batch for ``dense_attention``."""
    b, h, _, d = keys.shape
    g = q.shape[1] // h
    width = max(1, int(mask.sum(-1).max()))
    packed_k = keys.new_zeros(b * h, 1, width, d)
    packed_v = values.new_zeros(b * h, 1, width, d)
    lengths = []
    for row, m in enumerate(mask.reshape(b * h, -1)):
        idx = m.nonzero().squeeze(-1)
        packed_k[row, 0, : len(idx)] = keys.reshape(b * h, -1, d)[row, idx]
        packed_v[row, 0, : len(idx)] = values.reshape(b * h, -1, d)[row, idx]
        lengths.append(len(idx))
    out = dense_attention(q.reshape(b * h, g, d), packed_k, packed_v, lengths=lengths)
    return out.reshape(b, h * g, d)


def exact_region_mask(
    seq_lens: list[int], n: int, h: int, config: MultipoleConfig, budget_recent: int = 0
) -> torch.Tensor:
    """``[B, H, n]``: sink, recent window, and the last ``budget_recent`` middle tokens."""
    pos = torch.arange(n)
    rows = []
    for length in seq_lens:
        middle = middle_len(length, config)
        start = config.sink_tokens + middle - min(budget_recent, middle)
        rows.append((pos < min(config.sink_tokens, length)) | ((pos >= start) & (pos < length)))
    return torch.stack(rows).unsqueeze(1).expand(-1, h, -1)


def test_registry_names() -> None:
    assert set(METHODS) == {"dense", "multipole", "centroid_only", "quest", "oracle_topk", "window"}


def test_dense_equals_dense_attention_after_appends(gen: torch.Generator) -> None:
    lengths, h, hq, d = [300, 517, 1], 2, 8, 64
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    state = DenseState.prefill(keys, values, CFG, lengths=lengths)
    for t in (0, 40, 1):
        if t:
            new_k, new_v = random_kv(gen, len(lengths), h, t, d)
            state.append(new_k, new_v)
            full_k = keys.new_zeros(len(lengths), h, max(lengths) + t, d)
            full_v = torch.zeros_like(full_k)
            for b, n in enumerate(lengths):
                full_k[b, :, :n], full_k[b, :, n : n + t] = keys[b, :, :n], new_k[b]
                full_v[b, :, :n], full_v[b, :, n : n + t] = values[b, :, :n], new_v[b]
            keys, values, lengths = full_k, full_v, [n + t for n in lengths]
        q = torch.randn(len(lengths), hq, d, generator=gen)
        ref = dense_attention(q, keys, values, lengths=lengths)
        assert rel_err(state.attend(q), ref) < 1e-5
        assert state.stats().read_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_budget_is_dense(method: str, gen: torch.Generator) -> None:
    lengths, h, hq, d = [700, 1000, 1], 2, 4, 32
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    config = dataclasses.replace(CFG, token_budget=10**6)
    state = METHODS[method].prefill(keys, values, config, lengths=lengths)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    assert rel_err(state.attend(q), dense_attention(q, keys, values, lengths=lengths)) < 1e-5

    # Two intervals more: the middle region grows (and Multipole's clusters update).
    new_k, new_v = random_kv(gen, len(lengths), h, 2 * CFG.interval, d)
    state.append(new_k, new_v)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    ref = dense_attention(q, state.keys, state.values, lengths=state.seq_lens)
    assert rel_err(state.attend(q), ref) < 1e-5


@pytest.mark.parametrize("budget", [0, 50])
def test_window_attends_sink_and_latest_tokens(budget: int, gen: torch.Generator) -> None:
    lengths, h, hq, d = [600, 411, 20], 2, 4, 32
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    config = dataclasses.replace(CFG, token_budget=budget)
    state = WindowState.prefill(keys, values, config, lengths=lengths)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    mask = exact_region_mask(lengths, max(lengths), h, config, budget_recent=budget)
    assert rel_err(state.attend(q), masked_reference(q, keys, values, mask)) < 1e-5
    assert state.stats().tokens_exact == pytest.approx(float(mask.sum(-1).float().mean()))


def test_oracle_attends_true_top_tokens(gen: torch.Generator) -> None:
    lengths, h, g, d, budget = [1500, 1200], 2, 4, 32, 100
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    config = dataclasses.replace(CFG, token_budget=budget)
    state = OracleTopKState.prefill(keys, values, config, lengths=lengths)
    q = torch.randn(len(lengths), h * g, d, generator=gen)
    out = state.attend(q)
    other = torch.randn(q.shape, generator=gen)
    assert torch.equal(state.attend(q, lookup_q=other), out)  # the real query decides

    n = max(lengths)
    valid = torch.arange(n) < torch.tensor(lengths).unsqueeze(1)  # [B, N]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.view(-1, h, g, d), keys) / math.sqrt(d)
    probs = logits.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
    importance = probs.sum(2)  # [B, H, N]
    exact = exact_region_mask(lengths, n, h, config)
    importance = importance.masked_fill(exact | ~valid[:, None], -1.0)
    top = torch.zeros_like(exact).scatter(-1, importance.topk(budget, dim=-1).indices, True)
    mask = exact | top
    assert rel_err(out, masked_reference(q, keys, values, mask)) < 1e-5
    expected = float(exact.sum(-1).float().mean()) + budget
    assert state.stats().tokens_exact == pytest.approx(expected)
    assert state.stats().bytes_read == int(mask.sum()) * 2 * d * keys.element_size()


def test_oracle_beats_window_on_planted_keys(gen: torch.Generator) -> None:
    h, g, d, n, budget = 2, 4, 32, 1500, 64
    keys, values = random_kv(gen, 1, h, n, d)
    q = torch.randn(1, h * g, d, generator=gen)
    planted = torch.randperm(n - 400, generator=gen)[:8] + 200  # deep inside the middle region
    keys[0, :, planted] = 5 * q.view(h, g, d).mean(1, keepdim=True)  # logits about 7
    config = dataclasses.replace(CFG, token_budget=budget)
    ref = dense_attention(q, keys, values)
    err = {
        cls: rel_err(cls.prefill(keys, values, config).attend(q), ref)
        for cls in (OracleTopKState, WindowState)
    }
    assert err[OracleTopKState] < err[WindowState]


def test_quest_bound_is_upper_bound(gen: torch.Generator) -> None:
    b, h, g, d, pages = 2, 3, 4, 32, 10
    q = torch.randn(b, h, g, d, dtype=torch.float64, generator=gen)
    spread = 3 * torch.rand(d, dtype=torch.float64, generator=gen)
    keys = torch.randn(b, h, pages * 16, d, dtype=torch.float64, generator=gen) * spread
    paged = keys.view(b, h, pages, 16, d)
    bound = page_bounds(q, paged.amin(3), paged.amax(3))
    true_max = torch.einsum("bhgd,bhpkd->bhgpk", q, paged).amax(-1)
    assert (true_max <= bound + 1e-9).all()
    # A page of one key: the bound is that key's dot product.
    single = page_bounds(q, keys, keys)
    assert torch.allclose(single, q @ keys.transpose(-1, -2))


def quest_reference_mask(
    q: torch.Tensor, keys: torch.Tensor, lengths: list[int], config: MultipoleConfig, budget: int
) -> torch.Tensor:
    """Quest's token mask from the paper's recipe, one (sequence, KV head) at a time."""
    b, h, n, d = keys.shape
    groups = q.view(b, h, -1, d)
    mask = exact_region_mask(lengths, n, h, config).clone()
    for bi, length in enumerate(lengths):
        start, stop = config.sink_tokens, config.sink_tokens + middle_len(length, config)
        size = page_size(config)
        pages = [(p, min(p + size, stop)) for p in range(start, stop, size)]
        for hi in range(h):
            scores = []
            for lo, hi_pos in pages:
                page = keys[bi, hi, lo:hi_pos]
                mn, mx = page.amin(0), page.amax(0)
                per_head = torch.maximum(groups[bi, hi] * mn, groups[bi, hi] * mx).sum(-1)
                scores.append(float(per_head.max()))
            taken = 0
            for p in sorted(range(len(pages)), key=lambda i: -scores[i]):
                lo, hi_pos = pages[p]
                if taken + hi_pos - lo > budget:
                    break
                taken += hi_pos - lo
                mask[bi, hi, lo:hi_pos] = True
    return mask


@pytest.mark.parametrize("pages,ratio", [(1, 1 / 16), (3, 1 / 16), (8, 1 / 16), (2, 1 / 40)])
def test_quest_matches_paged_selection(pages: int, ratio: float, gen: torch.Generator) -> None:
    # interval 24: middles of 504 (the longest, ending in a half page) and 192 tokens.
    config = MultipoleConfig(
        interval=24, block_size=240, sink_tokens=4, token_budget=16 * pages, centroid_ratio=ratio
    )
    lengths, h, hq, d = [555, 230], 2, 8, 32
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    state = QuestState.prefill(keys, values, config, lengths=lengths)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    out = state.attend(q)
    mask = quest_reference_mask(q, keys, lengths, config, 16 * pages)
    assert rel_err(out, masked_reference(q, keys, values, mask)) < 1e-5

    exact = exact_region_mask(lengths, max(lengths), h, config)
    middle_tokens = (mask & ~exact).sum(-1)
    assert (middle_tokens <= 16 * pages).all()
    stats = state.stats()
    assert stats.tokens_exact == pytest.approx(float(mask.sum(-1).float().mean()))
    num_pages = [math.ceil(middle_len(n, config) / page_size(config)) for n in lengths]
    assert stats.centroids_scored == pytest.approx(sum(num_pages) / len(lengths))


def test_centroid_only_is_multipole_without_far_field(gen: torch.Generator) -> None:
    lengths, h, hq, d = [900, 640], 2, 4, 32
    keys, values = random_kv(gen, len(lengths), h, max(lengths), d)
    config = dataclasses.replace(CFG, token_budget=64)
    states = [
        CentroidOnlyState.prefill(keys, values, config, lengths=lengths),
        MultipoleState.prefill(
            keys, values, dataclasses.replace(config, replacement=False), lengths=lengths
        ),
        MultipoleState.prefill(keys, values, config, lengths=lengths),
    ]
    assert states[0].config.replacement is False
    for step in range(2):
        if step:
            new_k, new_v = random_kv(gen, len(lengths), h, CFG.interval, d)
            for s in states:
                s.append(new_k, new_v)
        q = torch.randn(len(lengths), hq, d, generator=gen)
        squeezed, no_far, multipole = (s.attend(q) for s in states)
        assert rel_err(squeezed, no_far) < 1e-6
        assert rel_err(squeezed, multipole) > 1e-3
        assert states[0].stats() == states[1].stats()


CASES = [(m, 1) for m in sorted(METHODS)] + [("multipole", 2), ("centroid_only", 2)]
SPARSE_CASES = [case for case in CASES if case[0] != "dense"]


def case_ids(cases: list[tuple[str, int]]) -> list[str]:
    return [f"{method}-L{levels}" for method, levels in cases]


def fixed_bytes(
    method: str, config: MultipoleConfig, seq_len: int, head_dim: int, elem_size: int
) -> float:
    return METHODS[method].fixed_bytes_per_head(config, seq_len, head_dim, elem_size)


@pytest.mark.parametrize(("method", "levels"), SPARSE_CASES, ids=case_ids(SPARSE_CASES))
def test_fixed_bytes_are_the_reads_at_budget_zero(
    method: str, levels: int, gen: torch.Generator
) -> None:
    h, d, n = 2, 32, 1300
    keys, values = random_kv(gen, 1, h, n, d)
    config = dataclasses.replace(CFG, token_budget=0, levels=levels, coarse_budget=0.5)
    state = METHODS[method].prefill(keys, values, config)
    state.attend(torch.randn(1, 2 * h, d, generator=gen))
    fixed = fixed_bytes(method, config, n, d, keys.element_size())
    if levels == 1:  # exact as long as k-means leaves no cluster empty (random keys)
        assert state.stats().bytes_read == h * fixed
    else:  # opened coarse clusters hold about coarse_budget tokens, not exactly
        assert state.stats().bytes_read == pytest.approx(h * fixed, rel=0.15)


@pytest.mark.parametrize(("method", "levels"), CASES, ids=case_ids(CASES))
def test_budget_for_read_fraction_hits_target(
    method: str, levels: int, gen: torch.Generator
) -> None:
    h, hq, d, n, target = 2, 8, 32, 2000, 0.25
    # With levels == 2 only the opened half of the middle is selectable: a budget close to
    # what was opened could not be filled.
    config = dataclasses.replace(CFG, levels=levels, coarse_budget=0.5)
    tuned = budget_for_read_fraction(
        method, target, seq_len=n, head_dim=d, config=config, elem_size=4
    )
    keys, values = random_kv(gen, 1, h, n, d)
    state = METHODS[method].prefill(keys, values, tuned)
    state.attend(torch.randn(1, hq, d, generator=gen))
    fraction = state.stats().read_fraction
    if method == "dense":
        assert tuned == config
        assert fraction == pytest.approx(1.0)
    elif method in ("multipole", "centroid_only"):  # whole clusters may not fill the budget
        assert isinstance(tuned.token_budget, int)
        assert 0.8 * target <= fraction <= 1.05 * target
    else:
        assert isinstance(tuned.token_budget, int)
        assert fraction == pytest.approx(target, rel=0.05)


def test_budget_for_read_fraction_errors() -> None:
    kwargs = dict(seq_len=2000, head_dim=32, config=CFG)
    with pytest.raises(ValueError, match=r"method: expected one of .*oracle_topk"):
        budget_for_read_fraction("h2o", 0.2, **kwargs)
    with pytest.raises(ValueError, match=r"read_fraction: expected >= 0\.0"):
        budget_for_read_fraction("multipole", 0.01, **kwargs)
    with pytest.raises(ValueError, match="read_fraction"):
        budget_for_read_fraction("window", float("nan"), **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_exact_tokens_are_what_the_reads_count(gen, method):
    """exact_tokens() is the mask behind tokens_exact: always the sink and the recent window,
    at most the budget's worth of the middle (exactly that for oracle and window, all of it for
    dense), nothing past a sequence's end."""
    cfg = dataclasses.replace(CFG, token_budget=40, backend="reference")
    keys, values = random_kv(gen, 2, 2, 500, 16)
    lengths = torch.tensor([500, 333])
    state = METHODS[method].prefill(keys, values, cfg, lengths=lengths)
    state.attend(torch.randn(2, 4, 16, generator=gen))
    mask = state.exact_tokens()
    assert mask.shape == (2, 2, 500)
    assert torch.equal(mask.sum(-1), state._reads.tokens_exact.expand(2, 2))
    for b, n in enumerate(lengths.tolist()):
        middle = middle_len(n, cfg)
        assert (
            mask[b, :, : cfg.sink_tokens].all() and mask[b, :, cfg.sink_tokens + middle : n].all()
        )
        assert not mask[b, :, n:].any()
        in_middle = mask[b, :, cfg.sink_tokens : cfg.sink_tokens + middle].sum(-1)
        expected_max = middle if method == "dense" else 40
        assert (in_middle <= expected_max).all()
        if method in ("dense", "oracle_topk", "window"):
            assert (in_middle == expected_max).all()
        if method == "window":  # the last 40 middle tokens
            assert mask[b, :, cfg.sink_tokens + middle - 40 : n].all()


def test_exact_tokens_needs_the_reference_path(gen):
    keys, values = random_kv(gen, 1, 2, 300, 16)
    state = MultipoleState.prefill(keys, values, CFG)
    with pytest.raises(RuntimeError, match="previous attend"):
        state.exact_tokens()
