"""Decode attention as partial softmax states ``(out, lse)`` that merge by log-sum-exp.

Every function here returns ``out`` normalised by its own softmax denominator and ``lse``, the
natural log of that denominator (float32, or float64 for float64 inputs). A part with nothing
to attend returns ``out = 0`` and ``lse = -inf``, and merging it changes nothing.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_partial(
    logits: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted sums of ``values``, one per row of ``logits``.

    Args:
        logits: ``[..., M, N]``; masked entries are ``-inf``.
        values: ``[..., N, D]``.
    Returns:
        ``out [..., M, D]`` and ``lse [..., M]``; an all-masked row gives ``0`` and ``-inf``.
    """
    lse = torch.logsumexp(logits, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(logits - safe_lse.unsqueeze(-1))
    out = torch.matmul(weights, values)
    return out, lse


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax states over disjoint sets of keys into one."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def attend_tokens(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    token_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each query group over the tokens where ``token_mask`` is True.

    Args:
        q: ``[B, H_kv, G, D]`` queries grouped by KV head.
        keys, values: ``[B, H_kv, N, D]``.
        token_mask: ``[B, H_kv, N]`` (or ``[B, 1, N]``) bool.
        scale: softmax scale applied to ``q . k``.
    Returns:
        ``out [B, H_kv, G, D]`` and ``lse [B, H_kv, G]`` in the accumulation dtype.
    """
    dtype = compute_dtype(q.dtype)
    logits = torch.matmul(q.to(dtype), keys.to(dtype).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~token_mask.unsqueeze(-2), float("-inf"))
    return softmax_partial(logits, values.to(dtype))


def far_field(
    q: torch.Tensor,
    key_centroids: torch.Tensor,
    value_centroids: torch.Tensor,
    sizes: torch.Tensor,
    cluster_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Far-field (monopole) attention: each cluster acts as ``size`` copies of its centroid pair.

    Cluster ``c`` adds ``N_c exp(s q . Kc_c) Vc_c`` to the numerator and ``N_c exp(s q . Kc_c)``
    to the denominator, i.e. logit ``s q . Kc_c + log N_c``.

    Args:
        q: ``[B, H_kv, G, D]``.
        key_centroids, value_centroids: ``[B, H_kv, C, D]``.
        sizes: ``[B, H_kv, C]`` tokens per cluster; clusters of size 0 never count.
        cluster_mask: ``[B, H_kv, C]`` bool, the clusters to include.
        scale: softmax scale.
    Returns:
        ``out [B, H_kv, G, D]`` and ``lse [B, H_kv, G]``.
    """
    dtype = compute_dtype(q.dtype)
    logits = torch.matmul(q.to(dtype), key_centroids.to(dtype).transpose(-1, -2)) * scale
    log_sizes = torch.log(sizes.to(dtype))
    include = cluster_mask & (sizes > 0)
    logits = (logits + log_sizes.unsqueeze(-2)).masked_fill(~include.unsqueeze(-2), float("-inf"))
    return softmax_partial(logits, value_centroids.to(dtype))
