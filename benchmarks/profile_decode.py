"""Where a whole-model decode step spends its GPU time, dense vs Multipole (torch.profiler).

Explains the end-to-end numbers of ``multipole bench decode``: each method runs as there
(same model, caches, warm-up and whole-step CUDA graphs), and the profiler records ``--window``
replayed steps in the middle of the timed ones. Per method: the median and mean step of the
timed steps outside the window (the profiler slows the window's), whether an online update fell
in the window, the window's span per step (first kernel start to last kernel end), the
kernels' summed time and count per step (span minus summed time is where the GPU waited
between kernels; with dependent launches a kernel's time includes its wait for the
predecessor), and every kernel name's time per step. ``--tunings`` runs Multipole once per
launch tuning of :class:`multipole.fused.Tuning` (a name of ``profile_step.VARIANTS`` or
``FIELD=VALUE+...``, as ``profile_step.py --tunings`` takes them), side by side with dense in
one process.

    python benchmarks/profile_decode.py --context 131072 --batch 1 --layers 36 \
        --tunings default,dependent_launch=False --out profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from profile_step import tuning_of
from torch.profiler import ProfilerActivity, profile

from multipole import MultipoleConfig
from multipole import fused as fused_mod
from multipole.bench import decode as bd
from multipole.generate import versions
from multipole.graphs import GraphedDecoder


class _Window:
    """Profiles calls ``start .. start + steps`` of every GraphedDecoder (counted per run)."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.calls, self.prof, self.result = 0, None, None
        self._call = GraphedDecoder.__call__

    def __enter__(self) -> _Window:
        window = self

        def call(decoder, *args, **kwargs):
            n = window.calls
            window.calls += 1
            if n == window.start:
                torch.cuda.synchronize()
                window.prof = profile(activities=[ProfilerActivity.CUDA])
                window.prof.__enter__()
            out = window._call(decoder, *args, **kwargs)
            if n == window.start + window.steps - 1:
                torch.cuda.synchronize()
                window.prof.__exit__(None, None, None)
                window.result = _summary(window.prof, window.steps)
            return out

        GraphedDecoder.__call__ = call
        return self

    def __exit__(self, *exc) -> None:
        GraphedDecoder.__call__ = self._call
        if self.prof is not None and self.result is None:  # a step in the window raised
            self.prof.__exit__(None, None, None)


def _summary(prof, steps: int) -> dict:
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for e in events:
        entry = by_name.setdefault(e.name, [0.0, 0])
        entry[0] += e.device_time_total
        entry[1] += 1
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    kernels = sorted(by_name.items(), key=lambda item: -item[1][0])
    return dict(
        span_us_per_step=span / steps,
        kernel_us_per_step=sum(us for us, _ in by_name.values()) / steps,
        launches_per_step=len(events) / steps,
        kernels=[
            dict(name=k, us_per_step=us / steps, calls_per_step=c / steps) for k, (us, c) in kernels
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-8b")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=96, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--window", type=int, default=8, help="profiled steps, mid-way")
    p.add_argument(
        "--tunings",
        default="default",
        help="Multipole runs: NAME (of profile_step.VARIANTS) or FIELD=VALUE+..., comma-separated",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args()
    try:  # every tuning checked before the model is built
        tunings = {spec: tuning_of(spec) for spec in a.tunings.split(",")}
    except ValueError as e:
        p.error(f"--tunings: {e}")
    arch = bd.load_arch(a.arch)
    dtype = torch.bfloat16
    s = bd.Settings(
        a.arch,
        bd.Shape.of(arch, dtype),
        MultipoleConfig(token_budget=a.budget),
        a.steps,
        a.warmup,
        dtype,
        "cuda",
        0,
    )
    model = bd.build_model(arch, a.layers, dtype=dtype, device="cuda")
    bd.warm_up_kernels(s, arch["num_attention_heads"], a.context, a.batch)
    report = dict(gpu=torch.cuda.get_device_name(0), args=vars(a), versions=versions(), runs={})
    runs = [("dense", "dense", fused_mod.Tuning())] + [
        (f"multipole[{spec}]", "multipole", tuning) for spec, tuning in tunings.items()
    ]
    if not 0 < a.window < a.steps:
        raise SystemExit(f"--window: expected 1 to {a.steps - 1} steps (< --steps), got {a.window}")
    first = (a.steps - a.window) // 2  # the window's first timed step
    try:
        for name, method, tuning in runs:
            fused_mod.TUNING = tuning
            with _Window(a.warmup + first, a.window) as window:
                row, decoded = bd.run_method(method, model, s, a.context, a.batch, a.layers)
            r = window.result
            if r is None:
                raise RuntimeError(f"{name}: the profiled window was never reached")
            in_window = range(first, first + a.window)
            outside = [t for i, t in enumerate(decoded.step_ms) if i not in in_window]
            report["runs"][name] = dict(
                median_ms=statistics.median(outside),
                mean_ms=statistics.fmean(outside),
                graph_steps=row["graph_steps"],
                update_in_window=any(i in in_window for i in decoded.update_steps),
                profile=r,
            )
            print(
                f"{name}: median {statistics.median(outside):.3f} ms; profiled "
                f"{r['span_us_per_step']:.0f} us per step, kernels "
                f"{r['kernel_us_per_step']:.0f} us in {r['launches_per_step']:.0f} launches",
                flush=True,
            )
            for k in r["kernels"][:20]:
                print(f"  {k['us_per_step']:9.1f} us {k['calls_per_step']:6.1f}x  {k['name'][:90]}")
    finally:
        fused_mod.TUNING = fused_mod.Tuning()
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
