"""Fidelity at equal bytes, whole-cluster (prefix) selection vs a partial boundary cluster
(benchmarks/tuning/partial.py), SmolLM2, 4K context, CPU. Writes sweep2.json in the cwd."""

import dataclasses
import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import partial
import torch

from multipole import state as st
from multipole.baselines import budget_for_read_fraction
from multipole.data import text_windows
from multipole.eval.fidelity import attention_fidelity, capture_attention_inputs
from multipole.eval.harness import EVAL_BASE
from multipole.models import load_model

ctx, steps = 4096, 48
model, tok = load_model("smollm2-135m")
inputs = capture_attention_inputs(model, torch.tensor(text_windows(tok, ctx + steps, 2, seed=0)))
original = st.MultipoleState._attend_reference
rows = []
for fraction in (1 / 32, 1 / 16, 1 / 8):
    for share in (0.25, 0.5, 0.75, 1.0):
        ratio = min(1 / 16, share * fraction)
        base = dataclasses.replace(EVAL_BASE, centroid_ratio=ratio)
        try:
            cfg = budget_for_read_fraction(
                "multipole", fraction, seq_len=ctx, head_dim=64, config=base
            )
        except ValueError:
            continue
        for mode in ("prefix", "partial"):
            st.MultipoleState._attend_reference = (
                partial.attend_partial if mode == "partial" else original
            )
            t = time.time()
            fid = attention_fidelity(inputs, "multipole", cfg, ctx)
            row = dict(
                fraction=fraction,
                share=share,
                ratio=ratio,
                mode=mode,
                budget=cfg.token_budget,
                rel_error=float(fid.rel_error.mean()),
                mass=float(fid.mass.mean()),
                read=fid.read_fraction,
            )
            rows.append(row)
            print(
                f"1/{round(1 / fraction)} share={share} ratio=1/{round(1 / ratio)} {mode:8s} "
                f"budget={cfg.token_budget:4d} err={row['rel_error']:.4f} "
                f"mass={row['mass']:.3f} read={row['read']:.4f} ({time.time() - t:.0f}s)",
                flush=True,
            )
with open("sweep2.json", "w") as f:
    json.dump(rows, f, indent=1)
