"""Decoding through every method from one dense prefill: teacher-forced and generation.

A *run* is a label, a method (a key of ``multipole.baselines.METHODS``, or ``None`` for stock
transformers attention with a ``DynamicCache``) and a config. The prompt is prefilled once,
densely (every method's prefill is dense); each run starts from a copy of that prefill, so
methods differ only in how they decode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..config import MultipoleConfig
from ..hf import MultipoleCache, cache_keyword


@dataclass(frozen=True)
class Run:
    """One way to decode: ``method=None`` is stock dense attention (the reference)."""

    label: str
    method: str | None
    config: MultipoleConfig | None = None


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> DynamicCache:
    """Dense prompt pass (SDPA) over ``input_ids [B, N]``; returns its cache."""
    cache = DynamicCache()
    model(input_ids, **{cache_keyword(model): cache}, use_cache=True)
    return cache


def start_cache(prompt_cache: DynamicCache, run: Run):
    """A cache for ``run`` that holds the prompt (the prompt's tensors are not modified)."""
    if run.method is None:
        return copy.deepcopy(prompt_cache)
    cache = MultipoleCache(run.config, method=run.method)
    for index, layer in enumerate(prompt_cache.layers):
        cache.update(layer.keys, layer.values, index)
    return cache


@dataclass
class TeacherForced:
    """Per decoded position ``[W, T]`` (float32, CPU): the negative log-likelihood of the next
    token, KL(dense || run) of the next-token distributions, and the read fraction per step."""

    nll: torch.Tensor
    kl: torch.Tensor
    read_fraction: list[float]


@torch.no_grad()
def teacher_forced(
    model,
    input_ids: torch.Tensor,
    prefix: int,
    runs: list[Run],
    progress=None,
    *,
    checkpoint: Callable[[dict[str, TeacherForced]], None] | None = None,
    checkpoint_every: int = 256,
) -> dict[str, TeacherForced]:
    """Prefill ``input_ids[:, :prefix]`` densely, then feed tokens ``prefix .. N-2`` one at a
    time through every run in lockstep (online updates included), each predicting the next.

    The reference for the KL is stock dense decoding (``Run(label, None)``, added if absent),
    stepped alongside, so nothing of size ``N x vocab`` is stored. ``checkpoint`` gets the
    results over the tokens decoded so far every ``checkpoint_every`` steps, so a run that is
    stopped (a time limit) still leaves its first part.
    """
    _use_multipole_attention(model)
    if not any(run.method is None for run in runs):
        runs = [Run("dense", None), *runs]
    reference = next(run.label for run in runs if run.method is None)
    prompt_cache = prefill(model, input_ids[:, :prefix])
    caches = {run.label: start_cache(prompt_cache, run) for run in runs}
    del prompt_cache
    w, n = input_ids.shape
    steps = n - 1 - prefix
    nll = {run.label: torch.zeros(w, steps, device=input_ids.device) for run in runs}
    kl = {run.label: torch.zeros(w, steps, device=input_ids.device) for run in runs}
    fractions: dict[str, list[float]] = {run.label: [] for run in runs}
    keyword = cache_keyword(model)
    for i, t in enumerate(range(prefix, n - 1)):
        token = input_ids[:, t : t + 1]
        target = input_ids[:, t + 1 : t + 2]
        positions = torch.full((w, 1), t, device=input_ids.device)
        log_probs = {}
        for run in runs:
            cache = caches[run.label]
            out = model(token, **{keyword: cache}, position_ids=positions)
            logits = out.logits[:, -1]
            log_probs[run.label] = torch.log_softmax(logits.float(), dim=-1)
            nll[run.label][:, i] = -log_probs[run.label].gather(-1, target)[:, 0]
            fractions[run.label].append(read_fraction(cache))
        dense = log_probs[reference]
        for run in runs:
            kl[run.label][:, i] = (dense.exp() * (dense - log_probs[run.label])).sum(-1)
        if progress is not None:
            progress.update(1)
        if checkpoint is not None and (i + 1) % checkpoint_every == 0 and i + 1 < steps:
            checkpoint(_results(runs, nll, kl, fractions, i + 1))
    return _results(runs, nll, kl, fractions, steps)


def _results(runs, nll, kl, fractions, steps: int) -> dict[str, TeacherForced]:
    """The first ``steps`` decoded positions of every run, on the host."""
    return {
        run.label: TeacherForced(
            nll[run.label][:, :steps].cpu(),
            kl[run.label][:, :steps].clamp_min(0).cpu(),
            fractions[run.label][:steps],
        )
        for run in runs
    }


@torch.no_grad()
def generate(
    model, prompt_ids: torch.Tensor, runs: list[Run], max_new_tokens: int
) -> dict[str, tuple[list[int], float]]:
    """Greedy generation of every run from one dense prefill of ``prompt_ids [1, N]``.

    Returns ``{label: (new token ids, mean read fraction of the last step)}``.
    """
    _use_multipole_attention(model)
    prompt_cache = prefill(model, prompt_ids[:, :-1])  # generate feeds the last token
    results = {}
    for run in runs:
        cache = start_cache(prompt_cache, run)
        out = greedy(model, prompt_ids, cache, max_new_tokens)
        results[run.label] = (out[0, prompt_ids.shape[1] :].tolist(), read_fraction(cache))
    return results


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` of ``ids [B, N]`` (no padding) continuing ``cache``, whatever the
    model's generation config says about sampling; returns all token ids."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **{cache_keyword(model): cache},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def read_fraction(cache) -> float:
    """Bytes read over dense bytes at the last step (1.0 for a stock cache)."""
    return cache.read_fraction() if isinstance(cache, MultipoleCache) else 1.0


def _use_multipole_attention(model) -> None:
    """The 'multipole' attention function runs SDPA for stock caches, so one setting serves
    every run."""
    if model.config._attn_implementation != "multipole":
        model.set_attn_implementation("multipole")
