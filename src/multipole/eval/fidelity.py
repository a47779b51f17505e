"""Attention fidelity on a real model's queries, keys and values.

One dense forward pass records what every layer's attention function receives (RoPE'd
queries, keys and values); then each method replays decoding over them: prefill the first
``prefix`` tokens, then append one token at a time (online updates included) and answer that
token's query. Every layer of every window is one sequence of a single batched state, so a
method's whole replay is one loop over positions.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..baselines import METHODS
from ..config import MultipoleConfig
from ..hf import Rotary

CAPTURE_NAME = "multipole_capture"
_RECORDS: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar(
    "multipole_capture_records", default=None
)


@dataclass
class AttentionInputs:
    """What the attention functions of all layers received for a batch of windows.

    Attributes:
        queries: ``[L * W, Hq, N, D]`` (layer-major: row ``l * W + w`` is layer l, window w).
        keys, values: ``[L * W, H_kv, N, D]``, RoPE'd keys as cached.
        scale: the softmax scale the model uses.
        num_layers: ``L``.
        rotary: the model's RoPE, to un-rotate keys for ``position_free_keys``.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scale: float
    num_layers: int
    rotary: Rotary | None


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    records = _RECORDS.get()
    if records is not None:
        records[module.layer_idx] = (query, key, value, kwargs.get("scaling"), module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_NAME, _capture_forward)


@torch.no_grad()
def capture_attention_inputs(model, input_ids: torch.Tensor) -> AttentionInputs:
    """Run ``model`` densely (SDPA) on ``input_ids [W, N]`` and record every layer's inputs."""
    records: dict[int, tuple] = {}
    previous = model.config._attn_implementation
    token = _RECORDS.set(records)
    try:
        model.set_attn_implementation(CAPTURE_NAME)
        model(input_ids)
    finally:
        _RECORDS.reset(token)
        model.set_attn_implementation(previous)
    layers = [records[i] for i in sorted(records)]
    query, key, _, scale, module = layers[0]
    try:
        rotary = Rotary.of(module, key.shape[-1], key.device)
    except NotImplementedError:
        rotary = None
    return AttentionInputs(
        queries=torch.cat([r[0] for r in layers]),
        keys=torch.cat([r[1] for r in layers]),
        values=torch.cat([r[2] for r in layers]),
        scale=float(scale if scale is not None else query.shape[-1] ** -0.5),
        num_layers=len(layers),
        rotary=rotary,
    )


@dataclass
class Fidelity:
    """Per-layer means over windows and decode steps.

    Attributes:
        rel_error: ``[L]`` relative L2 error of the attention output against dense (all query
            heads of a step together).
        mass: ``[L]`` dense attention probability of the exactly attended tokens (mean over
            query heads).
        read_fraction: bytes read over dense bytes, mean over steps.
    """

    rel_error: torch.Tensor
    mass: torch.Tensor
    read_fraction: float


@torch.no_grad()
def attention_fidelity(
    inputs: AttentionInputs, method: str, config: MultipoleConfig, prefix: int
) -> Fidelity:
    """Replay decoding of positions ``prefix .. N-1`` with ``method`` and compare every step
    with dense attention over the same keys."""
    config = replace(config, backend="reference")  # only it forms the exact-token mask
    keys, values, queries = inputs.keys, inputs.values, inputs.queries
    rows, _, n, _ = keys.shape
    cluster_keys = None
    if config.position_free_keys:
        if inputs.rotary is None:
            raise ValueError("position_free_keys: the model's RoPE type is not supported")
        cluster_keys = inputs.rotary.rotate(keys, -torch.arange(n, device=keys.device)[None])
    state = METHODS[method].prefill(
        keys[:, :, :prefix],
        values[:, :, :prefix],
        config,
        cluster_keys=None if cluster_keys is None else cluster_keys[:, :, :prefix],
    )
    errors, masses, fractions = [], [], []
    for t in range(prefix, n):
        new = slice(t, t + 1)
        state.append(
            keys[:, :, new],
            values[:, :, new],
            cluster_keys=None if cluster_keys is None else cluster_keys[:, :, new],
        )
        q = queries[:, :, t]
        lookup_q = None
        if cluster_keys is not None:
            delta = torch.full((1, 1), config.lookup_position - t, device=q.device)
            lookup_q = inputs.rotary.rotate(q.unsqueeze(2), delta)[:, :, 0]
        out = state.attend(q, lookup_q=lookup_q, scale=inputs.scale).float()
        probs, exact = _dense(q, keys[:, :, : t + 1], values[:, :, : t + 1], inputs.scale)
        errors.append((out - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1))
        attended = state.exact_tokens()[:, :, : t + 1].unsqueeze(2)  # [R, H, 1, t+1]
        masses.append((probs * attended).sum(-1).flatten(1).mean(1))
        fractions.append(state.stats().read_fraction)
    per_layer = inputs.num_layers, rows // inputs.num_layers
    return Fidelity(
        rel_error=torch.stack(errors, 1).view(*per_layer, -1).mean((1, 2)).cpu(),
        mass=torch.stack(masses, 1).view(*per_layer, -1).mean((1, 2)).cpu(),
        read_fraction=sum(fractions) / len(fractions),
    )


def _dense(q, keys, values, scale):
    """Softmax probabilities ``[R, H, G, T]`` and output ``[R, Hq, D]`` in float32."""
    r, h, _, d = keys.shape
    qg = q.float().view(r, h, -1, d)
    probs = torch.softmax(qg @ keys.float().transpose(-1, -2) * scale, dim=-1)
    return probs, (probs @ values.float()).view(r, -1, d)
