"""Where a whole-model decode step spends its GPU time, dense vs Multipole (torch.profiler).

Explains the end-to-end numbers of ``multipole bench decode``: same model, caches and steps,
but the steps run under the profiler and the top kernels of each method are printed.

    python benchmarks/profile_decode.py --arch qwen3-8b --context 131072 --batch 16 --layers 4
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from multipole import MultipoleConfig
from multipole.bench import decode as bd


def profile_method(method: str, model, s: bd.Settings, context: int, batch: int, layers: int):
    """Top kernels (device time) of ``s.steps`` decode steps after ``s.warmup`` warm-up steps."""
    capacity = s.capacity(context) + 2 * s.steps  # three decode calls below

    def make_kv(layer: int):
        return bd.synthetic_kv(
            s.shape, batch, context, capacity, dtype=s.dtype, device=s.device, seed=layer
        )

    if method == "dense":
        model.set_attn_implementation(bd.DENSE_ATTENTION)
        cache = bd.dense_cache([make_kv(i) for i in range(layers)], context)
    else:
        model.set_attn_implementation("multipole")
        cache, _ = bd.multipole_cache(s.config, make_kv, layers, context, s.device)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=s.device)
    with torch.no_grad():
        bd.decode(model, cache, ids, context, steps=1, warmup=s.warmup)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed = bd.decode(model, cache, ids, context + s.warmup + 1, steps=s.steps, warmup=0)
        host = cProfile.Profile()
        host.enable()
        bd.decode(model, cache, ids, context + s.warmup + 1 + s.steps, steps=s.steps, warmup=0)
        host.disable()
    del cache
    bd._free(s.device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
    table += f"\nhost time (cProfile, {s.steps} steps), by own time:\n" + text.getvalue()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:15]
    top = [
        dict(name=e.key, calls=e.count, self_cuda_us=e.self_device_time_total / s.steps)
        for e in events
    ]
    return dict(method=method, step_ms=timed.step_ms, top_per_step=top), table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-8b")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    arch = bd.load_arch(a.arch)
    dtype = torch.bfloat16
    s = bd.Settings(
        a.arch,
        bd.Shape.of(arch, dtype),
        MultipoleConfig(token_budget=a.budget),
        a.steps,
        3,
        dtype,
        "cuda",
        0,
    )
    bd.warm_up_kernels(s, arch["num_attention_heads"], a.context, a.batch)
    model = bd.build_model(arch, a.layers, dtype=dtype, device="cuda")
    results = []
    for method in ("dense", "multipole"):
        result, table = profile_method(method, model, s, a.context, a.batch, a.layers)
        print(f"== {method}: step ms {[round(t, 3) for t in result['step_ms']]}")
        print(table, flush=True)
        results.append(result)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(args=vars(a), results=results), f, indent=1)


if __name__ == "__main__":
    main()
