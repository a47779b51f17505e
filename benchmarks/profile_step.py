"""Per-kernel GPU time of one fused decode step (torch.profiler), to see where time goes.

python benchmarks/profile_step.py [--context 131072] [--batches 1,16] [--budgets 128,0.05]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from multipole import MultipoleConfig, MultipoleState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--budgets", default="128,0.05")
    args = parser.parse_args()
    for batch in map(int, args.batches.split(",")):
        k = torch.randn(batch, 8, args.context, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        for budget in args.budgets.split(","):
            value = float(budget) if "." in budget else int(budget)
            state = MultipoleState.prefill(
                k, v, MultipoleConfig(token_budget=value, backend="triton")
            )
            for _ in range(5):
                state.attend(q)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    state.attend(q)
                torch.cuda.synchronize()
            print(f"\n=== context {args.context} batch {batch} budget {budget} (20 steps)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
