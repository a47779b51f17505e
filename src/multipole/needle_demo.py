"""The README's demo on a real model: a fact hidden in a long essay context, asked back.

The prompt (held-out Paul Graham essays with one planted "special magic number", then the
question) is prefilled once, densely; then dense attention and Multipole Attention (at
``read_fraction`` of the dense KV bytes, centroids counted), with the far field over every
cluster (``multipole``) and over the clusters of largest mass (``multipole_partial``),
each answer greedily from that prefill. Reported per method: the answer and whether it holds
the number, the time to the first token (multipole builds its cluster index there), decode
tokens/s after it, the fraction of KV bytes read, and the mean KL(dense || method) of the
next-token distributions along the dense answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .eval.decoding import Run, greedy, prefill, read_fraction, start_cache, teacher_forced
from .eval.harness import EvalSettings, environment, method_config
from .generate import sync

DEMO_METHODS = ("multipole", "multipole_partial")


@dataclass
class NeedleDemoSettings:
    """What the demo runs (defaults: SmolLM2-135M, a 4K-token prompt, 1/16 of the bytes)."""

    model: str = "smollm2-135m"
    context: int = 4096
    read_fraction: float = 1 / 16
    max_new_tokens: int = 40
    depth_seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def run_needle_demo(settings: NeedleDemoSettings) -> dict[str, Any]:
    """Run the demo; returns a JSON-ready report."""
    from .data import encode_prompt, make_retrieval, retrieval_score
    from .models import load_model

    s = settings
    device = torch.device(s.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(s.model, dtype=dtype, device=device)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    sample = make_retrieval("niah_single", tokenizer, s.context, 1, seed=s.depth_seed)[0]
    ids = torch.tensor([encode_prompt(tokenizer, sample.prompt)], device=device)
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads
    )
    configs = {
        method: method_config(method, s.read_fraction, ids.shape[1], head_dim, EvalSettings())
        for method in DEMO_METHODS
    }
    if None in configs.values():
        short = [m for m, c in configs.items() if c is None]
        raise ValueError(
            f"read_fraction={s.read_fraction}: too small for {', '.join(short)} at "
            f"{ids.shape[1]} tokens (the sink and the recent window alone read more)"
        )
    runs = [Run("dense", None)] + [Run(m, "multipole", c) for m, c in configs.items()]

    model.set_attn_implementation("multipole")  # SDPA for stock caches, ours for MultipoleCache
    start = time.perf_counter()
    with torch.no_grad():
        prompt_cache = prefill(model, ids[:, :-1])
    sync(device)
    prefill_s = time.perf_counter() - start
    rows = []
    for run in runs:
        cache = start_cache(prompt_cache, run)
        first_s, first = _timed_generate(model, ids, cache, 1, device)  # builds the index
        decode_s, out = _timed_generate(model, first, cache, s.max_new_tokens - 1, device)
        tokens = out[0, ids.shape[1] :]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append(
            {
                "method": run.label,
                "answer": text.strip(),
                "correct": retrieval_score(text, sample.answers) == 1.0,
                "first_token_s": first_s,
                "tokens_per_s": (len(tokens) - 1) / decode_s,
                "read_fraction": read_fraction(cache),
                "tokens": tokens.tolist(),
            }
        )
    # KL along the dense answer: feed it through both (teacher-forced), dense as reference
    dense_answer = torch.tensor([rows[0]["tokens"]], device=device)
    forced = teacher_forced(model, torch.cat([ids, dense_answer], 1), ids.shape[1] - 1, runs[1:])
    for row in rows:
        row["kl_to_dense"] = (
            float(forced[row["method"]].kl.mean()) if row["method"] in forced else 0.0
        )
    return {
        "settings": {**s.__dict__, "configs": {m: c.to_dict() for m, c in configs.items()}},
        "prompt_tokens": ids.shape[1],
        "needle_depth": sample.depth,
        "expected": sample.answers,
        "prefill_s": prefill_s,
        "results": rows,
        "environment": environment(device),
    }


def format_needle_table(report: dict[str, Any]) -> str:
    """The numbers as a table, then each method's whole answer."""
    header = f"{'method':<17} {'correct':>7} {'1st tok s':>9} {'tok/s':>6} {'KV read':>7} {'KL':>7}"
    lines = [header]
    for r in report["results"]:
        lines.append(
            f"{r['method']:<17} {'yes' if r['correct'] else 'no':>7} {r['first_token_s']:>9.2f} "
            f"{r['tokens_per_s']:>6.1f} {r['read_fraction']:>7.3f} {r['kl_to_dense']:>7.4f}"
        )
    lines.append("")
    lines += [f"{r['method']}: {' '.join(r['answer'].split())}" for r in report["results"]]
    return "\n".join(lines)


def _timed_generate(model, ids, cache, new_tokens: int, device) -> tuple[float, torch.Tensor]:
    """Greedy ``generate`` continuing ``cache``; returns (seconds, all token ids)."""
    sync(device)
    start = time.perf_counter()
    out = greedy(model, ids, cache, new_tokens)
    sync(device)
    return time.perf_counter() - start, out
