"""Render a benchmark JSON of ``benchmarks/kernels.py`` as the README's markdown table.

python benchmarks/report.py benchmarks/results/2026-11-23_h100_kernels.json
"""

from __future__ import annotations

import json
import sys


def kernel_table(path: str) -> str:
    with open(path) as f:
        report = json.load(f)
    meta = report["meta"]
    lines = [
        f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['utc'][:10]}; "
        f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s. Decode attention of one layer, "
        "32 query / 8 KV heads, d=128, bf16, centroid ratio 1/16, CUDA graph replay, median. "
        f"Command: `{meta['command']}`.",
        "",
        "| context | batch | budget | SDPA ms | multipole ms | speed-up | KV read | "
        "centroid-only ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    for dense in (r for r in rows if r["method"] == "sdpa_dense"):
        key = (dense["context"], dense["batch"], dense["budget"])
        same = {r["method"]: r for r in rows if (r["context"], r["batch"], r["budget"]) == key}
        mp, co = same["multipole"], same["centroid_only"]
        budget = f"{dense['budget']:.0%}" if isinstance(dense["budget"], float) else dense["budget"]
        lines.append(
            f"| {dense['context'] // 1024}K | {dense['batch']} | {budget} | {dense['ms']:.3f} | "
            f"{mp['ms']:.3f} | {mp['speedup_vs_sdpa']:.2f}x | {mp['read_fraction']:.1%} | "
            f"{co['ms']:.3f} | {co['speedup_vs_sdpa']:.2f}x |"
        )
    update = meta.get("online_update")
    if update:
        lines += [
            "",
            f"Online update (8K open block + 128 tokens, 8 heads, PyTorch k-means) plus one "
            f"decode step: {update['update_plus_one_step_ms']:.1f} ms per layer.",
        ]
    return "\n".join(lines)


def demo_table(path: str) -> str:
    with open(path) as f:
        report = json.load(f)
    s = report["settings"]
    lines = [
        f"{s['context']} tokens, {s['num_q_heads']} query / {s['num_kv_heads']} KV heads, "
        f"d={s['head_dim']}, {s['steps']} decode steps ({report['online_updates']} online "
        f"updates), every method at {s['read_fraction']:.0%} of the dense KV bytes, on "
        f"{s['device']}, torch {report['versions']['torch']}. Command: `{report['command']}`.",
        "",
        "| method | KV read | rel. error, mean | max | ms per step |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(report["results"], key=lambda r: r["rel_error_mean"]):
        lines.append(
            f"| {r['method']} | {r['read_fraction']:.1%} | {r['rel_error_mean']:.4f} | "
            f"{r['rel_error_max']:.4f} | {r['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        kind = "kernels" if "rows" in json.load(f) else "demo"
    print(kernel_table(sys.argv[1]) if kind == "kernels" else demo_table(sys.argv[1]))
