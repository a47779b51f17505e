"""The two-level hierarchy's coarse budget against KL: teacher-forced KL(dense || run) of
``multipole_2level`` at one fraction of the dense bytes with the fine clusters of
``factor x fraction`` of the tokens opened (the eval harness uses 4), each at equal bytes
(a larger coarse budget reads more fine centroids and leaves fewer exact tokens).

python benchmarks/experiment_coarse_budget.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.03125] [--factors 2,4,8] [--out F.json]
"""

from __future__ import annotations

import dataclasses

from kl_experiment import parser, run_and_report, setup

from multipole.baselines import budget_for_read_fraction
from multipole.eval.decoding import Run


def main() -> None:
    p = parser(1 / 32)
    p.add_argument("--factors", default="2,4,8")
    args = p.parse_args()
    model, tokenizer, settings, head_dim = setup(args, ("multipole_2level",))
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
    run_and_report(model, tokenizer, settings, runs, args)


if __name__ == "__main__":
    main()
