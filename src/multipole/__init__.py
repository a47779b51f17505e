"""Multipole Attention: long-context decoding that reads a small part of the KV cache.

Every decode query attends exactly to the sink, the recent window and the tokens of the
clusters that matter most, and to every other cluster through its centroid (the far field).
"""

from .config import MultipoleConfig
from .state import AttendStats, DecodeState, MultipoleState, dense_attention

__version__ = "0.1.0"

__all__ = [
    "AttendStats",
    "DecodeState",
    "MultipoleCache",
    "MultipoleConfig",
    "MultipoleState",
    "dense_attention",
]


def __getattr__(name: str):
    # transformers is optional: the cache (and the attention registration) load on first use
    if name == "MultipoleCache":
        from .hf import MultipoleCache

        return MultipoleCache
    raise AttributeError(f"module 'multipole' has no attribute {name!r}")
