"""How much of the exact pass is the gather: the same fused step with the real cluster order of
the tokens (each selected token a scattered 256-byte row) and with the identity order (each
selected cluster one contiguous run, as a cluster-contiguous copy of K/V would give). The
identity run attends the wrong tokens: only its time means something (GPU).

python benchmarks/probe_exact_order.py [--context 131072] [--batches 1,4,16] [--out F.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from profile_step import make_state, step_ms
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench


def kernel_us(state, q, steps: int = 20) -> dict[str, float]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            state.attend(q)
        torch.cuda.synchronize()
    return {
        e.key: e.self_device_time_total / steps
        for e in prof.key_averages()
        if e.self_device_time_total > 0
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--budgets", default="0.05,128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for batch in map(int, args.batches.split(",")):
        for budget in (float(x) if "." in x else int(x) for x in args.budgets.split(",")):
            state, q, k, v = make_state(args.context, batch, budget)
            sdpa = do_bench(
                lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    q.unsqueeze(2), k, v, enable_gqa=True
                ),
                warmup=25,
                rep=200,
                return_mode="median",
            )
            state.attend(q)
            layout = state._fused
            real_order = layout.order
            n = real_order.shape[-1]
            identity = torch.arange(n, device=q.device, dtype=torch.int32).expand_as(real_order)
            for name, order in (("real", real_order), ("identity", identity.contiguous())):
                layout.order = order
                ms = step_ms(state, q)
                per_kernel = kernel_us(state, q)
                rows.append(
                    dict(
                        context=args.context,
                        batch=batch,
                        budget=budget,
                        order=name,
                        step_ms=ms,
                        sdpa_ms=sdpa,
                        speedup=sdpa / ms,
                        kernels_us=per_kernel,
                    )
                )
                exact = sum(t for key, t in per_kernel.items() if "sparse_decode" in key)
                print(
                    f"B{batch} budget {budget} {name:8s}: step {ms * 1e3:6.1f} us "
                    f"({sdpa / ms:.2f}x SDPA {sdpa * 1e3:.1f} us), exact pass {exact:.1f} us",
                    flush=True,
                )
            layout.order = real_order
            del state, k, v
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
