"""Decode ops: exact attention, far field and the log-sum-exp merge against direct formulas."""

from __future__ import annotations

import math

import torch

from multipole.ops.decode import attend_tokens, far_field, merge_states


def test_far_field_matches_explicit_sum(gen):
    b, h, g, c, d = 2, 3, 4, 7, 16
    q = torch.randn(b, h, g, d, generator=gen, dtype=torch.float64)
    kc = torch.randn(b, h, c, d, generator=gen, dtype=torch.float64)
    vc = torch.randn(b, h, c, d, generator=gen, dtype=torch.float64)
    sizes = torch.randint(0, 30, (b, h, c), generator=gen)
    mask = torch.rand(b, h, c, generator=gen) < 0.7
    scale = 1 / math.sqrt(d)
    out, lse = far_field(q, kc, vc, sizes, mask, scale)
    for bi in range(b):
        for hi in range(h):
            for gi in range(g):
                num = torch.zeros(d, dtype=torch.float64)
                den = 0.0
                for ci in range(c):
                    if mask[bi, hi, ci] and sizes[bi, hi, ci] > 0:
                        w = int(sizes[bi, hi, ci]) * math.exp(
                            scale * float(q[bi, hi, gi] @ kc[bi, hi, ci])
                        )
                        num += w * vc[bi, hi, ci]
                        den += w
                if den == 0:
                    assert lse[bi, hi, gi] == float("-inf")
                    assert torch.equal(out[bi, hi, gi], torch.zeros(d, dtype=torch.float64))
                else:
                    torch.testing.assert_close(out[bi, hi, gi], num / den)
                    torch.testing.assert_close(lse[bi, hi, gi].item(), math.log(den))


def test_far_field_of_repeated_tokens_is_exact(gen):
    # A cluster of N identical (k, v) tokens is exactly its centroid counted N times.
    d = 8
    q = torch.randn(1, 1, 2, d, generator=gen, dtype=torch.float64)
    kc = torch.randn(1, 1, 5, d, generator=gen, dtype=torch.float64)
    vc = torch.randn(1, 1, 5, d, generator=gen, dtype=torch.float64)
    sizes = torch.tensor([[[3, 1, 4, 1, 5]]])
    tokens = torch.repeat_interleave(torch.arange(5), sizes[0, 0])
    exact = attend_tokens(
        q, kc[:, :, tokens], vc[:, :, tokens], torch.ones(1, 1, 14, dtype=torch.bool), 0.3
    )
    approx = far_field(q, kc, vc, sizes, torch.ones(1, 1, 5, dtype=torch.bool), 0.3)
    torch.testing.assert_close(approx[0], exact[0])
    torch.testing.assert_close(approx[1], exact[1])


def test_merge_of_disjoint_parts_equals_whole(gen):
    q = torch.randn(2, 2, 3, 16, generator=gen)
    k = torch.randn(2, 2, 50, 16, generator=gen)
    v = torch.randn(2, 2, 50, 16, generator=gen)
    split = torch.rand(2, 2, 50, generator=gen) < 0.4
    whole = attend_tokens(q, k, v, torch.ones_like(split), 0.25)
    merged = merge_states(
        *attend_tokens(q, k, v, split, 0.25), *attend_tokens(q, k, v, ~split, 0.25)
    )
    torch.testing.assert_close(merged[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[1], whole[1], rtol=1e-5, atol=1e-6)


def test_empty_parts_merge_to_nothing(gen):
    q = torch.randn(1, 1, 2, 8, generator=gen)
    k = torch.randn(1, 1, 4, 8, generator=gen)
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    out, lse = attend_tokens(q, k, k, none, 1.0)
    assert torch.isneginf(lse).all() and (out == 0).all()
    some = attend_tokens(q, k, k, ~none, 1.0)
    merged = merge_states(out, lse, *some)
    torch.testing.assert_close(merged[0], some[0])
    both_empty = merge_states(out, lse, out, lse)
    assert torch.isneginf(both_empty[1]).all() and not torch.isnan(both_empty[0]).any()


def test_extreme_logits_stay_finite():
    q = torch.full((1, 1, 1, 4), 100.0)
    k = torch.tensor([[[[100.0] * 4, [-100.0] * 4, [99.0] * 4]]])
    v = torch.randn(1, 1, 3, 4)
    out, lse = attend_tokens(q, k, v, torch.ones(1, 1, 3, dtype=torch.bool), 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
