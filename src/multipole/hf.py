"""Hugging Face transformers integration: a cache and an attention function, no model edits.

    import multipole
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multipole")
    out = model.generate(**inputs, past_key_values=multipole.MultipoleCache(cfg))

Importing this module registers the attention function ``"multipole"`` (and transformers' SDPA
mask under the same name, so padding masks reach it). Prompt processing (any query longer
than one token) is exact SDPA. At the first one-token decode step of a layer, the keys and
values of every sequence (left padding removed) become a :class:`~multipole.MultipoleState`,
which then answers every decode step and absorbs new tokens with its online update.

Which keys are clustered (``MultipoleConfig.position_free_keys``):

- False (default): the cached, RoPE'd keys, scored with the real query. No extra memory.
- True: position-free keys, as in the paper's code. transformers hands the attention function
  RoPE'd keys only, so each key is un-rotated once, when it enters the state (by its position,
  with the angles of the model's own RoPE parameters), and kept beside the cache: one more copy
  of the keys (+50% of the KV memory). The lookup query is the real query rotated from its
  position to ``lookup_position``, which costs one small rotation per step.

``method`` picks the decode state of every layer (``multipole.baselines.METHODS``), so every
baseline runs through the same cache. With tensor parallelism (transformers ``tp_plan``) each
rank sees its own KV heads; k-means is seeded per global KV head, so results do not depend on
the number of ranks. Beam search, a second prompt after decoding (multi-turn reuse,
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
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .baselines import METHODS
from .config import MultipoleConfig
from .state import DecodeState

ATTENTION_NAME = "multipole"

# The cache whose ``update`` ran last in this context: every supported model calls
# ``past_key_values.update(...)`` right before its attention function, for the same layer.
_ACTIVE_CACHE: contextvars.ContextVar[MultipoleCache | None] = contextvars.ContextVar(
    "multipole_active_cache", default=None
)


class MultipoleLayer(DynamicLayer):
    """One layer's cache: dense keys and values during the prompt, a decode state after."""

    def __init__(self, config: MultipoleConfig, method: str = "multipole") -> None:
        super().__init__()
        self.config = config
        self.method = method
        self.state: DecodeState | None = None
        self.rotary: Rotary | None = None  # set when keys are clustered position-free
        self._length = 0  # padded length, as transformers counts positions
        self._attended = True  # the attention function consumed the last decode update
        self._returned: torch.Tensor | None = None  # keys the last update handed the model

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
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        else:
            cluster_keys = None
            if self.rotary is not None:  # the new token sits at position seq_len of its row
                cluster_keys = self.rotary.rotate(key_states, -self.state._seq_lens_device[:, None])
            self.state.append(key_states, value_states, cluster_keys=cluster_keys)
            keys, values = key_states, value_states
        self._returned = keys
        return keys, values

    def owns(self, key: torch.Tensor) -> bool:
        """Whether ``key`` (what the attention function got) came from this layer's last
        update, and not from another cache used since."""
        return key is self._returned

    def get_seq_length(self) -> int:
        return self._length

    def build_state(self, attention_mask: torch.Tensor | None, module: torch.nn.Module) -> None:
        """Turn the dense prompt cache into a decode state (left padding removed).

        Token ``j`` of a sequence then sits at position ``j``: ``generate`` numbers the
        positions of a left-padded row from its first real token.
        """
        keys, values = self.keys, self.values
        b, h, n, d = keys.shape
        if attention_mask is None:
            lengths = torch.full((b,), n, dtype=torch.int64, device=keys.device)
        else:
            valid = attention_mask[:, 0, -1, -n:]  # [B, N]: the last query row sees every key
            lengths = valid.sum(-1)
            keys, values = _left_to_right(keys, lengths), _left_to_right(values, lengths)
        cluster_keys = None
        if self.config.position_free_keys:
            self.rotary = Rotary.of(module, d, keys.device)
            cluster_keys = self.rotary.rotate(keys, -torch.arange(n, device=keys.device)[None])
        self.state = METHODS[self.method].prefill(
            keys,
            values,
            self.config,
            cluster_keys=cluster_keys,
            lengths=lengths,
            first_kv_head=_first_kv_head(module, h),
        )
        self.keys = self.values = None  # the state holds them now

    def lookup_query(self, query: torch.Tensor) -> torch.Tensor | None:
        """``query [B, Hq, D]`` of the newest token rotated to ``lookup_position``; None when
        keys are clustered as cached (the query itself then scores the centroids)."""
        if self.rotary is None:
            return None
        delta = self.config.lookup_position + 1 - self.state._seq_lens_device
        return self.rotary.rotate(query.unsqueeze(2), delta[:, None])[:, :, 0]

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
            (``None`` in the list keeps that layer dense: stock transformers attention).
        method: the decode method of every layer, a key of ``multipole.baselines.METHODS``
            (``"multipole"``, ``"centroid_only"``, ``"quest"``, ``"oracle_topk"``,
            ``"window"``, ``"dense"``), so baselines run through the same cache.
    """

    def __init__(
        self,
        config: MultipoleConfig | list[MultipoleConfig | None] | None = None,
        *,
        method: str = "multipole",
    ):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        config = MultipoleConfig() if config is None else config
        self.layer_configs = config if isinstance(config, list) else None
        if isinstance(config, list):
            for i, c in enumerate(config):
                if c is not None and not isinstance(c, MultipoleConfig):
                    raise TypeError(f"config[{i}]: expected a MultipoleConfig or None, got {c!r}")
        elif not isinstance(config, MultipoleConfig):
            raise TypeError(f"config: expected a MultipoleConfig, got {type(config).__name__}")
        super().__init__(layer_class_to_replicate=functools.partial(MultipoleLayer, config, method))
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            cfg = self.config if self.layer_configs is None else self._layer_config(index)
            self.layers.append(
                MultipoleLayer(cfg, self.method) if cfg is not None else DynamicLayer()
            )
        _ACTIVE_CACHE.set(self)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def read_fraction(self) -> float:
        """Bytes of keys, values and metadata the last decode step read over the dense bytes,
        summed over layers (a layer kept dense, or not decoding yet, counts as a full read)."""
        read = dense = 0
        for layer in self.layers:
            state = getattr(layer, "state", None)
            if state is None or state._reads is None:
                keys = getattr(layer, "keys", None)
                layer_bytes = 0 if keys is None else 2 * keys.numel() * keys.element_size()
                read, dense = read + layer_bytes, dense + layer_bytes
            else:
                stats = state.stats()
                read, dense = read + stats.bytes_read, dense + stats.dense_bytes
        return read / dense if dense else 1.0

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
    _ACTIVE_CACHE.set(None)  # read once: a later call through another cache must not see it
    layer = None
    if cache is not None and getattr(module, "layer_idx", None) is not None:
        candidate = cache.layers[module.layer_idx]
        layer = candidate if isinstance(candidate, MultipoleLayer) and candidate.owns(key) else None
    if layer is None or query.shape[2] > 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if layer.state is None:
        layer.build_state(attention_mask, module)
    layer._attended = True
    q = query[:, :, 0, :]  # [B, Hq, D]
    out = layer.state.attend(q, lookup_q=layer.lookup_query(q), scale=scaling)
    return out.unsqueeze(1), None


class Rotary:
    """Rotations by the model's RoPE angles (transformers' rotate-half layout), to move a
    RoPE'd vector from one position to another: ``rotate(x, delta)`` turns ``RoPE(x~, t)``
    into ``RoPE(x~, t + delta)``, and ``delta = -t`` gives the position-free ``x~``."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.double()  # [D / 2]; float64 angles stay exact at 1M tokens

    @classmethod
    def of(cls, module: torch.nn.Module, head_dim: int, device: torch.device) -> Rotary:
        """The RoPE frequencies of ``module.config`` (default, linear, llama3, yarn, ...)."""
        config = module.config
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        partial = params.get("partial_rotary_factor", 1.0)
        if partial != 1.0 or rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(
                f"MultipoleConfig.position_free_keys: RoPE of type {rope_type!r} with "
                f"partial_rotary_factor={partial} is not supported (position-dependent or "
                "partial rotations); use position_free_keys=False"
            )
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
            inv_freq = 1.0 / params["rope_theta"] ** (exponents / head_dim)
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        if inv_freq.numel() * 2 != head_dim:
            raise NotImplementedError(
                f"MultipoleConfig.position_free_keys: RoPE over {2 * inv_freq.numel()} of "
                f"{head_dim} head dims is not supported; use position_free_keys=False"
            )
        return cls(inv_freq.to(device))

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, D]`` rotated by ``delta [B or 1, T or 1]`` positions."""
        angles = delta.double()[:, None, :, None] * self.inv_freq  # [B|1, 1, T|1, D/2]
        cos = angles.cos().float().repeat(1, 1, 1, 2)
        sin = angles.sin().float().repeat(1, 1, 1, 2)
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


def _first_kv_head(module: torch.nn.Module, local_kv_heads: int) -> int:
    """Global index of this rank's first KV head under tensor parallelism (0 otherwise)."""
    total = getattr(module.config, "num_key_value_heads", None) or local_kv_heads
    if total == local_kv_heads:
        return 0
    if total % local_kv_heads or not torch.distributed.is_initialized():
        raise ValueError(
            f"multipole attention: the layer holds {local_kv_heads} of the model's {total} KV "
            "heads; tensor parallelism needs num_key_value_heads divisible by the TP size and "
            "torch.distributed initialised"
        )
    ranks = total // local_kv_heads
    return (torch.distributed.get_rank() % ranks) * local_kv_heads


def _left_to_right(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each sequence's last ``lengths[b]`` tokens of ``x [B, H, N, D]`` to the front."""
    n = x.shape[2]
    index = (torch.arange(n, device=x.device) + (n - lengths).unsqueeze(1)) % n  # [B, N]
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


AttentionInterface.register(ATTENTION_NAME, multipole_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
