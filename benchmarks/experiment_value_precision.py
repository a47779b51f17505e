"""Would 8-bit value centroids pay? Teacher-forced KL(dense || run) of ``multipole`` whose
value centroids are rounded to float8 (e4m3) in the far field, with the bytes that saves
given back as exact tokens (half the token budget that 16-bit value centroids cost against
``centroid_only``), next to ``multipole`` and ``centroid_only`` at equal bytes. A simulation
on the PyTorch path: the kernels read 16-bit centroids.

python benchmarks/experiment_value_precision.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.03125] [--out F.json]
"""

from __future__ import annotations

import dataclasses

import torch
from kl_experiment import override_far_field, parser, run_and_report, setup

from multipole.eval.decoding import Run
from multipole.eval.harness import method_config, runs_for
from multipole.ops.decode import far_field


def far_field_fp8_values(q, key_centroids, value_centroids, sizes, cluster_mask, scale):
    """``far_field`` with the value centroids rounded to float8 e4m3 (scaled per row)."""
    peak = value_centroids.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    rounded = (value_centroids / peak).to(torch.float8_e4m3fn).to(value_centroids.dtype) * peak
    return far_field(q, key_centroids, rounded, sizes, cluster_mask, scale)


def main() -> None:
    args = parser(1 / 32).parse_args()
    model, tokenizer, settings, head_dim = setup(args, ("multipole", "centroid_only"))
    runs, _ = runs_for(settings, args.context, head_dim)
    multipole = method_config("multipole", args.fraction, args.context, head_dim, settings)
    centroid_only = method_config("centroid_only", args.fraction, args.context, head_dim, settings)
    budget = (multipole.token_budget + centroid_only.token_budget) // 2
    fp8 = dataclasses.replace(multipole, token_budget=budget)
    runs.append(Run("multipole_fp8_values", "multipole", fp8))
    print(
        f"token budgets: multipole {multipole.token_budget}, fp8 values {budget}, "
        f"centroid-only {centroid_only.token_budget}",
        flush=True,
    )

    override_far_field({budget: far_field_fp8_values})  # the fp8 run only
    run_and_report(model, tokenizer, settings, runs, args)


if __name__ == "__main__":
    main()
