"""One decode step of a layer (append a token, attend one query) replayed as a CUDA graph.

An eager step through :class:`~multipole.MultipoleState` costs far more host time than GPU time
(argument checks, the cache write, host bookkeeping, six to eight Triton launches and their
buffers): at batch 1 the fused attention needs about 0.1 ms of GPU per layer, the Python around it
several times that. From one step to the next a step does the same work on the same buffers
with only device-side values changing (the new token's position is read from the device copy
of the lengths), so :class:`GraphedStep` captures it once and replays it, as vLLM and SGLang
graph attention "piecewise"::

    step = GraphedStep(state)              # one per layer
    out = step(keys, values, q)            # == state.append(keys, values); state.attend(q)

Online updates do not stop the replays: when the next append would run one, it runs first
(:meth:`~multipole.MultipoleState.advance_before_append`: it clusters only tokens already in
the cache) and writes the kernels' layout in place (:class:`multipole.fused.FusedLayout` has
room for ``LAYOUT_ROOM_UPDATES`` updates), then the step replays.

What runs eagerly instead (always correct, the graph is then re-captured):

- the step at which the cache must grow, and the next one;
- any step whose captured launch arguments would be stale: another kernel layout (built anew
  when the index outgrows the old one's room), other storages (the cache reallocated by a
  growth), another config, scale or tuning (:data:`multipole.fused.TUNING`), or inputs of
  another shape, dtype or device (compared at every step: cheap host checks);
- everything off CUDA, states that are not :class:`~multipole.MultipoleState` (or override
  its step), the PyTorch backend, ``validate=True`` on CUDA (it syncs), inputs that require
  grad, multi-token appends, and calls made while the caller itself captures a graph.

A step is captured only right after an eager step with the same captured arguments ran on the
same static input buffers, so every Triton kernel is compiled and every lazily made buffer
exists before the capture. The capture runs the step's host side once (``seq_lens`` moves on)
and its device side not at all; the replay that follows runs the device side once (cache
write, ``_seq_lens_device += 1``, attention): one step in all. Every later replay moves the
host lengths on itself and points ``state._reads`` at the counters the graph writes, so
``state.stats()`` stays right. If a capture fails, the host state is restored, the step runs
eagerly, and the object stays eager from then on (:attr:`GraphedStep.failure` says why).

Returned tensors: a replayed step returns the graph's static output, which the next replay of
the same object overwrites (copy it to keep it; a model consumes it before the next step of
the layer). Cloning every step would add a launch and an allocation to exactly the host path
this removes, and a transformer never needs it.

Streams and memory: capture runs on a side stream (a capture cannot run on the legacy default
stream) in ``thread_local`` mode, without ``torch.cuda.graph``'s device synchronisation,
garbage collection and cache flush (costly inside a running model); nothing executes during a
capture, so work still queued on other streams is no concern, and replays run on the caller's
current stream, ordered with the model's own work. Each object holds one private memory pool
(the step's temporaries and output: a few small blocks, one 2 MiB segment in practice) reused
by its later captures, plus static input buffers; the graph also keeps alive the kernel
scratch and small device tensors it captured, even if the state replaces them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from . import fused
from .checks import should_validate
from .state import DecodeState, MultipoleState

# MultipoleState methods a captured step runs: a subclass overriding one is stepped eagerly
_STEP_METHODS = (
    "append",
    "attend",
    "_attend",
    "_attend_fused",
    "_layout",
    "_fused_budget",
    "_backend",
    "_check_query",
    "_advance_due",
    "_on_advance",
    "_after_advance",
    "advance_before_append",
    "appends_before_update",
    "_select_rows",
    "_reserve_tokens",
)
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class GraphedStep:
    """``append`` one token and ``attend`` one query on a decode state, replayed as a CUDA
    graph, across online updates (see the module docstring for what falls back to eager).

    Args:
        state: the layer's decode state. Graphs need a :class:`~multipole.MultipoleState` on
            CUDA whose config resolves to the Triton backend; any other state runs eagerly.
        enabled: False runs every step eagerly (for comparisons).

    Attributes:
        replays, captures, eager_steps: how the steps ran (a capture step also replays once
            and is counted as a capture only).
        failure: why graphs were switched off after a failed capture (None: they were not).
    """

    def __init__(self, state: DecodeState, *, enabled: bool = True) -> None:
        self.state = state
        self.replays = self.captures = self.eager_steps = 0
        self.failure: str | None = None
        self._enabled = enabled and graphable_state(state)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._held: tuple = ()  # what the graph reads and writes, kept alive
        self._out: torch.Tensor | None = None
        self._reads = None
        # the previous graph: kept until the next capture, so that its memory pool stays live
        # and is reused (a pool whose graphs are all gone cannot be captured into again)
        self._keeper: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._warm_key: tuple | None = None  # arguments of the last eager step on the buffers
        self._warm_held: tuple = ()
        self._static: tuple | None = None  # input buffers (keys, values, q, lookup_q, ck)
        self._static_meta: tuple | None = None
        self._seq_lens: list[int] | None = None  # the state's list when _free was counted
        self._free = 0  # one-token appends left with no update and no cache growth

    # ------------------------------------------------------------------ the step
    def __call__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        q: torch.Tensor,
        *,
        lookup_q: torch.Tensor | None = None,
        scale: float | None = None,
        cluster_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``state.append(keys, values, cluster_keys=cluster_keys)`` then
        ``state.attend(q, lookup_q=lookup_q, scale=scale)``; returns its output (on a replay:
        the graph's static output, overwritten by this object's next replay).

        ``keys``, ``values`` (and ``cluster_keys``): ``[B, H_kv, 1, D]``; ``q`` (and
        ``lookup_q``): ``[B, H_q, D]``, as for the state's own methods. A ``lookup_q`` or
        ``cluster_keys`` computed from ``state._seq_lens_device`` must be computed before the
        call (the step adds 1 to it).
        """
        inputs = (keys, values, q, lookup_q, cluster_keys)
        if (
            not self._enabled
            or not _plain(inputs, scale)
            or torch.cuda.is_current_stream_capturing()
        ):
            return self._eager(inputs, scale, static=False)
        state = self.state
        if state.seq_lens is not self._seq_lens:  # stepped eagerly, or appended to elsewhere
            self._count_free()
        if self._free == 0 and state.appends_before_update() == 0:
            state.advance_before_append()  # the update now: the step can still replay
            self._count_free()
        key = self._key(inputs, scale)
        if self._free > 0:
            if self._graph is not None and key == self._graph_key:
                return self._replay(inputs)
            if key == self._warm_key:
                out = self._capture(inputs, key, scale)
                if out is not None:
                    return out
        self._release()
        return self._eager(inputs, scale, static=self._fused_path(lookup_q is None, keys))

    def release(self) -> None:
        """Drop the graph, its memory pool and the static buffers (the next step is eager)."""
        self._release()
        self._keeper = self._pool = None
        self._warm_key, self._warm_held = None, ()
        self._static = self._static_meta = None

    # ------------------------------------------------------------------ internals
    def _fused_path(self, lookup_is_query: bool, keys: torch.Tensor) -> bool:
        return fused_path(self.state, lookup_is_query, keys)

    def _count_free(self) -> None:
        self._free = free_steps(self.state)
        self._seq_lens = self.state.seq_lens

    def _key(self, inputs: tuple, scale: float | None) -> tuple:
        """Everything a capture bakes in (:func:`state_key`), and the inputs' layout."""
        return (
            *state_key(self.state),
            scale,
            *[None if t is None else (t.shape, t.dtype, t.device) for t in inputs],
        )

    def _identities(self) -> tuple:
        return state_identities(self.state)

    def _load(self, inputs: tuple) -> tuple:
        """The static input buffers, holding ``inputs`` (made again if their shapes change)."""
        meta = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in inputs)
        if meta != self._static_meta:
            self._release()  # the graph reads the old buffers
            self._warm_key, self._warm_held = None, ()
            self._static = tuple(
                None if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                for t in inputs
            )
            self._static_meta = meta
        dst = [s for s in self._static if s is not None]
        src = [t for t in inputs if t is not None]
        torch._foreach_copy_(dst, src)
        return self._static

    def _eager(self, inputs: tuple, scale: float | None, static: bool) -> torch.Tensor:
        """One eager step; on the static buffers, it warms the capture of the next step."""
        self.eager_steps += 1
        self._warm_key, self._warm_held = None, ()
        keys, values, q, lookup_q, cluster_keys = self._load(inputs) if static else inputs
        state = self.state
        state.append(keys, values, cluster_keys=cluster_keys)
        out = state.attend(q, lookup_q=lookup_q, scale=scale)
        if static:
            self._warm_key, self._warm_held = self._key(inputs, scale), self._identities()
        return out

    def _replay(self, inputs: tuple) -> torch.Tensor:
        dst = [s for s in self._static if s is not None]
        torch._foreach_copy_(dst, [t for t in inputs if t is not None])
        self._graph.replay()
        state = self.state
        state.seq_lens = self._seq_lens = [n + 1 for n in state.seq_lens]
        state._reads = self._reads
        self._free -= 1
        self.replays += 1
        return self._out

    def _capture(self, inputs: tuple, key: tuple, scale: float | None) -> torch.Tensor | None:
        """Capture this step, then replay it once; None (host state restored, graphs off) if
        the capture fails."""
        state = self.state
        keys, values, q, lookup_q, cluster_keys = self._load(inputs)
        saved = state.seq_lens, state._reads
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()

        def step() -> torch.Tensor:
            state.append(keys, values, cluster_keys=cluster_keys)
            return state.attend(q, lookup_q=lookup_q, scale=scale)

        try:
            graph, out = capture(step, state.device, self._pool)
        except Exception as error:  # any failure: restore the host state, step eagerly
            state.seq_lens, state._reads = saved
            _stay_eager(self, error)
            return None
        self._graph, self._graph_key, self._keeper = graph, key, None
        self._held = (held_by_step(state), self._static)
        self._out, self._reads = out, state._reads
        self._warm_key, self._warm_held = None, ()
        # the capture ran the host side of the step (seq_lens moved on), this runs the device side
        graph.replay()
        self._seq_lens = state.seq_lens
        self._free -= 1
        self.captures += 1
        return out

    def _release(self) -> None:
        """Forget the graph (stale); its memory pool stays live for the next capture."""
        if self._graph is not None:
            self._keeper = self._graph
            self._graph = self._graph_key = self._out = self._reads = None
            self._held = ()


class GraphableLayer(Protocol):
    """What :class:`GraphedDecoder` needs of each layer of a cache (``MultipoleLayer`` has it;
    a layer without it keeps the whole step eager)."""

    def graph_key(self) -> tuple[tuple, tuple] | None:
        """What a capture of the layer's next one-token step bakes in (compared by value) and
        the objects behind it (held while the key is); None: the step cannot be captured."""

    def graph_free_steps(self) -> int:
        """One-token steps the layer can take with the same captured work."""

    def graph_advance(self) -> None:
        """Run the online updates the next one-token step would run, before it (see
        :meth:`multipole.MultipoleState.advance_before_append`)."""

    def graph_snapshot(self) -> object:
        """The layer's host state, for :meth:`graph_restore` after a failed capture."""

    def graph_restore(self, snapshot: object) -> None: ...

    def graph_captured(self) -> Callable[[], None]:
        """Called right after a capture (which ran the step's host side once): returns what
        every later replay must do on the host (lengths move on, read counts)."""


class GraphedDecoder:
    """A model's whole one-token decode step (embedding, every layer, the LM head) replayed as
    one CUDA graph, across online updates.

    :class:`GraphedStep` graphs the attention of each layer; the rest of an eager transformers
    step (norms, projections, RoPE, MLPs: tens of launches and about 1 ms of Python per layer
    in a 36-layer model) still bounds a step by the host. This captures the whole forward
    once and replays it, for decode loops written by hand (``model.generate`` drives its own
    loop)::

        decoder = GraphedDecoder(model, cache)            # cache: a prefilled MultipoleCache
        logits = decoder(next_ids, position_ids)          # [B, vocab], both inputs [B, 1]

    The same rules as :class:`GraphedStep`: a step is captured right after an eager step
    with the same captured arguments on the same static input buffers and replayed while
    every layer has steps left before a cache growth; online updates due run before the
    replay (each layer's ``graph_advance``); otherwise the step runs eagerly (and is
    captured again). A replay returns the graph's static logits, overwritten by the
    next replay. Between calls, change the cache only through this object; after anything
    else (a prompt chunk, a reorder, a crop) call :meth:`release`. A layer that is not a
    :class:`GraphableLayer` (a layer kept dense, a baseline method, the PyTorch backend) keeps
    every step eager; so does a failed capture (:attr:`failure` says why).

    Args:
        model: a transformers causal LM whose attention the cache's layers serve.
        cache: the model's cache, already holding the prompt.
        enabled: False steps eagerly (for comparisons).
    """

    def __init__(self, model: torch.nn.Module, cache: Any, *, enabled: bool = True) -> None:
        from .hf import cache_keyword  # (hf imports this module)

        self.model, self.cache = model, cache
        self._cache_keyword = cache_keyword(model)
        self.replays = self.captures = self.eager_steps = 0
        self.failure: str | None = None
        self._enabled = enabled
        self._graph: torch.cuda.CUDAGraph | None = None
        self._keeper: torch.cuda.CUDAGraph | None = None  # keeps the pool live (GraphedStep)
        self._pool = None
        self._graph_key: tuple | None = None
        self._held: tuple = ()
        self._out: torch.Tensor | None = None
        self._replayed: list[Callable[[], None]] = []
        self._free = 0
        self._length = -1  # the cache's length after the last replay
        self._warm_key: tuple | None = None
        self._warm_held: tuple = ()
        self._static: tuple[torch.Tensor, ...] | None = None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``input_ids`` and ``position_ids`` ``[B, 1]``; returns the last
        position's logits ``[B, vocab]`` (on a replay: the graph's static output)."""
        inputs = (input_ids, position_ids)
        if (
            not self._enabled
            or not self._on_cuda(input_ids)
            or torch.cuda.is_current_stream_capturing()
        ):
            return self._forward(*inputs)
        meta = self._meta(inputs)
        if (  # online updates due: run them before the step, which then replays
            self._graph is not None
            and self._free == 0
            and self.cache.get_seq_length() == self._length
        ):
            for layer in self.cache.layers:
                layer.graph_advance()
            self._free = self._free_steps()
        key, held = self._key(meta)  # every step: a config or tuning change must re-capture
        if (
            self._graph is not None
            and self._free > 0
            and key == self._graph_key
            and self.cache.get_seq_length() == self._length
        ):
            torch._foreach_copy_(list(self._static), list(inputs))
            self._graph.replay()
            for replayed in self._replayed:
                replayed()
            self._free -= 1
            self._length += 1
            self.replays += 1
            return self._out
        self._release()
        static = self._load(inputs)
        if key is not None and key == self._warm_key and self._free_steps() > 0:
            out = self._capture(static, key)
            if out is not None:
                return out
        self._warm_key, self._warm_held = None, ()
        out = self._forward(*static)
        self.eager_steps += 1
        self._warm_key, self._warm_held = self._key(meta)
        return out

    def release(self) -> None:
        """Drop the graph, its memory pool and the static buffers (the next step is eager)."""
        self._release()
        self._keeper = self._pool = None
        self._warm_key, self._warm_held = None, ()
        self._static = None

    # ------------------------------------------------------------------ internals
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                **{self._cache_keyword: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1]

    @staticmethod
    def _on_cuda(t: torch.Tensor) -> bool:
        return t.is_cuda  # (the CPU tests emulate graphs through this)

    @staticmethod
    def _meta(inputs: tuple) -> tuple:
        return tuple((t.shape, t.dtype, t.device) for t in inputs)

    def _key(self, meta: tuple) -> tuple[tuple | None, tuple]:
        keys, held = [meta], []
        for layer in self.cache.layers:
            graph_key = getattr(layer, "graph_key", None)
            found = graph_key() if graph_key is not None else None
            if found is None:
                return None, ()
            keys.append(found[0])
            held.append(found[1])
        return tuple(keys), tuple(held)

    def _free_steps(self) -> int:
        return min(layer.graph_free_steps() for layer in self.cache.layers)

    def _load(self, inputs: tuple) -> tuple[torch.Tensor, ...]:
        if self._static is None or self._meta(self._static) != self._meta(inputs):
            self._warm_key, self._warm_held = None, ()
            self._static = tuple(torch.empty_like(t) for t in inputs)
        torch._foreach_copy_(list(self._static), list(inputs))
        return self._static

    def _capture(self, static: tuple, key: tuple) -> torch.Tensor | None:
        """Capture this step and replay it once; None (host state restored, graphs off) if
        the capture fails."""
        layers = self.cache.layers
        snapshots = [layer.graph_snapshot() for layer in layers]
        free = self._free_steps()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph, out = capture(lambda: self._forward(*static), static[0].device, self._pool)
        except Exception as error:  # any failure: restore the host state, step eagerly
            for layer, snapshot in zip(layers, snapshots, strict=True):
                layer.graph_restore(snapshot)
            _stay_eager(self, error)
            return None
        self._graph, self._graph_key, self._keeper = graph, key, None
        # what the graph uses, taken after the capture (which may have made some of it)
        self._held, self._out = (self._key(key[0])[1], static), out
        self._replayed = [layer.graph_captured() for layer in layers]
        self._warm_key, self._warm_held = None, ()
        graph.replay()  # the capture ran the host side of the step, this runs the device side
        self._free = free - 1
        self._length = self.cache.get_seq_length()
        self.captures += 1
        return out

    def _release(self) -> None:
        if self._graph is not None:
            self._keeper = self._graph
            self._graph = self._graph_key = self._out = None
            self._held, self._replayed = (), []


# ---------------------------------------------------------------------- what a capture needs
def graphable_state(state: DecodeState) -> bool:
    """Whether ``state``'s one-token step can be captured: a :class:`MultipoleState` on CUDA
    that overrides none of the methods a step runs."""
    cls = type(state)
    return (
        isinstance(state, MultipoleState)
        and state.device.type == "cuda"
        and all(getattr(cls, m) is getattr(MultipoleState, m) for m in _STEP_METHODS)
    )


def fused_path(state: MultipoleState, lookup_is_query: bool, keys: torch.Tensor) -> bool:
    """Whether the state's attend runs the fused kernels without syncing (graphable)."""
    try:
        triton = state._backend(lookup_is_query) == "triton"
    except (RuntimeError, ValueError):  # the eager step raises the state's own error
        return False
    return triton and not should_validate(state.config.validate, keys)


def free_steps(state: MultipoleState) -> int:
    """One-token steps the state can take with no online update and no cache growth."""
    stores = (state._keys, state._values, state._cluster_keys, state.index.labels)
    capacity = min(t.shape[2] for t in stores if t is not None)
    return min(state.appends_before_update(), capacity - max(state.seq_lens))


def state_identities(state: MultipoleState) -> tuple:
    """The objects a captured step reads and writes through their addresses."""
    return (
        state._fused,
        state._keys,
        state._values,
        state._cluster_keys,
        state._seq_lens_device,
    )


def state_key(state: MultipoleState) -> tuple:
    """Everything a captured step bakes in: objects by identity (hold
    :func:`state_identities` while a key is kept, so that an id cannot be reused), values by
    value."""
    return (
        *map(id, state_identities(state)),
        state.config,
        tuple(vars(fused.TUNING).values()),
    )


def held_by_step(state: MultipoleState) -> tuple:
    """What a captured step of ``state`` must keep alive: its identities, the kernel
    layout's scratch and workspace, and the small device tensors it made."""
    layout = state._fused
    return (
        state_identities(state),
        () if layout is None else (*layout.scratch.values(), *layout.workspace.values()),
        tuple(state._device_cache.values()),
    )


def capture(
    fn: Callable[[], Any], device: torch.device, pool: tuple
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` into a new graph using memory ``pool``; returns the graph and what
    ``fn`` returned (nothing has run on the device yet). Capture runs on a side stream in
    ``thread_local`` mode, without ``torch.cuda.graph``'s synchronisation, garbage collection
    and cache flush; on failure the pool is closed again and the error raised."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
    except Exception:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with contextlib.suppress(Exception):  # a failed capture may leave it recording
            torch._C._cuda_endAllocateToPool(index, pool)
        raise
    return graph, out


def _stay_eager(runner: GraphedStep | GraphedDecoder, error: Exception) -> None:
    """After a failed capture: no graphs for ``runner`` from now on, and a warning why."""
    runner._enabled = False
    runner.failure = f"{type(error).__name__}: {error}"
    runner.release()
    warnings.warn(
        f"{type(runner).__name__}: CUDA graph capture failed, stepping eagerly from now on "
        f"({runner.failure})",
        RuntimeWarning,
        stacklevel=4,
    )


def _plain(inputs: tuple, scale: object) -> bool:
    """Inputs a graph can take: tensors (keys, values, q; optional others), one new token, no
    autograd, a plain scale. Anything else steps eagerly (and the state raises if invalid)."""
    keys = inputs[0]
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] != 1:
        return False
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        return False
    grad = torch.is_grad_enabled()
    for i, t in enumerate(inputs):
        if t is None and i > 2:
            continue
        if not isinstance(t, torch.Tensor) or (grad and t.requires_grad):
            return False
    return True
