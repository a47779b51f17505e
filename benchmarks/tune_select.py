"""Tune the selection kernel's warps and bisection steps: whole-step time per variant."""

from __future__ import annotations

import torch
from kernels import graph_of
from triton.testing import do_bench

import multipole.fused as fused
from multipole import MultipoleConfig, MultipoleState


def main() -> None:
    k = torch.randn(1, 8, 131072, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    for budget in (128, 0.05):
        state = MultipoleState.prefill(k, v, MultipoleConfig(token_budget=budget, backend="triton"))
        base = state.attend(q)
        for warps in (4, 8, 16):
            for steps in (16, 24, 32):
                fused.SELECT_WARPS, fused.BISECT_STEPS = warps, steps
                out = state.attend(q)
                err = float((out.float() - base.float()).norm() / base.float().norm())
                replay = graph_of(lambda s=state: s.attend(q))
                ms = do_bench(replay, warmup=25, rep=200, return_mode="median")
                print(f"budget {budget} warps {warps} steps {steps}: {1e3 * ms:.1f} us ({err:.1e})")


if __name__ == "__main__":
    main()
