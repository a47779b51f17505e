"""Where the far field helps and where it hurts, per layer, on a real model (CPU is enough).

One dense pass over an essay window records every layer's queries, keys and values; each layer
is then one sequence of a batched state that holds the first ``--prefix`` tokens, and the
queries of the next ``--queries`` tokens attend over them (a static snapshot of decoding).
Relative L2 error of the attention output against dense, per layer, for:

- ``multipole`` and ``centroid_only`` at equal bytes (the eval harness's budgets);
- ``multipole_same_tokens``: multipole with centroid-only's token budget (more bytes), which
  isolates what the far field itself does;
- ``multipole_var_iso`` / ``multipole_var_diag``: the far field with a second-order term of the
  expansion, each cluster's logit raised by ``s^2/2 q^T Sigma_c q`` with ``Sigma_c`` its key
  covariance, isotropic (one number per cluster, ``tr(Sigma_c) / D``) or diagonal (D numbers
  per cluster: not byte-fair, an upper bound of what the diagonal can give).

python benchmarks/experiment_far_field.py [--model qwen2.5-0.5b] [--prefix 8192]
    [--queries 16] [--fraction 0.0625] [--share 0.5] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import multipole.state as state_mod
from multipole import MultipoleConfig
from multipole.baselines import METHODS, budget_for_read_fraction
from multipole.data import text_windows
from multipole.eval.fidelity import capture_attention_inputs
from multipole.models import load_model
from multipole.ops.decode import far_field as monopole_far_field
from multipole.ops.decode.reference import softmax_partial
from multipole.state import dense_attention

SECOND_ORDER: dict[str, torch.Tensor | None] = {"var": None}


def far_field_second_order(q, key_centroids, value_centroids, sizes, cluster_mask, scale):
    """``far_field`` with each cluster's logit raised by ``s^2/2 q^T Sigma_c q``."""
    var = SECOND_ORDER["var"]
    if var is None:
        return monopole_far_field(q, key_centroids, value_centroids, sizes, cluster_mask, scale)
    c = key_centroids.shape[-2]
    var = var[..., :c, :]  # [B, H, C, D] (isotropic: the mean repeated)
    lift = 0.5 * scale**2 * torch.einsum("bhgd,bhcd->bhgc", q.float() ** 2, var)
    # exp(lift) * exp(logit) == exp(logit + lift): fold it into the sizes per query head
    logits = torch.matmul(q.float(), key_centroids.float().transpose(-1, -2)) * scale + lift
    logits = logits + torch.log(sizes.float()).unsqueeze(-2)
    include = cluster_mask & (sizes > 0)
    logits = logits.masked_fill(~include.unsqueeze(-2), float("-inf"))
    return softmax_partial(logits, value_centroids.float())


def cluster_variance(state, keys: torch.Tensor, isotropic: bool) -> torch.Tensor:
    """``[B, H, C, D]`` per-dimension key variance of each level-0 cluster (or its mean)."""
    level = state.index.level0
    n = keys.shape[2]
    labels = state.index.labels[:, :, :n]
    c = level.key_centroids.shape[2]
    member = labels >= 0
    onehot = torch.zeros(*labels.shape[:2], c, n)
    onehot.scatter_(2, labels.clamp_min(0).unsqueeze(2), member.unsqueeze(2).float())
    sq = torch.matmul(onehot, keys.float() ** 2)  # [B, H, C, D]
    size = level.sizes.float().clamp_min(1).unsqueeze(-1)
    var = (sq / size - level.key_centroids.float() ** 2).clamp_min(0)
    if isotropic:
        var = var.mean(-1, keepdim=True).expand_as(var)
    return var


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--prefix", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=1 / 16)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    ids = text_windows(tokenizer, args.prefix + args.queries, 1)[0]
    inputs = capture_attention_inputs(model, torch.tensor([ids]))
    keys = inputs.keys[:, :, : args.prefix].contiguous()
    values = inputs.values[:, :, : args.prefix].contiguous()
    queries = inputs.queries[:, :, args.prefix :]  # [L, Hq, M, D]
    head_dim = keys.shape[-1]
    base = dataclasses.replace(
        MultipoleConfig(sink_tokens=4, interval=32, block_size=8192),
        centroid_ratio=min(1 / 16, args.share * args.fraction),
    )

    def config_for(method: str) -> MultipoleConfig:
        return budget_for_read_fraction(
            method, args.fraction, seq_len=args.prefix, head_dim=head_dim, config=base
        )

    cfg_mp, cfg_co = config_for("multipole"), config_for("centroid_only")
    runs = {
        "multipole": ("multipole", cfg_mp, None),
        "centroid_only": ("centroid_only", cfg_co, None),
        "multipole_same_tokens": ("multipole", cfg_co, None),
        "multipole_var_iso": ("multipole", cfg_mp, "iso"),
        "multipole_var_diag": ("multipole", cfg_mp, "diag"),
    }
    dense = torch.stack(
        [
            dense_attention(queries[:, :, m], keys, values, scale=inputs.scale)
            for m in range(queries.shape[2])
        ]
    )  # [M, L, Hq, D]
    state_mod.far_field = far_field_second_order
    results = {}
    for name, (method, cfg, variance) in runs.items():
        state = METHODS[method].prefill(keys, values, cfg)
        SECOND_ORDER["var"] = (
            None if variance is None else cluster_variance(state, keys, variance == "iso")
        )
        outs = torch.stack(
            [state.attend(queries[:, :, m], scale=inputs.scale) for m in range(queries.shape[2])]
        )
        SECOND_ORDER["var"] = None
        err = (outs - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)  # [M, L]
        per_layer = err.mean(0)
        results[name] = dict(
            rel_error=float(per_layer.mean()),
            rel_error_per_layer=[round(float(x), 4) for x in per_layer],
            token_budget=cfg.token_budget,
            tokens_exact=float(state.stats().tokens_exact),
        )
        print(
            f"{name:24s} error {per_layer.mean():.4f}  layer 0 {per_layer[0]:.4f}  "
            f"tokens {results[name]['tokens_exact']:.0f}",
            flush=True,
        )
    state_mod.far_field = monopole_far_field
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(settings=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
