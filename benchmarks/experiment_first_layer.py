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

import dataclasses

from kl_experiment import parser, run_and_report, setup

from multipole.eval.decoding import Run
from multipole.eval.harness import method_config, runs_for


def main() -> None:
    p = parser(1 / 16)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--same-tokens", action="store_true")
    args = p.parse_args()
    model, tokenizer, settings, head_dim = setup(args, ("multipole", "centroid_only"))
    runs, _ = runs_for(settings, args.context, head_dim)
    multipole = method_config("multipole", args.fraction, args.context, head_dim, settings)
    centroid_only = method_config("centroid_only", args.fraction, args.context, head_dim, settings)
    first = dataclasses.replace(centroid_only, replacement=False)
    per_layer = [first] * args.layers + [multipole] * (model.config.num_hidden_layers - args.layers)
    runs.append(Run(f"multipole_first{args.layers}_centroid_only", "multipole", per_layer))
    if args.same_tokens:  # more bytes: centroid-only's token budget plus the value centroids
        same = dataclasses.replace(centroid_only, replacement=True)
        runs.append(Run("multipole_same_tokens", "multipole", same))
    run_and_report(model, tokenizer, settings, runs, args)


if __name__ == "__main__":
    main()
