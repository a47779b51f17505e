"""Hugging Face transformers integration: a cache and an attention function, no model edits.

    import multipole
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multipole")
    out = model.generate(**inputs, past_key_values=multipole.MultipoleCache(cfg))

Importing this module registers the attention function ``"multipole"`` (and transformers' SDPA
mask under the same name, so padding masks reach it). Prompt processing (any query longer
than one token) is exact SDPA. At the first one-token decode step of a layer, the keys and
values of every sequence (left padding removed) become a :class:`~multipole.MultipoleState`,
which then answers every decode step and absorbs new tokens with its online update.

This first version clusters the cached (RoPE'd) keys; the design notes found that best at
contexts of a few thousand tokens, and position-free clustering keys come with the model
integrations that need them. Beam search, a second prompt after decoding (multi-turn reuse,
speculative verification) and ``output_attentions`` are not supported and raise.
"""

from __future__ import annotations

import contextvars
import functools

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import MultipoleConfig
from .state import MultipoleState

ATTENTION_NAME = "multipole"

# The cache whose ``update`` ran last in this context: every supported model calls
# ``past_key_values.update(...)`` right before its attention function, for the same layer.
_ACTIVE_CACHE: contextvars.ContextVar[MultipoleCache | None] = contextvars.ContextVar(
    "multipole_active_cache", default=None
)


class MultipoleLayer(DynamicLayer):
    """One layer's cache: dense keys and values during the prompt, a MultipoleState after."""

    def __init__(self, config: MultipoleConfig) -> None:
        super().__init__()
        self.config = config
        self.state: MultipoleState | None = None
        self._length = 0  # padded length, as transformers counts positions
        self._attended = True  # the attention function consumed the last decode update

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new_tokens = key_states.shape[-2]
        if self.state is not None and new_tokens != 1:
            raise NotImplementedError(
                "MultipoleCache: a prompt after decoding started (multi-turn reuse, speculative "
                "verification) is not supported; start a new cache"
            )
        if new_tokens == 1:  # a decode step: the attention function must take it
            if not self._attended:
                raise RuntimeError(
                    "MultipoleCache: the model's attention is not 'multipole'; load the model "
                    "with attn_implementation='multipole' or call "
                    "model.set_attn_implementation('multipole') (after importing multipole.hf)"
                )
            self._attended = False
        self._length += new_tokens
        if self.state is None:
            return super().update(key_states, value_states, *args, **kwargs)
        self.state.append(key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._length

    def build_state(self, attention_mask: torch.Tensor | None) -> None:
        """Turn the dense prompt cache into a MultipoleState (left padding removed)."""
        keys, values = self.keys, self.values
        b, _, n, _ = keys.shape
        if attention_mask is None:
            lengths = torch.full((b,), n, dtype=torch.int64, device=keys.device)
        else:
            valid = attention_mask[:, 0, -1, -n:]  # [B, N]: the last query row sees every key
            lengths = valid.sum(-1)
            keys, values = _left_to_right(keys, lengths), _left_to_right(values, lengths)
        self.state = MultipoleState.prefill(keys, values, self.config, lengths=lengths)
        self.keys = self.values = None  # the state holds them now

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("MultipoleCache: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            raise NotImplementedError("MultipoleCache: cannot repeat the batch after decoding")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            raise NotImplementedError("MultipoleCache: cannot select sequences after decoding")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if self.state is not None:
            raise NotImplementedError("MultipoleCache: cannot crop after decoding started")
        super().crop(tokens_to_remove)
        self._length = 0 if self.keys is None else self.keys.shape[-2]


class MultipoleCache(Cache):
    """A transformers ``Cache`` running Multipole Attention at every decode step.

    Args:
        config: one :class:`MultipoleConfig` for every layer, or a list with one per layer
            (``None`` in the list keeps that layer dense).
    """

    def __init__(self, config: MultipoleConfig | list[MultipoleConfig | None] | None = None):
        config = MultipoleConfig() if config is None else config
        self.layer_configs = config if isinstance(config, list) else None
        if isinstance(config, list):
            for i, c in enumerate(config):
                if c is not None and not isinstance(c, MultipoleConfig):
                    raise TypeError(f"config[{i}]: expected a MultipoleConfig or None, got {c!r}")
        elif not isinstance(config, MultipoleConfig):
            raise TypeError(f"config: expected a MultipoleConfig, got {type(config).__name__}")
        super().__init__(layer_class_to_replicate=functools.partial(MultipoleLayer, config))
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            cfg = self.config if self.layer_configs is None else self._layer_config(index)
            self.layers.append(MultipoleLayer(cfg) if cfg is not None else DynamicLayer())
        _ACTIVE_CACHE.set(self)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _layer_config(self, index: int) -> MultipoleConfig | None:
        if index >= len(self.layer_configs):
            raise ValueError(
                f"config: a list of {len(self.layer_configs)} per-layer configs, but the model "
                f"has a layer {index}"
            )
        return self.layer_configs[index]


def multipole_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"multipole"`` (the transformers signature).

    Queries of more than one token, layers kept dense, and calls without a MultipoleCache run
    SDPA; a one-token query of a Multipole layer runs :meth:`MultipoleState.attend`.
    """
    if kwargs.get("output_attentions"):
        raise NotImplementedError("multipole attention: output_attentions=True is not supported")
    cache = _ACTIVE_CACHE.get()
    layer = None
    if cache is not None and getattr(module, "layer_idx", None) is not None:
        candidate = cache.layers[module.layer_idx]
        layer = candidate if isinstance(candidate, MultipoleLayer) else None
    if layer is None or query.shape[2] > 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if layer.state is None:
        layer.build_state(attention_mask)
    layer._attended = True
    out = layer.state.attend(query[:, :, 0, :], scale=scaling)  # [B, Hq, D]
    return out.unsqueeze(1), None


def _left_to_right(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each sequence's last ``lengths[b]`` tokens of ``x [B, H, N, D]`` to the front."""
    n = x.shape[2]
    index = (torch.arange(n, device=x.device) + (n - lengths).unsqueeze(1)) % n  # [B, N]
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


AttentionInterface.register(ATTENTION_NAME, multipole_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
