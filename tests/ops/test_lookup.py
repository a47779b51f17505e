"""Lookup: importance (the paper's eq. 1, aggregated over the group) and budgeted selection."""

from __future__ import annotations

import math

import torch

from multipole.ops.lookup import (
    cluster_logits,
    log_importance,
    select_band,
    select_by_budget,
    take_by_budget,
)


def test_log_importance_is_group_sum_of_size_normalised_probabilities(gen):
    b, h, g, c, d = 1, 2, 3, 9, 8
    q = torch.randn(b, h, g, d, generator=gen, dtype=torch.float64)
    kc = torch.randn(b, h, c, d, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 20, (b, h, c), generator=gen)
    z = cluster_logits(q, kc, 0.5)
    denom = torch.logsumexp(z + sizes.double().log().unsqueeze(-2), dim=-1)
    score = log_importance(z, torch.ones(b, h, c, dtype=torch.bool), denom)
    for hi in range(h):
        for ci in range(c):
            total = 0.0
            for gi in range(g):
                num = math.exp(0.5 * float(q[0, hi, gi] @ kc[0, hi, ci]))
                den = sum(
                    int(sizes[0, hi, j]) * math.exp(0.5 * float(q[0, hi, gi] @ kc[0, hi, j]))
                    for j in range(c)
                )
                total += num / den
            torch.testing.assert_close(score[0, hi, ci].exp().item(), total)


def test_selection_is_longest_prefix_within_budget():
    score = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0, 0.0]]])
    sizes = torch.tensor([[[10, 1, 20, 5, 7, 1]]])
    include = torch.ones(1, 1, 6, dtype=torch.bool)
    # order 0(10) 2(20) 3(5) 4(7) 1(1) 5(1): cumulative 10 30 35 42 43 44
    expect = {
        9: [],
        10: [0],
        34: [0, 2],
        35: [0, 2, 3],
        43: [0, 1, 2, 3, 4],
        1000: [0, 1, 2, 3, 4, 5],
    }
    for budget, chosen in expect.items():
        sel = select_by_budget(score, sizes, include, torch.tensor([budget]))
        assert sel[0, 0].nonzero().flatten().tolist() == chosen, budget


def test_selection_skips_excluded_and_empty_clusters_and_breaks_ties_by_index():
    score = torch.tensor([[[1.0, 1.0, 1.0, 9.0]]])
    sizes = torch.tensor([[[2, 2, 0, 2]]])
    include = torch.tensor([[[True, True, True, False]]])
    sel = select_by_budget(score, sizes, include, torch.tensor([2]))
    assert sel[0, 0].tolist() == [True, False, False, False]


def test_budget_is_per_sequence():
    score = torch.tensor([[[2.0, 1.0]], [[2.0, 1.0]]])
    sizes = torch.ones(2, 1, 2, dtype=torch.int64)
    sel = select_by_budget(
        score, sizes, torch.ones(2, 1, 2, dtype=torch.bool), torch.tensor([1, 2])
    )
    assert sel.sum(-1).flatten().tolist() == [1, 2]


def test_take_by_budget_fills_in_score_bins_then_cluster_order():
    """Bins of 1/64 nat below ``top`` in descending score, cluster order inside a bin: each
    cluster takes what the budget leaves, whole or in part (at most one in part); excluded and
    empty clusters take nothing; scores 32 nats or more below ``top`` share the last bin."""
    top = math.log(4)
    # bin:         1 (c0 below c2, before it)   0   1     excl.  2     empty  last  last
    score = torch.tensor([top - 0.03, top, top - 0.02, top, top - 0.04, top, top - 40, -50.0])
    sizes = torch.tensor([5, 4, 3, 9, 2, 0, 7, 1])
    include = torch.tensor([True, True, True, False, True, True, True, True])
    # order: c1(4) c0(5) c2(3) c4(2) c6(7) c7(1); cumulative 4 9 12 14 21 22
    expect = {
        0: [0, 0, 0, 0, 0, 0, 0, 0],
        3: [0, 3, 0, 0, 0, 0, 0, 0],
        6: [2, 4, 0, 0, 0, 0, 0, 0],
        12: [5, 4, 3, 0, 0, 0, 0, 0],
        13: [5, 4, 3, 0, 1, 0, 0, 0],
        20: [5, 4, 3, 0, 2, 0, 6, 0],
        100: [5, 4, 3, 0, 2, 0, 7, 1],
    }
    for budget, taken in expect.items():
        got = take_by_budget(
            score.view(1, 1, -1),
            sizes.view(1, 1, -1),
            include.view(1, 1, -1),
            torch.tensor([budget]),
            top,
        )
        assert got[0, 0].tolist() == taken, budget
    dead = torch.tensor([float("-inf"), top])  # a -inf score takes nothing, as in the kernels
    got = take_by_budget(
        dead.view(1, 1, -1),
        torch.tensor([[[3, 3]]]),
        torch.ones(1, 1, 2, dtype=torch.bool),
        torch.tensor([6]),
        top,
    )
    assert got[0, 0].tolist() == [0, 3]
    two = take_by_budget(
        score.expand(2, 1, -1),
        sizes.expand(2, 1, -1),
        include.expand(2, 1, -1),
        torch.tensor([6, 13]),
        top,
    )
    assert two.sum(-1).flatten().tolist() == [6, 13]


def test_band_takes_whole_mass_bins_best_first_within_the_count():
    """Bins of 1/64 nat below the row's largest mass; a bin that would pass the count is left
    out whole (with every bin after it); excluded clusters never count; 32 nats or more below
    the largest, everything shares the last bin."""
    top = 3.0
    # bins:    0    0 (excl.)  1 (2 tied)      1        2      last   last
    mass = torch.tensor([top, top, top - 0.02, top - 0.03, top - 0.04, top - 40.0, -50.0])
    include = torch.tensor([True, False, True, True, True, True, True])
    expect = {
        0: [],
        1: [0],
        2: [0],
        3: [0, 2, 3],
        4: [0, 2, 3, 4],
        5: [0, 2, 3, 4],
        6: [0, 2, 3, 4, 5, 6],
    }
    for count, kept in expect.items():
        got = select_band(mass.view(1, 1, -1), include.view(1, 1, -1), torch.tensor([[count]]))
        assert got[0, 0].nonzero().flatten().tolist() == kept, count
    none = select_band(
        mass.view(1, 1, -1), torch.zeros(1, 1, 7, dtype=torch.bool), torch.tensor([[3]])
    )
    assert not none.any()
