"""Hugging Face transformers integration: a cache and an attention function, no model edits.

    import multipole
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multipole")
    out = model.generate(**inputs, past_key_values=multipole.MultipoleCache(cfg))

(transformers releases that renamed the argument, 5.25 among them, take ``cache=`` instead;
``cache_keyword(model)`` gives the name the installed one uses.)

Importing this module registers the attention function ``"multipole"`` (and transformers' SDPA
mask under the same name, so padding masks reach it). Prompt processing (any query longer
than one token) is exact SDPA. At the first one-token decode step of a layer, the keys and
values of every sequence (left padding removed) become a :class:`~multipole.MultipoleState`,
which then answers every decode step and absorbs new tokens with its online update. On CUDA a
layer's decode step (append the token, attend) is replayed as a CUDA graph between online
updates (:class:`multipole.graphs.GraphedStep`; ``MultipoleCache(cuda_graphs=False)`` turns it
off): the rest of the model still runs eagerly.

Multi-turn reuse: calling ``generate`` again with the same cache and the whole conversation
as ``input_ids`` works. transformers then feeds the uncached tail (the next user turn) as one
multi-token chunk: it is appended to the state (its clusters updated online, as for generated
tokens) and its queries attend exactly, causally, over every cached token and the chunk, as
in a prefill. This needs the cached sequences of a batch to have the same length and no
padding (batch 1, or a batch with equal prompts and no padding) and no padding in the chunk;
a ragged batch raises ``NotImplementedError`` and leaves the cache as it was.

Long generations (``max_new_tokens`` in the tens of thousands) hold the KV cache and the index
plus spare capacity: the per-token stores (keys, values, clustering keys, cluster labels) grow
by 1/8 of their size (at least 1024 slots) when full, the centroid stores (one slot per
``1 / centroid_ratio`` tokens) likewise. :meth:`MultipoleCache.memory_bytes` reports the
bytes held.

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
the number of ranks. Beam search reorders the decode states in place
(:meth:`~multipole.MultipoleState.select_sequences`); speculative decoding (assisted
generation) crops its rejected draft tokens from the recent window
(:meth:`~multipole.MultipoleState.drop_newest`: drafts shorter than ``interval``). Selecting or
repeating sequences after decoding, ragged multi-turn batches and ``output_attentions`` are not
supported and raise.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import graphs
from .baselines import METHODS
from .config import MultipoleConfig
from .graphs import GraphedStep
from .state import DecodeState

ATTENTION_NAME = "multipole"

# The cache whose ``update`` ran last in this context: every supported model updates its cache
# (``past_key_values.update(...)``, ``cache.update(...)`` in newer releases) right before its
# attention function, for the same layer.
_ACTIVE_CACHE: contextvars.ContextVar[MultipoleCache | None] = contextvars.ContextVar(
    "multipole_active_cache", default=None
)


class MultipoleLayer(DynamicLayer):
    """One layer's cache: dense keys and values during the prompt, a decode state after."""

    def __init__(
        self, config: MultipoleConfig, method: str = "multipole", cuda_graphs: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        self.method = method
        self.state: DecodeState | None = None
        self.rotary: Rotary | None = None  # set when keys are clustered position-free
        self._length = 0  # padded length, as transformers counts positions
        self._attended = True  # the attention function consumed the last decode update
        self._returned: torch.Tensor | None = None  # keys the last update handed the model
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # chunk to absorb
        # the decode step's new token (keys, values, clustering keys), appended by decode()
        self._token: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.step: GraphedStep | None = None  # append + attend, a CUDA graph between updates
        self.cuda_graphs = cuda_graphs

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new_tokens = key_states.shape[-2]
        if not self._attended:  # the last decode step or chunk never reached the state
            raise RuntimeError(
                "MultipoleCache: the model's attention is not 'multipole'; load the model "
                "with attn_implementation='multipole' or call "
                "model.set_attn_implementation('multipole') (after importing multipole.hf)"
            )
        if self.state is None:
            self._length += new_tokens
            if new_tokens == 1:  # the first decode step: the attention function builds the state
                self._attended = False
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        elif new_tokens == 1:  # a decode step: appended with the attention, as one step
            self._attended = False
            self._length += 1
            cluster_keys = None
            if self.rotary is not None:  # the new token sits at position seq_len of its row
                cluster_keys = self.rotary.rotate(key_states, -self.state._seq_lens_device[:, None])
            self._token = (key_states, value_states, cluster_keys)
            keys, values = key_states, value_states
        else:  # several tokens after decoding (the next turn of a conversation)
            self._check_chunk_batch()
            # kept aside until the attention function has checked the mask: a chunk it
            # rejects must leave the state as it was
            self._pending = (key_states, value_states)
            self._attended = False
            keys, values = key_states, value_states
        self._returned = keys
        return keys, values

    def _check_chunk_batch(self) -> None:
        """A multi-token chunk after decoding needs every cached sequence at the padded length."""
        lengths = self.state.seq_lens
        if any(n != self._length for n in lengths):
            raise NotImplementedError(
                "MultipoleCache: a multi-token input after decoding started (multi-turn reuse) "
                "needs every sequence of the batch at the same length with no padding; this "
                f"ragged batch holds {lengths} tokens (padded length {self._length}). Reuse the "
                "cache one sequence at a time, or start a new cache"
            )

    def absorb_chunk(
        self, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the chunk kept by :meth:`update` to the state; return the keys and values of
        every sequence (cached tokens, then the chunk), ``[B, H_kv, L + T, D]``, and the
        causal mask ``[1, 1, T, L + T]`` over them, for exact attention of the chunk's queries.

        ``attention_mask`` (the mask transformers built for the chunk) must be that causal
        mask: padding anywhere (cached tokens or chunk) raises ``NotImplementedError``, with
        the cache left as it was.
        """
        keys, values = self._pending
        self._pending = None
        self._attended = True
        n, t = self._length, keys.shape[-2]
        device = keys.device
        query_positions = n + torch.arange(t, device=device)
        causal = torch.arange(n + t, device=device) <= query_positions[:, None]  # [T, L + T]
        if attention_mask is not None:
            visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            if visible.shape[-2:] != causal.shape or not torch.equal(
                visible, causal.expand_as(visible)
            ):
                raise NotImplementedError(
                    "MultipoleCache: a multi-token input after decoding started (multi-turn "
                    "reuse) must see every cached token and the causal prefix of its own "
                    "tokens, but its mask hides some: padding in the attention mask (a ragged "
                    "batch) or a sliding window is not supported. Reuse the cache one sequence "
                    "at a time, or start a new cache"
                )
        cluster_keys = None
        if self.rotary is not None:  # token i of the chunk sits at position seq_len + i
            cluster_keys = self.rotary.rotate(keys, -query_positions[None])
        self.state.append(keys, values, cluster_keys=cluster_keys)
        self._length += t
        return self.state.keys, self.state.values, causal[None, None]

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

    def decode(self, query: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Append the step's new token (if :meth:`update` kept one) and attend ``query
        [B, Hq, D]``, through :attr:`step` (a CUDA graph replay, across online updates)."""
        if self.step is None:
            self.step = GraphedStep(self.state, enabled=self.cuda_graphs)
        if self._token is None:  # the first decode step: the state already holds the token
            return self.state.attend(query, lookup_q=self.lookup_query(query, 1), scale=scale)
        (keys, values, cluster_keys), self._token = self._token, None
        lookup_q = self.lookup_query(query, 0)
        return self.step(
            keys, values, query, lookup_q=lookup_q, scale=scale, cluster_keys=cluster_keys
        )

    def lookup_query(self, query: torch.Tensor, appended: int) -> torch.Tensor | None:
        """``query [B, Hq, D]`` of the newest token rotated to ``lookup_position``, with
        ``appended`` (0 or 1) telling whether the state holds that token yet; None when keys
        are clustered as cached (the query itself then scores the centroids)."""
        if self.rotary is None:
            return None
        delta = self.config.lookup_position + appended - self.state._seq_lens_device
        return self.rotary.rotate(query.unsqueeze(2), delta[:, None])[:, :, 0]

    # ------------------------------------------------------------------ whole-step graphs
    def graph_key(self) -> tuple[tuple, tuple] | None:
        """:class:`multipole.graphs.GraphableLayer`: a decoding Multipole state on the fused
        kernels, with no token or chunk waiting."""
        state = self.state
        if (
            state is None
            or self._pending is not None
            or self._token is not None
            or not graphs.graphable_state(state)
            or not graphs.fused_path(state, self.rotary is None, state._keys)
        ):
            return None
        return (*graphs.state_key(state), self.rotary is None), graphs.held_by_step(state)

    def graph_free_steps(self) -> int:
        return graphs.free_steps(self.state)

    def graph_advance(self) -> None:
        self.state.advance_before_append()

    def graph_snapshot(self) -> object:
        state = self.state
        return (self._length, self._attended, self._token, self._returned,
                state.seq_lens, state._reads)  # fmt: skip

    def graph_restore(self, snapshot: object) -> None:
        (self._length, self._attended, self._token, self._returned,
         self.state.seq_lens, self.state._reads) = snapshot  # fmt: skip

    def graph_captured(self) -> Callable[[], None]:
        state, reads = self.state, self.state._reads

        def replayed() -> None:
            self._length += 1
            state.seq_lens = [n + 1 for n in state.seq_lens]
            state._reads = reads

        return replayed

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` takes the cache of beam ``beam_idx[i]``."""
        if self.state is None:
            super().reorder_cache(beam_idx)
        else:
            self.state.select_sequences(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            raise NotImplementedError("MultipoleCache: cannot repeat the batch after decoding")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            raise NotImplementedError("MultipoleCache: cannot select sequences after decoding")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (transformers' convention: a negative
        count, as speculative decoding passes for its rejected draft tokens)."""
        if self.state is None:
            super().crop(tokens_to_remove)
            self._length = 0 if self.keys is None else self.keys.shape[-2]
            return
        if tokens_to_remove > 0:
            raise NotImplementedError(
                "MultipoleCache: crop(n) with n > 0 (the legacy 'keep n tokens' form) after "
                "decoding started; pass -count to drop the newest count tokens"
            )
        try:
            self.state.drop_newest(-tokens_to_remove)
        except ValueError as err:
            raise NotImplementedError(
                f"MultipoleCache: cannot crop {-tokens_to_remove} tokens after decoding: {err}"
                f" (use fewer draft tokens than config.interval = {self.config.interval})"
            ) from err
        self._length += tokens_to_remove


class MultipoleCache(Cache):
    """A transformers ``Cache`` running Multipole Attention at every decode step.

    Args:
        config: one :class:`MultipoleConfig` for every layer, or a list with one per layer
            (``None`` in the list keeps that layer dense: stock transformers attention).
        method: the decode method of every layer, a key of ``multipole.baselines.METHODS``
            (``"multipole"``, ``"centroid_only"``, ``"quest"``, ``"oracle_topk"``,
            ``"window"``, ``"dense"``), so baselines run through the same cache.
        cuda_graphs: replay each layer's decode step (append the token, attend) as a CUDA
            graph between online updates (:class:`multipole.graphs.GraphedStep`: the step's
            host time, several times its GPU time at batch 1, drops to one graph launch).
            Only Multipole states with the fused kernels on CUDA are graphed; False (or any
            other case) runs every step eagerly.
    """

    def __init__(
        self,
        config: MultipoleConfig | list[MultipoleConfig | None] | None = None,
        *,
        method: str = "multipole",
        cuda_graphs: bool = True,
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
        self.cuda_graphs = cuda_graphs
        super().__init__(
            layer_class_to_replicate=functools.partial(MultipoleLayer, config, method, cuda_graphs)
        )
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            cfg = self.config if self.layer_configs is None else self._layer_config(index)
            self.layers.append(
                MultipoleLayer(cfg, self.method, self.cuda_graphs)
                if cfg is not None
                else DynamicLayer()
            )
        _ACTIVE_CACHE.set(self)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def read_fraction(self) -> float:
        """Bytes of keys, values and metadata the last decode step read over the dense bytes,
        summed over layers (a layer kept dense, or not decoding yet, counts as a full read)."""
        read, dense, decoding = 0, 0, []
        for layer in self.layers:
            state = getattr(layer, "state", None)
            if state is None or state._reads is None:
                keys = getattr(layer, "keys", None)
                layer_bytes = 0 if keys is None else 2 * keys.numel() * keys.element_size()
                read, dense = read + layer_bytes, dense + layer_bytes
            else:
                layer_read, layer_dense = state.bytes_read()
                decoding.append(layer_read)
                dense += layer_dense
        if decoding:  # one sync for all layers
            read += int(torch.stack(decoding).sum())
        return read / dense if dense else 1.0

    def memory_bytes(self) -> int:
        """Bytes of the tensors the cache holds, each storage counted once at its allocated
        size (spare capacity included): the dense keys and values of layers not decoding, and
        everything the decode state of the others keeps (keys, values, clustering keys, the
        cluster index, kernel layouts and scratch, the last step's read counts)."""
        seen: set[int] = set()
        total = 0
        for layer in self.layers:
            state = getattr(layer, "state", None)
            roots = [state] if state is not None else [layer.keys, layer.values]
            total += sum(_held_bytes(root, seen, set()) for root in roots)
        return total

    def _layer_config(self, index: int) -> MultipoleConfig | None:
        if index >= len(self.layer_configs):
            raise ValueError(
                f"config: a list of {len(self.layer_configs)} per-layer configs, but the model "
                f"has a layer {index}"
            )
        return self.layer_configs[index]


# Every SDPA backend but cuDNN: PyTorch prefers cuDNN on Hopper, and cuDNN builds a new plan
# for every new KV length, so each decode step of a dense layer paid milliseconds of host time
# (a SmolLM2-shaped step with a stock cache, 4 x 4K tokens, on an H100: 104 ms with cuDNN,
# 31 ms without; benchmarks/profile_teacher_forced.py).
_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
]  # fmt: skip


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword that hands a cache to ``model(...)`` and ``model.generate(...)``: ``"cache"``
    with transformers releases that renamed it (5.25 here: ``past_key_values`` still works,
    deprecated until 5.40 for a model's forward and 6.0 for ``generate``), else
    ``"past_key_values"``. Read from the forward's named parameters (through torch.compile,
    DDP and PEFT wrappers), or from the library's cache names for a forward that takes
    ``**kwargs`` only. Example: ``model.generate(**inputs, **{cache_keyword(model): cache})``."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(inner, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    parameters = inspect.signature(inner.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


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
    SDPA (a chunk after decoding over the state's keys and values: see
    :meth:`MultipoleLayer.absorb_chunk`); a one-token query of a Multipole layer runs
    :meth:`MultipoleState.attend`.
    """
    if kwargs.get("output_attentions"):
        raise NotImplementedError("multipole attention: output_attentions=True is not supported")
    cache = _ACTIVE_CACHE.get()
    _ACTIVE_CACHE.set(None)  # read once: a later call through another cache must not see it
    layer = None
    if cache is not None and getattr(module, "layer_idx", None) is not None:
        candidate = cache.layers[module.layer_idx]
        layer = candidate if isinstance(candidate, MultipoleLayer) and candidate.owns(key) else None
    if layer is not None and layer._pending is not None:  # a chunk after decoding: exact
        key, value, attention_mask = layer.absorb_chunk(attention_mask)
        layer = None
    if layer is None or query.shape[2] > 1:
        with sdpa_kernel(_SDPA_BACKENDS):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                **kwargs,
            )  # fmt: skip
    window = kwargs.get("sliding_window")
    if window is not None and layer.get_seq_length() > window:
        raise NotImplementedError(
            f"MultipoleCache: layer {module.layer_idx} attends through a sliding window of "
            f"{window} tokens and its sequences now hold {layer.get_seq_length()}: Multipole "
            "Attention approximates full attention and has no window. Set the model config's "
            "sliding_window to None (full attention) or keep these layers dense (None in the "
            "list of per-layer configs)"
        )
    if layer.state is None:
        layer.build_state(attention_mask, module)
    layer._attended = True
    out = layer.decode(query[:, :, 0, :], scaling)  # query [B, Hq, 1, D] -> [B, Hq, D]
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


def _held_bytes(obj: object, storages: set[int], visited: set[int]) -> int:
    """Bytes of the tensor storages reachable from ``obj`` (through containers and the
    attributes of multipole objects) not yet in ``storages``, which collects them."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in storages:
            return 0
        storages.add(storage.data_ptr())
        return storage.nbytes()
    if id(obj) in visited:
        return 0
    visited.add(id(obj))
    if isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, list | tuple):
        children = obj
    elif type(obj).__module__.startswith("multipole.") and hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return 0
    return sum(_held_bytes(child, storages, visited) for child in children)


def _left_to_right(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each sequence's last ``lengths[b]`` tokens of ``x [B, H, N, D]`` to the front."""
    n = x.shape[2]
    index = (torch.arange(n, device=x.device) + (n - lengths).unsqueeze(1)) % n  # [B, N]
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


AttentionInterface.register(ATTENTION_NAME, multipole_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
