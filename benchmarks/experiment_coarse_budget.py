"""The two-level hierarchy's coarse budget against KL: teacher-forced KL(dense || run) of
``multipole_2level`` at one fraction of the dense bytes with the fine clusters of
``factor x fraction`` of the tokens opened (the eval harness uses 4), each at equal bytes
(a larger coarse budget reads more fine centroids and leaves fewer exact tokens).

python benchmarks/experiment_coarse_budget.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.03125] [--factors 2,4,8] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from tqdm import tqdm

from multipole.baselines import budget_for_read_fraction
from multipole.data import text_windows
from multipole.eval.decoding import Run
from multipole.eval.harness import EvalSettings, perplexity_task
from multipole.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=1 / 32)
    parser.add_argument("--factors", default="2,4,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    settings = EvalSettings(
        tasks=("perplexity",),
        methods=("multipole_2level",),
        fractions=(args.fraction,),
        context=args.context,
        decode_tokens=args.decode_tokens,
        windows=1,
    )
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    runs = []
    for factor in (float(f) for f in args.factors.split(",")):
        base = dataclasses.replace(
            settings.base,
            levels=2,
            centroid_ratio=1 / 16,
            level_ratio=1 / 8,
            coarse_budget=min(0.5, factor * args.fraction),
        )
        config = budget_for_read_fraction(
            "multipole", args.fraction, seq_len=args.context, head_dim=head_dim, config=base
        )
        runs.append(Run(f"multipole_2level_x{factor:g}", "multipole", config))
    window = text_windows(tokenizer, args.context + args.decode_tokens + 1, 1)[0]
    results = perplexity_task(model, torch.tensor([window]), runs, settings, tqdm)
    for label, metrics in results.items():
        print(f"{label:28s} KL {metrics['kl']:.4f}  perplexity {metrics['perplexity']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(settings=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
