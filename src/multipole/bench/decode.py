"""End-to-end decode benchmark: Multipole Attention against dense attention in a whole model.

A model shaped like a popular LLM (``bench/archs/<name>.json``: the published config, random
weights made on the device) decodes a batch of sequences greedily, once with a dense cache
and stock SDPA, once with a :class:`~multipole.MultipoleCache`. The prompt is not run through
the model: every layer's cache is filled with the same synthetic keys and values (keys near a
few hundred directions per KV head, so k-means has structure to find), and the clustering of
the Multipole cache is timed on its own (the prefill). Per-step times come from CUDA events
after warm-up steps; both methods run in the same process, one after the other, so their
ratio compares like with like. Before timing, a Multipole cache whose budget covers the whole
context must give dense's first-step logits (bf16 tolerance).

The dense cache is preallocated and token-major: a step writes its token at each row's
length (kept on the device) and FlashAttention-2, the kernel of SDPA's flash backend, reads each
row's used prefix through its variable-length entry point, with GQA and no mask.
(transformers' ``StaticCache`` would attend over its whole buffer through a mask, which sends
SDPA to a slower kernel or repeats the KV heads.) With fixed shapes and lengths on the device,
both methods replay the whole decode step (every layer and the LM head) as one CUDA graph
(:class:`multipole.graphs.GraphedDecoder`; Multipole's online updates run before a replay):
an eager transformers step costs about 1 ms of Python per layer, which would hide the
attention at every batch size.
``--graphs layer`` graphs only each Multipole layer's attention step (dense eager),
``--graphs none`` runs both eagerly; no torch.compile.

Long contexts with large batches do not fit at full depth: by default each (context, batch)
runs the largest number of layers whose weights, caches and clustering workspace fit in 85% of
the free GPU memory (printed up front; ``--layers`` sets it). A truncated model keeps the full
embedding and LM head, whose cost does not shrink with the depth, so its speed-up understates
the full model's.

    multipole bench decode --arch qwen3-8b --context 32768,65536,131072 --batch 1,4,16 \\
        --out decode.json --plot decode.png
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ..config import MultipoleConfig
from ..generate import parse_budget, sync, versions
from ..graphs import GraphedDecoder
from ..hf import MultipoleCache, MultipoleLayer
from ..state import MultipoleState
from . import git_revision

ARCHS_DIR = Path(__file__).with_name("archs")
MEMORY_FRACTION = 0.85  # of the free GPU memory, for weights, caches and workspace
DIRECTIONS = 256  # synthetic keys: directions per KV head
NOISE = 0.3  # synthetic keys: noise norm relative to the direction's
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
CHECK_LAYERS = 2  # decoder layers of the check
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRAPH_MODES = {  # --graphs: how the steps run
    "step": "both methods replay the whole decode step (every layer, the LM head) as one CUDA "
    "graph (multipole.graphs.GraphedDecoder; online updates run before a replay)",
    "layer": "dense eager; multipole eager except each layer's decode step (token write and "
    "attention), replayed as a CUDA graph (online updates run before a replay)",
    "none": "eager for both methods",
}


# ---------------------------------------------------------------------------- architectures
def arch_names() -> list[str]:
    """Architectures shipped in ``bench/archs``."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


def load_arch(name: str) -> dict[str, Any]:
    """The transformers config dict of architecture ``name``."""
    path = ARCHS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"arch: expected one of {', '.join(arch_names())}, got {name!r}")
    return json.loads(path.read_text())["config"]


def build_model(
    arch: dict[str, Any], layers: int, *, dtype: torch.dtype, device: str, seed: int = 0
) -> PreTrainedModel:
    """A random-weight model of ``arch`` with its first ``layers`` decoder layers, made
    directly on ``device`` in ``dtype`` (``device="meta"`` allocates nothing)."""
    config = AutoConfig.for_model(**{**arch, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the memory plan and the synthetic caches need to know of an architecture."""

    layers_full: int
    num_kv_heads: int
    head_dim: int
    fixed_bytes: int  # weights outside the decoder layers (embedding, LM head, norm)
    layer_bytes: int  # weights of one decoder layer

    @classmethod
    def of(cls, arch: dict[str, Any], dtype: torch.dtype) -> Shape:
        def weight_bytes(layers: int) -> int:
            model = build_model(arch, layers, dtype=dtype, device="meta")
            return sum(p.numel() * p.element_size() for p in model.parameters())

        one, two = weight_bytes(1), weight_bytes(2)
        heads = arch["num_attention_heads"]
        return cls(
            layers_full=arch["num_hidden_layers"],
            num_kv_heads=arch.get("num_key_value_heads") or heads,
            head_dim=arch.get("head_dim") or arch["hidden_size"] // heads,
            fixed_bytes=2 * one - two,
            layer_bytes=two - one,
        )

    def kv_bytes(self, batch: int, tokens: int, elem_size: int) -> int:
        """Keys and values of one layer."""
        return 2 * batch * self.num_kv_heads * tokens * self.head_dim * elem_size


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs besides the model."""

    arch: str
    shape: Shape
    config: MultipoleConfig
    steps: int
    warmup: int
    dtype: torch.dtype
    device: str
    seed: int
    graphs: str = "step"  # CUDA graphs: "step" (whole step), "layer" (multipole only), "none"

    def capacity(self, context: int) -> int:
        return context + self.warmup + self.steps + 1


# ---------------------------------------------------------------------------- memory plan
def index_overhead(config: MultipoleConfig, head_dim: int, elem_size: int) -> float:
    """Bytes of the cluster index per byte of keys and values: labels (int64) and the fused
    kernels' token order (int32) per token, float32 and cache-dtype key and value centroids and
    sizes per cluster, doubled as headroom (growth by 1/8 and the update's scratch)."""
    per_cluster = 2 * head_dim * 4 + 8 + 2 * head_dim * elem_size
    per_token = 8 + 4 + 2 * config.centroid_ratio * per_cluster
    return per_token / (2 * head_dim * elem_size)


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Memory that clustering one layer needs beyond the state it leaves (its synthetic
    keys and values, gathered copies, k-means scratch): ``fixed + per_kv * KV bytes``."""

    fixed: float
    per_kv: float


# The PyTorch k-means path: the source, gathered keys and values, the values in float32 twice
ASSUMED_WORKSPACE = Workspace(fixed=2**30, per_kv=4.5)


def measure_workspace(s: Settings, context: int = 16384) -> Workspace:
    """Measure :class:`Workspace` on the GPU: cluster one layer at batch 1 and 4 and fit a
    line through the peaks (also compiles the kernels once)."""
    points = []
    for batch in (1, 4):
        _free(s.device)
        base = torch.cuda.memory_allocated(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
        keys, values = synthetic_kv(
            s.shape, batch, context, context, dtype=s.dtype, device=s.device, seed=s.seed
        )
        state = MultipoleState.prefill(keys, values, s.config)
        del keys, values
        sync(s.device)
        kept = torch.cuda.memory_allocated(s.device) - base
        peak = torch.cuda.max_memory_allocated(s.device) - base - kept
        points.append((s.shape.kv_bytes(batch, context, _elem_size(s.dtype)), peak))
        del state
    (x1, y1), (x2, y2) = points
    per_kv = max(0.0, (y2 - y1) / (x2 - x1))
    return Workspace(fixed=max(0.0, y1 - per_kv * x1), per_kv=per_kv)


def layers_that_fit(
    shape: Shape,
    batch: int,
    tokens: int,
    elem_size: int,
    config: MultipoleConfig,
    free_bytes: int,
    workspace: Workspace = ASSUMED_WORKSPACE,
) -> int:
    """Most decoder layers (up to the full depth) whose weights, Multipole caches and index
    fit in ``MEMORY_FRACTION`` of ``free_bytes``, with ``workspace`` to cluster one more layer
    and 1 GiB for the rest. The dense run, whose cache is freed before, needs less."""
    kv = shape.kv_bytes(batch, tokens, elem_size)
    per_layer = shape.layer_bytes + kv * (1 + index_overhead(config, shape.head_dim, elem_size))
    room = MEMORY_FRACTION * free_bytes - shape.fixed_bytes - 2**30
    room -= workspace.fixed + workspace.per_kv * kv
    return max(0, min(shape.layers_full, int(room // per_layer)))


# ---------------------------------------------------------------------------- caches
def synthetic_kv(
    shape: Shape,
    batch: int,
    context: int,
    capacity: int,
    *,
    dtype: torch.dtype,
    device: str,
    seed: int,
    token_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[B, H_kv, capacity, D]`` of one layer (``token_major``: laid out as
    ``[B, capacity, H_kv, D]``), the first ``context`` tokens filled (the rest zero): each key
    near one of ``DIRECTIONS`` directions of its head, each value near a vector tied to that
    direction. Same ``seed``, same numbers in either layout."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d = shape.num_kv_heads, shape.head_dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    directions = F.normalize(randn(h, DIRECTIONS, d).float(), dim=-1).to(dtype) * math.sqrt(d)
    value_centers = randn(h, DIRECTIONS, d)
    size = (batch, capacity, h, d) if token_major else (batch, h, capacity, d)
    keys = torch.zeros(size, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    heads = torch.arange(h, device=device)[:, None]
    for b in range(batch):  # one sequence at a time bounds the temporaries
        which = torch.randint(DIRECTIONS, (h, context), generator=gen, device=device)
        k = directions[heads, which].add_(randn(h, context, d), alpha=NOISE)
        v = value_centers[heads, which].add_(randn(h, context, d))
        if token_major:
            keys[b, :context], values[b, :context] = k.transpose(0, 1), v.transpose(0, 1)
        else:
            keys[b, :, :context], values[b, :, :context] = k, v
    return keys, values


class DenseLayer(DynamicLayer):
    """The dense baseline's cache of one layer: keys and values ``[B, capacity, H_kv, D]``
    (token-major: the batch packs into FlashAttention's variable-length layout) allocated
    once. A step writes its token at each row's length, read on the device, and attention
    reads each row's used prefix (:func:`_dense_decode_attention`): the shapes never change,
    so the step can be captured in a CUDA graph (the layer is a
    :class:`multipole.graphs.GraphableLayer`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.buffers = (keys, values)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        batch, self.capacity = keys.shape[:2]
        self.length = length  # host copy of the (equal) row lengths
        self.lengths = torch.full((batch,), length, dtype=torch.int32, device=keys.device)
        offsets = torch.arange(batch + 1, dtype=torch.int32, device=keys.device)
        self.cum_q, self.cum_k = offsets, offsets * self.capacity
        self.row_starts = self.cum_k[:-1].long()

    def get_seq_length(self) -> int:
        return self.length

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] != 1 or self.length >= self.capacity:
            raise RuntimeError(
                f"bench decode: the dense cache takes one-token steps up to {self.capacity} "
                f"tokens; got {key_states.shape[-2]} tokens at length {self.length}"
            )
        slots = self.row_starts + self.lengths
        for buffer, new in zip(self.buffers, (key_states, value_states), strict=True):
            buffer.view(-1, *buffer.shape[2:]).index_copy_(0, slots, new[:, :, 0])
        self.lengths += 1
        self.length += 1
        _ACTIVE_DENSE.set(self)
        return key_states, value_states

    # multipole.graphs.GraphableLayer
    def graph_key(self) -> tuple[tuple, tuple]:
        return (id(self.buffers[0]), id(self.lengths)), (self.buffers, self.lengths)

    def graph_free_steps(self) -> int:
        return self.capacity - self.length

    def graph_snapshot(self) -> object:
        return self.length

    def graph_restore(self, snapshot: object) -> None:
        self.length = snapshot

    def graph_captured(self) -> Callable[[], None]:
        def replayed() -> None:
            self.length += 1

        return replayed


DENSE_ATTENTION = "multipole_bench_dense"
_ACTIVE_DENSE: contextvars.ContextVar[DenseLayer | None] = contextvars.ContextVar(
    "multipole_bench_dense_layer", default=None
)


def _dense_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The dense baseline's decode attention: FlashAttention-2 (the kernel of PyTorch SDPA's
    flash backend) through its variable-length entry point, with native GQA, no mask, and
    each row's used length read on the device (``seqused_k``), so that a CUDA graph can hold
    it. Measured on the H200 as fast as SDPA on the same prefix (within 5% either way, 32K and
    128K, batch 1-16: ``benchmarks/probe_dense_graph.py``). Off CUDA: SDPA's math backend."""
    layer = _ACTIVE_DENSE.get()
    _ACTIVE_DENSE.set(None)
    if query.shape[2] != 1 or attention_mask is not None or layer is None:
        raise RuntimeError("bench decode: the dense baseline runs one-token steps without mask")
    q = query[:, :, 0]  # [B, Hq, D]
    if not q.is_cuda:
        n = layer.length
        k, v = (t[:, :n].transpose(1, 2) for t in layer.buffers)
        with sdpa_kernel([SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)[
                :, :, 0
            ]
    else:
        packed = [t.view(-1, *t.shape[2:]) for t in layer.buffers]
        out = torch.ops.aten._flash_attention_forward(
            q, *packed, layer.cum_q, layer.cum_k, 1, layer.capacity, 0.0, False, False,
            scale=scaling, seqused_k=layer.lengths,
        )[0]  # fmt: skip
    return out.unsqueeze(1), None


AttentionInterface.register(DENSE_ATTENTION, _dense_decode_attention)


def warm_up_kernels(s: Settings, num_q_heads: int, context: int, batch: int) -> None:
    """Compile every kernel a timed step or online update of ``batch`` sequences of ``context``
    tokens runs, on a one-layer cache of that shape with the benchmark's heads, head dim and
    dtype (Triton compiles on first use, and again for sizes it specialises differently: a
    first update at a new context took about 1 s for 36 layers on the H200 without this, and
    the first at batch 16 after a warm-up at batch 1 about 2 s on the H100)."""
    dim = s.shape.head_dim
    capacity = s.capacity(context)
    keys, values = synthetic_kv(
        s.shape, batch, context, capacity, dtype=s.dtype, device=s.device, seed=1
    )
    lengths = torch.full((batch,), context, dtype=torch.int64, device=keys.device)
    state = MultipoleState.prefill(keys, values, s.config, lengths=lengths)
    for _ in range(2 * s.config.interval + 1):  # crosses at least one online update
        state.append(*(t[:, :, :1] for t in (keys, values)))
        state.attend(torch.randn(batch, num_q_heads, dim, device=s.device, dtype=s.dtype))
    sync(s.device)
    del state, keys, values
    _free(s.device)


def dense_cache(layers_kv: list[tuple[torch.Tensor, torch.Tensor]], context: int) -> Cache:
    """A dense cache over token-major buffers holding ``context`` tokens per layer."""
    return Cache(layers=[DenseLayer(k, v, context) for k, v in layers_kv])


def multipole_cache(
    config: MultipoleConfig,
    make_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    layers: int,
    context: int,
    device: str,
    layer_graphs: bool = True,
) -> tuple[Cache, float]:
    """A MultipoleCache whose layer ``i`` holds ``make_kv(i)`` (``context`` valid tokens),
    clustered now; returns the cache and the clustering time in ms (all layers).
    ``layer_graphs``: each layer replays its own decode step as a CUDA graph."""
    cache = MultipoleCache(config, cuda_graphs=layer_graphs)
    clustering_ms = 0.0
    for i in range(layers):
        keys, values = make_kv(i)
        lengths = torch.full((keys.shape[0],), context, dtype=torch.int64, device=keys.device)
        sync(device)
        start = time.perf_counter()
        state = MultipoleState.prefill(keys, values, config, lengths=lengths)
        sync(device)
        clustering_ms += (time.perf_counter() - start) * 1e3
        del keys, values
        layer = MultipoleLayer(config, cuda_graphs=layer_graphs)
        layer.state, layer._length = state, context  # as if the prompt had run
        cache.layers.append(layer)
    return cache, clustering_ms


# ---------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class Decoded:
    """Per-step times (ms) of the timed steps, the first step's logits, online updates."""

    step_ms: list[float]
    first_logits: torch.Tensor
    update_steps: list[int]
    graph_steps: dict[str, int]  # how the steps ran: replays, captures, eager steps


def decode(
    model: PreTrainedModel,
    cache: Cache,
    first_ids: torch.Tensor,
    context: int,
    *,
    steps: int,
    warmup: int,
    whole_step_graph: bool = True,
) -> Decoded:
    """Greedy decode ``warmup + steps`` tokens of a batch whose caches hold ``context``
    tokens, feeding back the argmax; times the last ``steps`` (CUDA events on a GPU). Each
    step runs through a :class:`~multipole.graphs.GraphedDecoder` (one CUDA graph per step
    between online updates; eager if ``whole_step_graph`` is False or off CUDA)."""
    device = first_ids.device
    cuda = device.type == "cuda"
    total = warmup + steps
    positions = torch.arange(context, context + total, device=device).view(total, 1)
    batch = first_ids.shape[0]
    states = [getattr(layer, "state", None) for layer in cache.layers]
    clustered = (lambda: sum(states[0].clustered_len)) if states[0] is not None else (lambda: 0)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * total)] if cuda else []
    wall: list[float] = []
    ids, first_logits, updates = first_ids, None, []
    step = GraphedDecoder(model, cache, enabled=whole_step_graph)
    with torch.no_grad():
        for i in range(total):
            before = clustered()
            start = time.perf_counter()
            if cuda:
                events[2 * i].record()
            logits = step(ids, positions[i : i + 1].expand(batch, 1))
            ids = logits.argmax(-1, keepdim=True)
            if cuda:
                events[2 * i + 1].record()
            else:
                wall.append((time.perf_counter() - start) * 1e3)
            if i == 0:
                first_logits = logits.float().clone()
            if i >= warmup and clustered() != before:
                updates.append(i - warmup)
    if cuda:
        torch.cuda.synchronize(device)
        wall = [events[2 * i].elapsed_time(events[2 * i + 1]) for i in range(total)]
    graph_steps = dict(replays=step.replays, captures=step.captures, eager=step.eager_steps)
    step.release()
    if step.failure is not None:
        raise RuntimeError(f"bench decode: the whole-step CUDA graph failed: {step.failure}")
    return Decoded(wall[warmup:], first_logits, updates, graph_steps)


# ---------------------------------------------------------------------------- one configuration
def run_method(
    method: str,
    model: PreTrainedModel,
    s: Settings,
    context: int,
    batch: int,
    layers: int,
    config: MultipoleConfig | None = None,
) -> tuple[dict[str, Any], Decoded]:
    """Fill one method's caches for (context, batch), decode, free; return its row."""
    capacity = s.capacity(context)

    def make_kv(layer: int, token_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        seed = s.seed * 1_000_003 + layer  # the same numbers for every method
        return synthetic_kv(
            s.shape, batch, context, capacity, dtype=s.dtype, device=s.device, seed=seed,
            token_major=token_major,
        )  # fmt: skip

    gen = torch.Generator(device=s.device).manual_seed(s.seed)
    vocab = model.config.vocab_size
    first_ids = torch.randint(vocab, (batch, 1), generator=gen, device=s.device)
    cuda = torch.device(s.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
    cfg = config or s.config

    def fill_and_decode() -> tuple[Decoded, float | None, float]:
        clustering_ms = None
        if method == "dense":
            model.set_attn_implementation(DENSE_ATTENTION)
            cache = dense_cache([make_kv(i, token_major=True) for i in range(layers)], context)
        else:
            model.set_attn_implementation("multipole")
            cache, clustering_ms = multipole_cache(
                cfg, make_kv, layers, context, s.device, layer_graphs=s.graphs == "layer"
            )
        result = decode(
            model, cache, first_ids, context, steps=s.steps, warmup=s.warmup,
            whole_step_graph=s.graphs == "step",
        )  # fmt: skip
        return (
            result,
            clustering_ms,
            (cache.read_fraction() if isinstance(cache, MultipoleCache) else 1.0),
        )

    # multipole.hf holds the cache in a context variable from a layer's update to its
    # attention; a run that stops in between (out of memory) must not keep it alive
    result, clustering_ms, fraction = contextvars.copy_context().run(fill_and_decode)
    _free(s.device)
    times = sorted(result.step_ms)
    median = statistics.median(times)
    mean = statistics.fmean(times)
    updates = [result.step_ms[i] for i in result.update_steps]
    row = dict(
        context=context,
        batch=batch,
        method=method,
        layers_run=layers,
        layers_full=s.shape.layers_full,
        budget=None if method == "dense" else cfg.token_budget,
        steps=s.steps,
        warmup=s.warmup,
        median_ms=median,
        mean_ms=mean,
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        tokens_per_s=batch / (median * 1e-3),
        tokens_per_s_mean=batch / (mean * 1e-3),
        clustering_ms=clustering_ms,
        read_fraction=fraction,
        online_updates=len(updates),
        update_step_ms=statistics.fmean(updates) if updates else None,
        graph_steps=result.graph_steps,
        peak_memory_gb=torch.cuda.max_memory_allocated(s.device) / 1e9 if cuda else None,
    )
    return row, result


def check(model: PreTrainedModel, s: Settings, context: int, batch: int, layers: int) -> dict:
    """First-step logits of a Multipole cache whose budget covers the context against dense,
    through ``layers`` decoder layers (few: rounding differences grow with the depth of a
    random-weight model, to about the bf16 tolerance at 36 layers, while caches that differ
    give errors of order 1)."""
    one_step = dataclasses.replace(s, steps=1, warmup=0)
    _, dense = run_method("dense", model, one_step, context, batch, layers)
    full = dataclasses.replace(s.config, token_budget=context)
    _, ours = run_method("multipole", model, one_step, context, batch, layers, config=full)
    a, b = ours.first_logits, dense.first_logits
    max_rel_err = float((a - b).abs().max() / b.abs().max())
    tolerance = TOLERANCE[s.dtype]
    return dict(
        context=context,
        batch=batch,
        layers=layers,
        budget=context,
        max_rel_err=max_rel_err,
        rel_err_norm=float((a - b).norm() / b.norm()),
        tolerance=tolerance,
        passed=max_rel_err <= tolerance,
    )


# ---------------------------------------------------------------------------- report
def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table."""
    header = ("context", "B", "layers", "method", "med ms", "mean ms", "tok/s", "x dense")
    header += ("x mean", "KV read", "cluster s", "updates")
    lines = ["{:>8} {:>3} {:>6} {:<10} {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7}"]
    lines[0] = lines[0].format(*header)
    for r in rows:
        cluster = "" if r["clustering_ms"] is None else f"{r['clustering_ms'] / 1e3:.2f}"
        lines.append(
            f"{r['context']:>8} {r['batch']:>3} {r['layers_run']:>3}/{r['layers_full']:<2} "
            f"{r['method']:<10} {r['median_ms']:>8.2f} {r['mean_ms']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['speedup_vs_dense']:>7.2f} "
            f"{r['speedup_vs_dense_mean']:>7.2f} {r['read_fraction']:>7.1%} {cluster:>9} "
            f"{r['online_updates']:>7}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Tokens/s against context, one panel per batch size, dense and multipole (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = report["rows"], report["meta"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for method, style in (("dense", "s--"), ("multipole", "o-")):
            mine = [r for r in rows if r["batch"] == batch and r["method"] == method]
            mine.sort(key=lambda r: r["context"])
            contexts = [r["context"] for r in mine]
            ax.plot(contexts, [r["tokens_per_s"] for r in mine], style, label=method)
            if method == "multipole":
                for r in mine:
                    label = f"{r['speedup_vs_dense']:.2f}x\n{r['layers_run']} layers"
                    offset = dict(xytext=(0, 6), textcoords="offset points")
                    point = (r["context"], r["tokens_per_s"])
                    ax.annotate(label, point, fontsize=7, ha="center", **offset)
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [_tokens(c) for c in contexts])
        ax.set_ylim(bottom=0)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.legend()
    budget = meta["config"]["token_budget"]
    fig.suptitle(
        f"{meta['arch']} (random weights), {meta['gpu'] or 'CPU'}, budget {budget}; "
        "truncated depths keep the full embedding and LM head",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; ``argv`` as after ``bench decode``. Returns the report."""
    args = _parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    arch = load_arch(args.arch)
    shape = Shape.of(arch, dtype)
    if args.layers is not None and args.layers > shape.layers_full:
        raise SystemExit(f"--layers: {args.arch} has {shape.layers_full}, got {args.layers}")
    s = Settings(
        args.arch,
        shape,
        MultipoleConfig(token_budget=args.budget),
        args.steps,
        args.warmup,
        dtype,
        device,
        args.seed,
        graphs=args.graphs,
    )
    free, workspace = None, ASSUMED_WORKSPACE
    if cuda:
        workspace = measure_workspace(s) if args.layers is None else workspace
        _free(device)
        free = torch.cuda.mem_get_info(device)[0]
    contexts, batches = sorted(args.context), sorted(args.batch)
    plan = plan_layers(s, contexts, batches, free, args.layers, workspace)
    command = ["multipole", "bench", "decode", *(sys.argv[1:] if argv is None else argv)]
    meta = dict(
        arch=args.arch,
        source=json.loads((ARCHS_DIR / f"{args.arch}.json").read_text())["source"],
        device=device,
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        dtype=str(dtype).removeprefix("torch."),
        config=s.config.to_dict(),
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        free_memory_gb=None if free is None else free / 1e9,
        memory_fraction=MEMORY_FRACTION,
        clustering_workspace=dataclasses.asdict(workspace),
        execution=GRAPH_MODES[s.graphs]
        + " (no torch.compile); every kernel compiled before timing (a one-layer warm-up at "
        "each context and batch that crosses an online update)",
        dense_cache="token-major buffers allocated once, the token written at each row's "
        "length on the device; attention: FlashAttention-2 (the kernel of SDPA's flash "
        "backend) through torch.ops.aten._flash_attention_forward with seqused_k, native GQA, "
        "no mask, whatever transformers would do",
        note="a truncated model keeps the full embedding and LM head: its speed-up "
        "understates the full model's",
        versions=versions(),
        git_sha=git_revision(),
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command=" ".join(command),
    )
    report: dict[str, Any] = dict(meta=meta, rows=[])
    run(s, arch, plan, report, out=args.out, progress=not args.quiet)
    print(
        f"\n{meta['gpu'] or 'CPU'}, {args.arch} (random weights), {meta['dtype']}, budget "
        f"{s.config.token_budget}, {args.steps} timed steps; {meta['note']}"
    )
    print(format_table(report["rows"]))
    print(f"wrote {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return report


def plan_layers(
    s: Settings,
    contexts: list[int],
    batches: list[int],
    free_bytes: int | None,
    layers: int | None = None,
    workspace: Workspace = ASSUMED_WORKSPACE,
) -> dict[tuple[int, int], int]:
    """Decoder layers of each (context, batch): ``layers`` if given, else the most that fit
    in the free GPU memory (the full depth on the CPU). Prints the plan."""
    shape, elem = s.shape, _elem_size(s.dtype)
    index = index_overhead(s.config, shape.head_dim, elem)
    if layers is not None:
        how = "--layers"
    elif free_bytes is None:
        how = "full depth on the CPU"
    else:
        how = f"the most that fit in {MEMORY_FRACTION:.0%} of {free_bytes / 2**30:.1f} GiB free"
    print(
        f"layers per configuration ({how}); weights {shape.fixed_bytes / 2**30:.2f} GiB "
        f"+ {shape.layer_bytes / 2**30:.2f} GiB per layer, multipole index +{index:.0%} of "
        f"the KV, clustering workspace {workspace.fixed / 2**30:.2f} GiB + "
        f"{workspace.per_kv:.1f} x one layer's KV:"
    )
    plan = {}
    for context in contexts:
        for batch in batches:
            tokens = s.capacity(context)
            if layers is not None:
                plan[context, batch] = layers
            elif free_bytes is None:
                plan[context, batch] = shape.layers_full
            else:
                fit = layers_that_fit(shape, batch, tokens, elem, s.config, free_bytes, workspace)
                plan[context, batch] = fit
            kv = shape.kv_bytes(batch, tokens, elem) / 2**30
            print(
                f"  {context:>7} tokens, batch {batch:>3}: {plan[context, batch]:>3}/"
                f"{shape.layers_full} layers, KV {kv:.2f} GiB per layer",
                flush=True,
            )
    if not all(plan.values()):
        raise SystemExit("multipole bench decode: not one layer fits for some configuration")
    return plan


def run(
    s: Settings,
    arch: dict[str, Any],
    plan: dict[tuple[int, int], int],
    report: dict[str, Any],
    *,
    out: str,
    progress: bool = True,
) -> None:
    """The check, then every configuration of ``plan``: rows appended to ``report`` (written
    to ``out`` after each configuration). A configuration that runs out of GPU memory is run
    again with a quarter fewer layers."""
    from tqdm import tqdm

    meta = report["meta"]
    bar = tqdm(total=1 + len(plan), desc="check", file=sys.stderr, disable=not progress)
    models: dict[int, PreTrainedModel] = {}  # the model of the current depth only

    def model_with(layers: int) -> PreTrainedModel:
        if layers not in models:
            models.clear()
            _free(s.device)
            models[layers] = build_model(arch, layers, dtype=s.dtype, device=s.device, seed=s.seed)
        return models[layers]

    for (context, batch), layers in plan.items():
        if torch.device(s.device).type == "cuda":
            if layers not in models:  # room for the warm-up's one layer of this shape
                models.clear()
                _free(s.device)
            warm_up_kernels(s, arch["num_attention_heads"], context, batch)
        if "check" not in meta:
            depth = min(layers, CHECK_LAYERS)
            meta["check"] = c = check(model_with(depth), s, context, batch, depth)
            bar.update(1)
            _say(
                bar,
                f"check ({context} tokens, batch {batch}, {c['layers']} layers, full budget): max "
                f"rel. error of the first-step logits {c['max_rel_err']:.2e} (tolerance "
                f"{c['tolerance']:.0e})",
            )
            if not c["passed"]:
                _write(out, report)
                raise SystemExit("multipole bench decode: check failed, nothing timed")
        bar.set_description(f"{context} tokens, batch {batch}")
        while True:
            try:
                dense, _ = run_method("dense", model_with(layers), s, context, batch, layers)
                ours, _ = run_method("multipole", model_with(layers), s, context, batch, layers)
                break
            except torch.cuda.OutOfMemoryError:
                pass  # leaving the except block drops the traceback and the caches it holds
            _free(s.device)
            if layers == 1:
                raise SystemExit(f"multipole bench decode: {context} tokens x {batch}: OOM")
            layers -= max(1, layers // 4)
            _say(bar, f"out of memory at {context} tokens, batch {batch}: {layers} layers now")
        for row in (dense, ours):
            row["speedup_vs_dense"] = dense["median_ms"] / row["median_ms"]
            row["speedup_vs_dense_mean"] = dense["mean_ms"] / row["mean_ms"]
        report["rows"] += [dense, ours]
        bar.update(1)
        _say(
            bar,
            f"{context} tokens, batch {batch}, {layers} layers: dense {dense['median_ms']:.2f} "
            f"ms, multipole {ours['median_ms']:.2f} ms ({ours['speedup_vs_dense']:.2f}x; "
            f"means: {ours['speedup_vs_dense_mean']:.2f}x)",
        )
        _write(out, report)
    bar.close()
    models.clear()
    _free(s.device)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="multipole bench decode",
        description="End-to-end decode speed, multipole vs dense, of a random-weight model "
        "shaped like a popular LLM, with synthetic caches; checked before timed, JSON out "
        "(details: python -m pydoc multipole.bench.decode).",
    )
    p.add_argument(
        "--arch",
        choices=arch_names(),
        default="qwen3-8b",
        help="model shape (default: %(default)s)",
    )
    p.add_argument(
        "--context",
        type=_int_list,
        default="32768,65536,131072",
        help="tokens in the cache (default: %(default)s)",
    )
    p.add_argument(
        "--batch", type=_int_list, default="1,4,16", help="sequences decoded (default: %(default)s)"
    )
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the most that fit)"
    )
    p.add_argument(
        "--graphs",
        choices=list(GRAPH_MODES),
        default="step",
        help="CUDA graphs: the whole decode step for both methods (default), each Multipole "
        "layer's attention step only, or none",
    )
    p.add_argument(
        "--steps", type=int, default=64, help="timed decode steps (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int, default=4, help="untimed decode steps first (default: %(default)s)"
    )
    p.add_argument(
        "--budget",
        type=parse_budget,
        default="0.05",
        help="token_budget (int or fraction) (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: bfloat16 on CUDA, else float32",
    )
    p.add_argument("--device", default=None, help="default: cuda if present")
    p.add_argument("--seed", type=int, default=0, help="weights, caches and first tokens")
    p.add_argument("--out", default="decode.json", help="JSON report (default: %(default)s)")
    p.add_argument("--plot", default=None, help="PNG of tokens/s vs context (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name}: expected an int >= 1, got {value}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error(
            "tensor parallelism is not supported: random-weight models are built with "
            "from_config, which transformers does not shard; run on one GPU"
        )
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    return args


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive ints separated by commas, got {text!r}"
        )
    return values


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _free(device: str) -> None:
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _say(bar, message: str) -> None:
    bar.write(message, file=sys.stdout)
    sys.stdout.flush()


def _write(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
