"""Teacher-forced KL(dense || method) of SmolLM2 on CPU for a few byte splits (short runs).

Each run is ``method:share``: the method at ``--fraction`` of the dense KV bytes, with
``share`` of them spent on centroids (``EvalSettings.metadata_share``). ``--same-budget N``
instead runs multipole and centroid-only on the same clusters (centroid ratio 1/32) and the
same exact-token budget N, so the only difference is the far field.

    python benchmarks/tuning/kl_equal_bytes.py --context 4096 --steps 48 --windows 2 \\
        --runs centroid_only:0.5,centroid_only:0.25,multipole:0.5,multipole:0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from multipole.data import text_windows
from multipole.eval.decoding import Run, teacher_forced
from multipole.eval.harness import EVAL_BASE, VARIANT_OF, EvalSettings, method_config
from multipole.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument(
        "--window-tokens", type=int, default=None,
        help="draw windows of this length and keep their start (same text as a longer run)",
    )  # fmt: skip
    parser.add_argument("--fraction", type=float, default=1 / 16)
    parser.add_argument("--runs", default="centroid_only:0.5,multipole:0.5,multipole:0.25")
    parser.add_argument("--same-budget", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    length = args.context + args.steps + 1
    ids = torch.tensor(text_windows(tokenizer, args.window_tokens or length, args.windows, seed=0))[
        :, :length
    ]
    if args.same_budget is not None:
        config = dataclasses.replace(
            EVAL_BASE, centroid_ratio=1 / 32, token_budget=args.same_budget
        )
        runs = [Run(m, m, config) for m in ("multipole", "centroid_only")]
    else:
        runs = []
        for item in args.runs.split(","):
            method, share = item.split(":")
            settings = EvalSettings(metadata_share=float(share))
            config = method_config(method, args.fraction, args.context, 64, settings)
            print(f"{item}: centroid ratio 1/{round(1 / config.centroid_ratio)}, "
                  f"budget {config.token_budget} tokens", flush=True)  # fmt: skip
            runs.append(Run(item, VARIANT_OF.get(method, method), config))
    start = time.time()
    for label, r in teacher_forced(model, ids, args.context, runs).items():
        read = sum(r.read_fraction) / len(r.read_fraction)
        print(f"{label:24s} KL {float(r.kl.mean()):.4f}  NLL {float(r.nll.mean()):.4f}  "
              f"read {read:.4f}", flush=True)  # fmt: skip
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
