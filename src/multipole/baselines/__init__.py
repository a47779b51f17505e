"""Baselines of Multipole Attention, all behind the :class:`~multipole.DecodeState` interface.

Every method attends the sink and the recent window exactly and spends ``token_budget``
tokens per KV head on the middle region, so methods compare at equal bytes read:
:func:`budget_for_read_fraction` finds the budget that gives each one the same share of the
dense bytes.

Example:
    >>> import torch
    >>> from multipole import MultipoleConfig
    >>> from multipole.baselines import METHODS, budget_for_read_fraction
    >>> k, v = torch.randn(1, 2, 1000, 64), torch.randn(1, 2, 1000, 64)
    >>> cfg = MultipoleConfig(interval=32, block_size=256, sink_tokens=4)
    >>> cfg = budget_for_read_fraction("quest", 0.2, seq_len=1000, head_dim=64, config=cfg)
    >>> state = METHODS["quest"].prefill(k, v, cfg)
    >>> state.attend(torch.randn(1, 8, 64)).shape
    torch.Size([1, 8, 64])
"""

from __future__ import annotations

import dataclasses
import math

from ..config import MultipoleConfig
from ..state import DecodeState, MultipoleState
from .centroid_only import CentroidOnlyState
from .dense import DenseState
from .oracle import OracleTopKState
from .quest import QuestState
from .window import WindowState

METHODS: dict[str, type[DecodeState]] = {
    "dense": DenseState,
    "multipole": MultipoleState,
    "centroid_only": CentroidOnlyState,
    "quest": QuestState,
    "oracle_topk": OracleTopKState,
    "window": WindowState,
}


def budget_for_read_fraction(
    method: str,
    read_fraction: float,
    *,
    seq_len: int,
    head_dim: int,
    config: MultipoleConfig,
    elem_size: int = 2,
) -> MultipoleConfig:
    """config with token_budget (an int) set so that `method` reads about `read_fraction` of
    the dense KV bytes of one sequence of seq_len tokens, centroid and page-metadata bytes
    counted.

    The fixed bytes (sink, recent window, centroids or page summaries, right after prefill)
    come from the method's ``fixed_bytes_per_head``; the rest of the bytes buy whole tokens
    (``2 * head_dim * elem_size`` bytes each). A method may read less than the target when its
    selection does not fill the budget (Quest's whole pages), or when the budget exceeds
    the middle region. ``"dense"`` returns ``config`` unchanged.

    Raises:
        ValueError: unknown ``method``; ``read_fraction`` below what the fixed bytes alone read.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("seq_len", seq_len), ("head_dim", head_dim), ("elem_size", elem_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if (
        isinstance(read_fraction, bool)
        or not isinstance(read_fraction, int | float)
        or not math.isfinite(read_fraction)
    ):
        raise ValueError(f"read_fraction: expected a finite float, got {read_fraction!r}")
    if method == "dense":
        return config
    token_bytes = 2 * head_dim * elem_size
    fixed = METHODS[method].fixed_bytes_per_head(config, seq_len, head_dim, elem_size)
    budget = math.floor((read_fraction * seq_len * token_bytes - fixed) / token_bytes)
    if budget < 0:
        minimum = fixed / (seq_len * token_bytes)
        raise ValueError(
            f"read_fraction: expected >= {minimum:.4f} for {method!r} at seq_len={seq_len} "
            f"(the sink, recent window and metadata alone read that much), got {read_fraction}"
        )
    return dataclasses.replace(config, token_budget=budget)


__all__ = [
    "METHODS",
    "CentroidOnlyState",
    "DenseState",
    "MultipoleState",
    "OracleTopKState",
    "QuestState",
    "WindowState",
    "budget_for_read_fraction",
]
