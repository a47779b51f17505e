"""The demo: Multipole Attention and every baseline decoding one long context at equal bytes.

A synthetic context with planted cluster structure is prefilled once per method; then every
method decodes the same queries and appends the same new tokens (crossing online updates),
and the table reports the fraction of KV bytes read, the error against dense attention and
the time per step (each method on its default backend: PyTorch on the CPU; on CUDA the fused
kernels for multipole and centroid-only, PyTorch for the baselines).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .baselines import METHODS, budget_for_read_fraction
from .config import MultipoleConfig
from .generate import sync
from .synthetic import PlantedKV


@dataclass
class DemoSettings:
    """Shape of the demo run (defaults: a 32K context of a Llama-3-8B-like layer)."""

    context: int = 32768
    steps: int = 256
    batch: int = 1
    num_kv_heads: int = 8
    num_q_heads: int = 32
    head_dim: int = 128
    read_fraction: float = 0.1
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    config: MultipoleConfig = field(default_factory=MultipoleConfig)


def run_demo(settings: DemoSettings, progress: bool = True) -> dict[str, Any]:
    """Run every method on the same synthetic decode and return the results as a dict."""
    s = settings
    device = torch.device(s.device)
    planted = PlantedKV(num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, seed=s.seed)
    keys, values = planted.kv(s.batch, s.context)
    group = s.num_q_heads // s.num_kv_heads
    queries = [planted.queries(s.batch, group) for _ in range(s.steps)]
    new_tokens = [planted.kv(s.batch, 1) for _ in range(s.steps)]

    states, prefill_s = {}, {}
    for name in _progress(METHODS, "prefill", progress):
        cfg = budget_for_read_fraction(
            name,
            s.read_fraction,
            seq_len=s.context,
            head_dim=s.head_dim,
            config=s.config,
            elem_size=keys.element_size(),
        )
        start = time.perf_counter()
        states[name] = METHODS[name].prefill(keys.to(device), values.to(device), cfg)
        sync(device)
        prefill_s[name] = time.perf_counter() - start

    clustered_at_prefill = states["multipole"].clustered_len[0]
    errors = {name: [] for name in METHODS}
    fractions = {name: [] for name in METHODS}
    seconds = {name: 0.0 for name in METHODS}
    for q, (nk, nv) in _progress(list(zip(queries, new_tokens, strict=True)), "decode", progress):
        q = q.to(device)
        outs = {}
        for name, state in states.items():
            state.append(nk.to(device), nv.to(device))
            sync(device)
            start = time.perf_counter()
            outs[name] = state.attend(q)
            sync(device)
            seconds[name] += time.perf_counter() - start
            fractions[name].append(state.stats().read_fraction)
        dense = outs["dense"].double()
        for name, out in outs.items():
            errors[name].append(float((out.double() - dense).norm() / dense.norm()))

    rows = [
        {
            "method": name,
            "read_fraction": sum(fractions[name]) / s.steps,
            "rel_error_mean": sum(errors[name]) / s.steps,
            "rel_error_max": max(errors[name]),
            "ms_per_step": 1e3 * seconds[name] / s.steps,
            "prefill_s": prefill_s[name],
            "token_budget": states[name].config.token_budget,
        }
        for name in METHODS
    ]
    return {
        "settings": {k: v for k, v in vars(s).items() if k != "config"},
        "config": s.config.to_dict(),
        "results": rows,
        "online_updates": (states["multipole"].clustered_len[0] - clustered_at_prefill)
        // s.config.interval,
        "versions": {
            "multipole": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
    }


def format_table(report: dict[str, Any]) -> str:
    """The demo's result table as plain text."""
    lines = [
        f"{'method':<14}{'KV read':>9}{'rel. error (mean)':>19}{'(max)':>9}{'ms/step':>10}",
    ]
    for r in sorted(report["results"], key=lambda r: r["rel_error_mean"]):
        lines.append(
            f"{r['method']:<14}{r['read_fraction']:>9.2%}{r['rel_error_mean']:>19.4f}"
            f"{r['rel_error_max']:>9.4f}{r['ms_per_step']:>10.1f}"
        )
    return "\n".join(lines)


def save_report(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _progress(items, desc: str, enabled: bool):
    """``items`` with a progress bar when enabled and tqdm is installed (it is optional)."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc)
    return items
