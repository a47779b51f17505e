"""What the teacher-forced KL experiments share: their arguments, the model and settings (one
essay window after a dense prefill, as ``multipole eval --tasks perplexity``), and running and
reporting a list of runs (KL(dense || run) and perplexity, printed and written as JSON)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from tqdm import tqdm

import multipole.state as state_mod
from multipole.data import text_windows
from multipole.eval.decoding import Run
from multipole.eval.harness import EvalSettings, perplexity_task
from multipole.models import load_model
from multipole.ops.decode import far_field


def parser(fraction: float) -> argparse.ArgumentParser:
    """The common arguments (``--fraction`` defaults to ``fraction``)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--fraction", type=float, default=fraction)
    p.add_argument("--out", default=None)
    return p


def setup(args: argparse.Namespace, methods: tuple[str, ...]):
    """The model, its tokenizer, the eval settings of ``methods`` and the head dim."""
    model, tokenizer = load_model(args.model)
    settings = EvalSettings(
        tasks=("perplexity",),
        methods=methods,
        fractions=(args.fraction,),
        context=args.context,
        decode_tokens=args.decode_tokens,
        windows=1,
    )
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return model, tokenizer, settings, head_dim


def run_and_report(model, tokenizer, settings: EvalSettings, runs: list[Run], args) -> dict:
    """Teacher-force one window through every run; print and (``args.out``) write the KL."""
    window = text_windows(tokenizer, args.context + args.decode_tokens + 1, 1)[0]
    results = perplexity_task(model, torch.tensor([window]), runs, settings, tqdm)
    for label, metrics in results.items():
        print(f"{label:36s} KL {metrics['kl']:.4f}  perplexity {metrics['perplexity']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(settings=vars(args), results=results), f, indent=1)
    return results


def override_far_field(variants: dict[int, Callable]) -> None:
    """Make the Multipole states whose token budget is a key of ``variants`` compute their
    far field with that function (``far_field``'s signature) instead of ``far_field``. The
    runs step in lockstep, one cache after another, so the budget of the state attending
    tells the runs apart (give each variant a budget of its own)."""
    current = {"budget": None}

    def far_field_of_run(q, key_centroids, value_centroids, sizes, cluster_mask, scale):
        fn = variants.get(current["budget"], far_field)
        return fn(q, key_centroids, value_centroids, sizes, cluster_mask, scale)

    original_attend = state_mod.MultipoleState._attend_reference

    def attend_reference(self, q, lookup_q, scale):
        current["budget"] = self.config.token_budget
        return original_attend(self, q, lookup_q, scale)

    state_mod.far_field = far_field_of_run
    state_mod.MultipoleState._attend_reference = attend_reference
