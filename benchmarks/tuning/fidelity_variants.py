"""Fidelity at equal bytes for multipole variants (SmolLM2, 4K, CPU)."""

import dataclasses
import json
import sys
import time

import torch

from multipole.baselines import budget_for_read_fraction
from multipole.data import text_windows
from multipole.eval.fidelity import attention_fidelity, capture_attention_inputs
from multipole.eval.harness import EVAL_BASE
from multipole.models import load_model

torch.manual_seed(0)
torch.set_num_threads(8)
ctx, steps = 4096, int(sys.argv[1]) if len(sys.argv) > 1 else 48
model, tok = load_model("smollm2-135m")
wins = text_windows(tok, ctx + steps, 2, seed=0)
ids = torch.tensor(wins)
inputs = capture_attention_inputs(model, ids)
print("captured", inputs.keys.shape, flush=True)


def variants(fraction):
    for share in (0.125, 0.25, 0.5):
        yield f"L1 share={share}", "multipole", dict(centroid_ratio=min(1 / 16, share * fraction))
    for fine in (1 / 16, 1 / 8):
        for lr in (1 / 8, 1 / 4):
            for cb in (0.125, 0.25, 0.5):
                yield (
                    f"L2 fine=1/{round(1 / fine)} lr=1/{round(1 / lr)} open={cb}",
                    "multipole",
                    dict(centroid_ratio=fine, levels=2, level_ratio=lr, coarse_budget=cb),
                )
    yield "oracle", "oracle_topk", dict()
    yield "window", "window", dict()
    yield "quest", "quest", dict(centroid_ratio=min(1 / 16, 0.5 * fraction))
    yield (
        "centroid_only share=.25",
        "centroid_only",
        dict(centroid_ratio=min(1 / 16, 0.25 * fraction)),
    )


rows = []
for fraction in (1 / 32, 1 / 16):
    for name, method, over in variants(fraction):
        base = dataclasses.replace(EVAL_BASE, **over)
        try:
            cfg = budget_for_read_fraction(method, fraction, seq_len=ctx, head_dim=64, config=base)
        except ValueError:
            print(f"1/{round(1 / fraction)} {name}: unreachable", flush=True)
            continue
        t = time.time()
        fid = attention_fidelity(inputs, method, cfg, ctx)
        row = dict(
            fraction=fraction,
            name=name,
            method=method,
            budget=cfg.token_budget,
            rel_error=float(fid.rel_error.mean()),
            mass=float(fid.mass.mean()),
            read=fid.read_fraction,
            s=time.time() - t,
        )
        rows.append(row)
        print(
            f"1/{round(1 / fraction)} {name:36s} budget={cfg.token_budget:4d} "
            f"err={row['rel_error']:.4f} mass={row['mass']:.3f} read={row['read']:.4f} "
            f"({row['s']:.0f}s)",
            flush=True,
        )
with open("sweep.json", "w") as f:
    json.dump(rows, f, indent=1)
