"""Host and device time of one teacher-forced step per method (``multipole eval`` perplexity).

A random-weight model of SmolLM2-135M's shape (speed does not depend on the weights), a dense
prefill of ``--context`` tokens for ``--windows`` sequences, then ``--steps`` timed decode
steps per method (after ``--warmup``; both span online updates). Prints ms per step per method
and the host profile (cProfile, by own time) of one method.

    python benchmarks/profile_teacher_forced.py --context 4096 --windows 4 --profile multipole
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
import transformers

from multipole.eval.decoding import (
    Run,
    _use_multipole_attention,
    prefill,
    read_fraction,
    start_cache,
)
from multipole.eval.harness import METHODS, EvalSettings, runs_for
from multipole.generate import sync
from multipole.hf import cache_keyword

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=1e5, tie_word_embeddings=True,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--fraction", type=float, default=1 / 16)
    parser.add_argument("--methods", default="dense," + ",".join(METHODS))
    parser.add_argument("--profile", default="multipole", help="method whose host time is printed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2)
    model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    _use_multipole_attention(model)
    n = args.context + args.warmup + args.steps
    ids = torch.randint(0, config.vocab_size, (args.windows, n), device=device)
    methods = [m for m in args.methods.split(",") if m != "dense"]
    settings = EvalSettings(methods=tuple(methods), fractions=(args.fraction,))
    head_dim = config.hidden_size // config.num_attention_heads
    runs, skipped = runs_for(settings, args.context, head_dim)
    for note in skipped:
        print(f"skipped {note}", flush=True)
    if "dense" in args.methods.split(","):
        runs = [Run("dense", None), *runs]
    prompt = prefill(model, ids[:, : args.context])
    keyword = cache_keyword(model)
    results = {}
    for run in runs:
        method = run.label.split("@")[0]
        cache = start_cache(prompt, run)
        host = cProfile.Profile()
        with torch.no_grad():
            for i, t in enumerate(range(args.context, n)):
                if i == args.warmup:
                    sync(device)
                    start = time.perf_counter()
                    if method == args.profile:
                        host.enable()
                positions = torch.full((args.windows, 1), t, device=device)
                logits = model(ids[:, t : t + 1], **{keyword: cache}, position_ids=positions)
                torch.log_softmax(logits.logits[:, -1].float(), dim=-1)
                read_fraction(cache)
            host.disable()
            sync(device)
        ms = (time.perf_counter() - start) / args.steps * 1e3
        results[method] = ms
        print(f"{method}: {ms:.1f} ms per step", flush=True)
        if method == args.profile:
            text = io.StringIO()
            pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
            print(text.getvalue())
            text = io.StringIO()
            pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(30)
            print(text.getvalue())
        del cache
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), ms_per_step=results), f, indent=1)


if __name__ == "__main__":
    main()
