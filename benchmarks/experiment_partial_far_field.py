"""How much far field pays at low budgets: teacher-forced KL(dense || run) at equal bytes for
Multipole with ``far_field_share`` in ``--shares``, next to centroid-only.

At equal bytes ``multipole`` buys fewer exact tokens than ``centroid_only``: its value
centroids cost as many bytes as its key centroids. With ``far_field_share = s`` the far field
keeps the ``s`` of the clusters of largest estimated mass and drops the rest, so only those
value centroids are read and the bytes saved buy exact tokens.

python benchmarks/experiment_partial_far_field.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.03125] [--shares 0.05,0.1,0.25] [--out F.json]
"""

from __future__ import annotations

import dataclasses

from kl_experiment import parser, run_and_report, setup

from multipole.eval.decoding import Run
from multipole.eval.harness import label_of, method_config, runs_for


def main() -> None:
    p = parser(1 / 32)
    p.add_argument("--shares", default="0.05,0.1,0.25", help="far_field_share values")
    args = p.parse_args()
    model, tokenizer, settings, head_dim = setup(args, ("centroid_only",))
    runs, _ = runs_for(settings, args.context, head_dim)
    for share in (float(s) for s in args.shares.split(",")):
        base = dataclasses.replace(settings.base, far_field_share=share)
        shared = dataclasses.replace(settings, base=base)
        config = method_config("multipole", args.fraction, args.context, head_dim, shared)
        label = label_of(f"multipole_share{share:g}", args.fraction)
        runs.append(Run(label, "multipole", config))
    for run in runs:
        print(f"{run.label}: token budget {run.config.token_budget}", flush=True)
    run_and_report(model, tokenizer, settings, runs, args)


if __name__ == "__main__":
    main()
