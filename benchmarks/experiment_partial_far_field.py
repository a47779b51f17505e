"""Would a far field over the best unselected clusters only pay at low budgets? Teacher-forced
KL(dense || run) at equal bytes.

At equal bytes ``multipole`` buys fewer exact tokens than ``centroid_only``: its value
centroids cost as many bytes as its key centroids. The variant here reads the value centroid
of only the best ``--share`` of the unselected clusters (by far-field logit, per query head);
the other unselected clusters keep their exact share of the softmax denominator (their key
centroids are read for the lookup anyway) and, in the numerator, stand for one mean value per
KV head (the size-weighted mean of all value centroids: the mean value of the clustered
tokens, one vector per head to keep). ``--drop`` runs a second variant that leaves them out
altogether. The value-centroid bytes saved buy exact tokens. A simulation on the PyTorch
path (the kernels read every value centroid).

python benchmarks/experiment_partial_far_field.py [--model qwen2.5-0.5b] [--context 16384]
    [--decode-tokens 256] [--fraction 0.03125] [--share 0.25] [--out F.json]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from kl_experiment import override_far_field, parser, run_and_report, setup

from multipole.eval.decoding import Run
from multipole.eval.harness import method_config, runs_for
from multipole.ops.decode.reference import compute_dtype


def partial_far_field(q, key_centroids, value_centroids, sizes, cluster_mask, scale, *, share,
                      drop):  # fmt: skip
    """``far_field`` with value centroids for the best ``share`` of the included clusters
    (per query head); the rest count in the denominator with one mean value per KV head in
    the numerator, or (``drop``) not at all. Returns ``out [B, H, G, D]``, ``lse [B, H, G]``."""
    dtype = compute_dtype(q.dtype)
    logits = torch.matmul(q.to(dtype), key_centroids.to(dtype).transpose(-1, -2)) * scale
    include = cluster_mask & (sizes > 0)
    logits = logits + torch.log(sizes.to(dtype)).unsqueeze(-2)
    logits = logits.masked_fill(~include.unsqueeze(-2), float("-inf"))  # [B, H, G, C]
    live = include.sum(-1).amax()
    keep = max(1, min(int(live), math.ceil(share * int(live))))
    best = logits.topk(keep, dim=-1).indices  # [B, H, G, keep]
    near = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True)
    if drop:
        logits = logits.masked_fill(~near, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    values = value_centroids.to(dtype)
    out = torch.matmul(weights * near, values)
    if not drop:
        mass = (sizes.to(dtype) * (sizes > 0)).unsqueeze(-1)
        mean = (mass * values).sum(-2) / mass.sum(-2).clamp_min(1.0)  # [B, H, D]
        out = out + (weights * ~near).sum(-1, keepdim=True) * mean.unsqueeze(-2)
    return out, lse


def main() -> None:
    p = parser(1 / 32)
    p.add_argument("--share", type=float, default=0.25)
    p.add_argument("--drop", action="store_true", help="also run the variant without the rest")
    args = p.parse_args()
    model, tokenizer, settings, head_dim = setup(args, ("multipole", "centroid_only"))
    runs, _ = runs_for(settings, args.context, head_dim)
    centroid_only = method_config("centroid_only", args.fraction, args.context, head_dim, settings)
    # the same clusters as centroid_only; the value centroids read (half a token's bytes each,
    # about `share` of the clusters per step) come out of its token budget
    middle = args.context - centroid_only.sink_tokens - 2 * centroid_only.interval
    clusters = centroid_only.clusters_for(middle)
    spent = math.ceil(args.share * clusters / 2)
    variants = {
        "multipole_partial_far": dataclasses.replace(
            centroid_only, token_budget=centroid_only.token_budget - spent
        )
    }
    if args.drop:  # one token fewer: told apart from the first variant by its config
        variants["multipole_partial_far_drop"] = dataclasses.replace(
            centroid_only, token_budget=centroid_only.token_budget - spent - 1
        )
    for label, config in variants.items():
        runs.append(Run(label, "multipole", config))
    print(
        f"clusters {clusters}, token budgets: centroid-only {centroid_only.token_budget}, "
        f"partial far field {centroid_only.token_budget - spent} (share {args.share})",
        flush=True,
    )
    budgets = {c.token_budget: label for label, c in variants.items()}
    others = [r.config.token_budget for r in runs if r.label not in variants and r.config]
    assert not set(budgets) & set(others), "a variant's token budget equals another run's"
    override_far_field(
        {
            budget: functools.partial(
                partial_far_field, share=args.share, drop=label.endswith("_drop")
            )
            for budget, label in budgets.items()
        }
    )
    run_and_report(model, tokenizer, settings, runs, args)


if __name__ == "__main__":
    main()
