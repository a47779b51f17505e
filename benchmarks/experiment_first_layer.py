"""Does the far field of the first layer cost Multipole its KL? Teacher-forced KL(dense || run)
of ``multipole`` and ``centroid_only`` at equal bytes (the eval harness's runs) and of
``multipole`` with its first ``--layers`` layer(s) run as ``centroid_only`` (per-layer configs
of ``MultipoleCache``; each layer still reads the same bytes as the other methods); with
``--same-tokens`` also ``multipole`` at centroid-only's token budget (more bytes: what the far
field does at equal exact tokens).

python benchmarks/experiment_first_layer.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.0625] [--layers 1] [--same-tokens] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from tqdm import tqdm

from multipole.data import text_windows
from multipole.eval.decoding import Run
from multipole.eval.harness import EvalSettings, method_config, perplexity_task, runs_for
from multipole.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=1 / 16)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--same-tokens", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    settings = EvalSettings(
        tasks=("perplexity",),
        methods=("multipole", "centroid_only"),
        fractions=(args.fraction,),
        context=args.context,
        decode_tokens=args.decode_tokens,
        windows=1,
    )
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    runs, _ = runs_for(settings, args.context, head_dim)
    multipole = method_config("multipole", args.fraction, args.context, head_dim, settings)
    centroid_only = method_config("centroid_only", args.fraction, args.context, head_dim, settings)
    first = dataclasses.replace(centroid_only, replacement=False)
    per_layer = [first] * args.layers + [multipole] * (model.config.num_hidden_layers - args.layers)
    runs.append(Run(f"multipole_first{args.layers}_centroid_only", "multipole", per_layer))
    if args.same_tokens:  # more bytes: centroid-only's token budget plus the value centroids
        same = dataclasses.replace(centroid_only, replacement=True)
        runs.append(Run("multipole_same_tokens", "multipole", same))
    window = text_windows(tokenizer, args.context + args.decode_tokens + 1, 1)[0]
    ids = torch.tensor([window])
    results = perplexity_task(model, ids, runs, settings, tqdm)
    for label, metrics in results.items():
        print(f"{label:36s} KL {metrics['kl']:.4f}  perplexity {metrics['perplexity']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(settings=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
