"""Render a committed result JSON as the README's markdown table.

Knows the kernel benchmark (``multipole bench kernels``), the end-to-end decode benchmark
(``multipole bench decode``), the demos (``multipole demo [--synthetic] --json``) and the
evaluation summary (``multipole eval``: ``summary.json``).

python benchmarks/report.py benchmarks/results/2026-11-23_h100_kernels.json
"""

from __future__ import annotations

import json
import sys


def kernel_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['utc'][:10]}; "
        f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s. Decode attention of one layer, "
        "32 query / 8 KV heads, d=128, bf16, centroid ratio 1/16, CUDA graph replay, median. "
        f"Command: `{meta['command']}`.",
        "",
    ]
    rows = report["rows"]
    # each method's time and speed-up (KV read for multipole), the partial far field if timed
    methods = [
        m
        for m in ("multipole", "multipole_partial", "centroid_only")
        if any(r["method"] == m for r in rows)
    ]
    header = "| context | batch | budget | SDPA ms |"
    for m in methods:
        header += f" {m} ms | speed-up |" + (" KV read |" if m == "multipole" else "")
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for dense in (r for r in rows if r["method"] == "sdpa_dense"):
        key = (dense["context"], dense["batch"], dense["budget"])
        same = {r["method"]: r for r in rows if (r["context"], r["batch"], r["budget"]) == key}
        budget = f"{dense['budget']:.0%}" if isinstance(dense["budget"], float) else dense["budget"]
        line = f"| {dense['context'] // 1024}K | {dense['batch']} | {budget} | {dense['ms']:.3f} |"
        for m in methods:
            line += f" {same[m]['ms']:.3f} | {same[m]['speedup_vs_sdpa']:.2f}x |"
            line += f" {same[m]['read_fraction']:.1%} |" if m == "multipole" else ""
        lines.append(line)
    skipped = sorted({(r["context"], r["batch"]) for r in rows if r["method"] == "skipped"})
    if skipped:
        lines += [
            "",
            "Not run (GPU memory): " + ", ".join(f"{c // 1024}K x {b}" for c, b in skipped),
        ]
    update = meta.get("online_update")
    if update and "graphed" in update:
        graphed, eager = update["graphed"], update["eager"]
        lines += [
            "",
            f"Online update (128 tokens into an open block of up to 8K, 8 heads), per layer: "
            f"{graphed['update_ms']:.2f} ms replayed as a CUDA graph "
            f"({eager['update_ms']:.2f} ms eager), {graphed['update_plus_one_step_ms']:.2f} ms "
            f"with the next decode step.",
        ]
        if graphed.get("device_ms") is not None:  # since 2026-12-06's second update benchmark
            lines[-1] += (
                f" Of the replayed update, the host took {graphed['host_ms']:.2f} ms to issue it "
                f"and the GPU {graphed['device_ms']:.2f} ms to run it (timed with the host ahead)."
            )
    elif update:  # reports before 2026-12-06's graphed updates: a fresh state's first update
        lines += [
            "",
            f"Online update (8K open block + 128 tokens, 8 heads) plus one decode step: "
            f"{update['update_plus_one_step_ms']:.1f} ms per layer.",
        ]
    prefill = meta.get("prefill_clustering_ms")
    if prefill:
        times = ", ".join(f"{int(n) // 1024}K: {ms:.1f} ms" for n, ms in prefill.items())
        lines.append(f"Prefill clustering per layer, batch 1 ({times}).")
    return "\n".join(lines)


def demo_table(report: dict) -> str:
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


def needle_table(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    configs = s.get("configs") or {"multipole": s["config"]}  # one config before 2026-12-06
    each = "; ".join(
        f"{method}: centroid ratio 1/{round(1 / c['centroid_ratio'])}, budget "
        f"{c['token_budget']} tokens, far_field_share {c.get('far_field_share', 1.0):g}"
        for method, c in configs.items()
    )
    lines = [
        f"{s['model']}, a {report['prompt_tokens']}-token prompt hiding the number "
        f"{report['expected'][0]} at depth {report['needle_depth']:.2f}, every method at "
        f"{s['read_fraction']:.2%} of the dense KV bytes ({each}), on {env['device']}, "
        f"torch {env['torch']}, {env['utc'][:10]}. Command: `{env['command']}`.",
        "",
        "| method | answer | correct | first token s | decode tok/s | KV read | KL to dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} | {r['answer']} | {'yes' if r['correct'] else 'no'} | "
            f"{r['first_token_s']:.2f} | {r['tokens_per_s']:.1f} | {r['read_fraction']:.1%} | "
            f"{r['kl_to_dense']:.4f} |"
        )
    return "\n".join(lines)


EVAL_COLUMNS = {
    "fidelity": [("rel_error", "attn. rel. error", ".3f"), ("mass", "mass captured", ".3f")],
    "perplexity": [("decoded_tokens", "tokens", "d"), ("perplexity", "PPL", ".2f"),
                   ("kl", "KL", ".4f"),
                   ("kl_first_half", "KL 1st half", ".4f"),
                   ("kl_second_half", "KL 2nd half", ".4f")],
    "retrieval": [("accuracy", "retrieval acc.", ".2f"), ("agreement", "agreement", ".2f")],
    "gsm": [("accuracy", "GSM acc.", ".2f"), ("agreement", "agreement", ".2f")],
}  # fmt: skip


def eval_table(summary: dict) -> str:
    env, tasks = summary["environment"], summary["tasks"]
    columns = [(t, *c) for t in EVAL_COLUMNS if t in tasks for c in EVAL_COLUMNS[t]]
    labels: list[str] = []
    for t in tasks.values():
        labels += [label for label in t if label not in labels]
    labels.sort(key=lambda x: (x != "dense", -_fraction(x), x))
    lines = [
        f"{summary['model']}, on {env['device']}, torch {env['torch']}, {env['utc'][:10]}. "
        f"Command: `{env['command']}`.",
        "",
        "| run | KV read | " + " | ".join(c[2] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for label in labels:
        reads = [tasks[t][label].get("read_fraction") for t in tasks if label in tasks[t]]
        read = next((r for r in reads if r is not None), None)
        cells = [
            format(tasks[t][label][key], fmt) if label in tasks[t] else "-"
            for t, key, _, fmt in columns
        ]
        lines.append(
            f"| {label} | {'-' if read is None else f'{read:.1%}'} | " + " | ".join(cells) + " |"
        )
    if summary.get("skipped"):
        lines += [
            "",
            "Not reachable (sink + window alone read more): " + "; ".join(summary["skipped"]),
        ]
    return "\n".join(lines)


def decode_table(report: dict) -> str:
    meta = report["meta"]
    v = meta["versions"]
    lines = [
        f"{meta['gpu']}, {meta['arch']} with random {meta['dtype']} weights, torch {v['torch']}, "
        f"transformers {v['transformers']}, {meta['utc'][:10]}; budget "
        f"{meta['config']['token_budget']}, centroid ratio "
        f"1/{round(1 / meta['config']['centroid_ratio'])}, {meta['steps']} timed "
        f"steps after {meta['warmup']} warm-up steps; {meta['execution']}. Dense: "
        f"{meta['dense_cache']}. Command: `{meta['command']}`.",
        "",
        "| context | batch | layers | dense ms | multipole ms | speed-up (median) | speed-up "
        "(mean, with the online update) | multipole tok/s | KV read | prompt clustering s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    for dense in (r for r in rows if r["method"] == "dense"):
        key = (dense["context"], dense["batch"])
        ours = next(
            r for r in rows if r["method"] == "multipole" and (r["context"], r["batch"]) == key
        )
        lines.append(
            f"| {dense['context'] // 1024}K | {dense['batch']} | {ours['layers_run']}/"
            f"{ours['layers_full']} | {dense['median_ms']:.1f} | {ours['median_ms']:.1f} | "
            f"{ours['speedup_vs_dense']:.2f}x | {ours['speedup_vs_dense_mean']:.2f}x | "
            f"{ours['tokens_per_s']:.0f} | {ours['read_fraction']:.1%} | "
            f"{ours['clustering_ms'] / 1e3:.2f} |"
        )
    return "\n".join(lines)


def _fraction(label: str) -> float:
    return 1.0 if "@1/" not in label else 1 / float(label.split("@1/")[1])


def render(path: str) -> str:
    with open(path) as f:
        report = json.load(f)
    if "tasks" in report:
        return eval_table(report)
    if "needle_depth" in report:
        return needle_table(report)
    rows = report.get("rows", [])
    if any("speedup_vs_sdpa" in r for r in rows):  # skipped rows carry no timing
        return kernel_table(report)
    if any("speedup_vs_dense" in r for r in rows):
        return decode_table(report)
    return demo_table(report)


if __name__ == "__main__":
    print(render(sys.argv[1]))
