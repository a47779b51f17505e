"""Triton kernels of the exact part: split-K flash decoding over a list of token positions,
and the log-sum-exp merge with the far field.

Each (sequence, KV head) attends its whole query group to the tokens listed in ``tokens``
(``count`` of them), split over programs of ``tokens_per_split`` slots so that every SM is busy
at batch 1; the merge combines the splits and the far-field state into the output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernel_utils import dot, load_rows, softmax_update, store_partial


@triton.jit
def _sparse_decode_kernel(
    Q,
    K,
    V,
    TOKENS,
    COUNT,
    M_PART,
    L_PART,
    ACC_PART,
    scale,
    group,
    token_capacity,
    kv_capacity,
    tokens_per_split,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    q = load_rows(Q, bh * group, group, HEAD_DIM, BLOCK_G, BLOCK_D)  # [BLOCK_G, BLOCK_D]
    count = tl.load(COUNT + bh)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, count)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        slots = s0 + offs_n
        mask_n = slots < end
        pos = tl.load(TOKENS + bh * token_capacity + slots, mask=mask_n, other=0).to(tl.int64)
        rows = bh * kv_capacity + pos
        k = tl.load(
            K + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        x = dot(q, tl.trans(k), NATIVE_DOT) * scale  # [BLOCK_G, BLOCK_N]
        x = tl.where(mask_n[None, :], x, float("-inf"))
        m, den, p, alpha = softmax_update(m, den, x, 1.0)
        v = tl.load(
            V + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, NATIVE_DOT)
    part = bh * num_splits + split
    store_partial(
        M_PART, L_PART, ACC_PART, part, group, m, den, acc, HEAD_DIM, BLOCK_G, BLOCK_D, True
    )


@triton.jit
def _weighted_sum(
    M_PART,
    ACC_PART,
    bh,
    d0,
    num_splits,
    m_safe,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """``sum_s exp(m_s - m_safe) * acc_s[:, d0:d0 + BLOCK_D]`` over the splits of one row,
    SPLIT_CHUNK splits at a time."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    mask_g = offs_g < group
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        splits = s0 + offs_s
        part = (bh * num_splits + splits)[:, None] * group + offs_g[None, :]  # [S, G]
        mask_sg = (splits < num_splits)[:, None] & mask_g[None, :]
        w = tl.exp(tl.load(M_PART + part, mask=mask_sg, other=float("-inf")) - m_safe[None, :])
        acc_s = tl.load(
            ACC_PART + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=mask_sg[:, :, None] & (offs_d < HEAD_DIM)[None, None, :],
            other=0.0,
        )  # [S, G, D]
        acc += tl.sum(w[:, :, None] * acc_s, 0)
    return acc


@triton.jit
def _merge_kernel(
    M_PART,
    L_PART,
    ACC_PART,
    C_M_PART,
    C_ACC_PART,
    FAR_M,
    FAR_L,
    FAR_ACC,
    OUT,
    LSE,
    group,
    num_splits,
    num_centroid_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    WITH_FAR: tl.constexpr,
):
    """Combine the exact pass's splits and the far field of one (sequence, KV head).

    The far field is the centroid pass's splits (all clusters) plus the selection's
    correction (minus the selected clusters), whose denominator is already net.
    """
    bh = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D  # this program's slice of the head dim
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    mask_g = offs_g < group
    mask_gd = mask_g[:, None] & (offs_d < HEAD_DIM)[None, :]
    far = bh * group + offs_g
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    if WITH_FAR:
        m = tl.load(FAR_M + far, mask=mask_g, other=float("-inf"))
    den = tl.zeros([BLOCK_G], tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        splits = s0 + offs_s
        part = (bh * num_splits + splits)[:, None] * group + offs_g[None, :]
        mask_sg = (splits < num_splits)[:, None] & mask_g[None, :]
        m = tl.maximum(m, tl.max(tl.load(M_PART + part, mask=mask_sg, other=float("-inf")), 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        splits = s0 + offs_s
        part = (bh * num_splits + splits)[:, None] * group + offs_g[None, :]
        mask_sg = (splits < num_splits)[:, None] & mask_g[None, :]
        w = tl.exp(tl.load(M_PART + part, mask=mask_sg, other=float("-inf")) - m_safe[None, :])
        den += tl.sum(w * tl.load(L_PART + part, mask=mask_sg, other=0.0), 0)
    acc = _weighted_sum(
        M_PART,
        ACC_PART,
        bh,
        d0,
        num_splits,
        m_safe,
        group,
        HEAD_DIM,
        BLOCK_G,
        BLOCK_D,
        SPLIT_CHUNK,
    )
    if WITH_FAR:
        acc += _weighted_sum(
            C_M_PART,
            C_ACC_PART,
            bh,
            d0,
            num_centroid_splits,
            m_safe,
            group,
            HEAD_DIM,
            BLOCK_G,
            BLOCK_D,
            SPLIT_CHUNK,
        )
        w = tl.exp(tl.load(FAR_M + far, mask=mask_g, other=float("-inf")) - m_safe)
        den += w * tl.load(FAR_L + far, mask=mask_g, other=0.0)
        acc += w[:, None] * tl.load(
            FAR_ACC + far[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_gd, other=0.0
        )
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(
        OUT + (bh * group + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mask_gd,
    )
    lse = tl.where(den > 0, m_safe + tl.log(tl.where(den > 0, den, 1.0)), float("-inf"))
    tl.store(LSE + bh * group + offs_g, lse, mask=mask_g)
