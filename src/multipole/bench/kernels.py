"""Kernel benchmark: one decode step of Multipole Attention against dense SDPA, on the GPU.

Every configuration is checked before it is timed (fused vs the PyTorch reference path, and
vs dense with a full budget); times are medians of ``triton.testing.do_bench`` in one run, so
ratios compare like with like. Writes a JSON report (rows carry GPU, versions, git sha, UTC
time and the command), a PNG of the speed-ups (``--plot``; default: the JSON's path with
``.png``) and prints a table.

The default grid is 32K, 128K and 512K tokens by batch 1, 4, 16 and 64 (two budgets). A
configuration whose estimated memory (:func:`needed_bytes`) does not fit in the free GPU
memory less 10% is not attempted, and one that runs out of memory anyway is given up: both
are recorded as rows ``{"context", "batch", "budget", "method": "skipped", "reason"}``. On an
H100 (80 GB) that skips 128K at batch 64 and 512K at batch 16 and 64; the rest took 2
minutes.

    multipole bench kernels --out k.json [--plot k.png] [--contexts 32768,131072,524288] \\
        [--batches 1,4,16,64] [--budgets 128,0.05]

The plot can be drawn again from a saved report (Python)::

    import json
    from multipole.bench.kernels import plot
    plot(json.load(open("k.json")), "k.png")
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from multipole import MultipoleConfig, MultipoleState, fused
from multipole.bench import git_revision

H_Q, H_KV, HEAD_DIM = 32, 8, 128
_SLEEP_CYCLES = 10_000_000  # 5-6 ms of GPU wait (at 1.7-2 GHz): longer than issuing an update
# Peak memory of one configuration per byte of its keys and values (bf16), and beyond them:
# measured on an H100, 2.35 x KV + 0.3 GiB from 32K x 4 to 512K x 4 (the benchmark's keys and
# values, the state's copy, its cluster index and the clustering workspace).
KV_FACTOR = 2.5
WORKSPACE_BYTES = 2**30  # CUDA graphs, small tensors, the allocator's rounding
HEADROOM = 0.1  # of the free memory, kept free (fragmentation, other processes)


def kv_bytes(context: int, batch: int) -> int:
    """Keys and values of one layer in bf16."""
    return 2 * batch * H_KV * context * HEAD_DIM * 2


def needed_bytes(context: int, batch: int) -> int:
    """Estimated peak GPU memory of one configuration (``KV_FACTOR`` x its keys and values
    plus ``WORKSPACE_BYTES``), an upper bound of the measured peaks."""
    return int(KV_FACTOR * kv_bytes(context, batch)) + WORKSPACE_BYTES


def fits(context: int, batch: int, free_bytes: int) -> bool:
    """Whether a configuration fits in ``free_bytes`` less ``HEADROOM`` (checked before it
    is allocated, so that a grid with 512K tokens or batch 64 runs what the GPU holds)."""
    return needed_bytes(context, batch) <= (1 - HEADROOM) * free_bytes


def skipped(context: int, batch: int, budget: int | float, reason: str) -> dict[str, Any]:
    """The row of a configuration that was not run."""
    return dict(context=context, batch=batch, budget=budget, method="skipped", reason=reason)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    from triton.testing import do_bench

    x = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def graph_of(fn):
    """Capture ``fn`` in a CUDA graph (after a warm-up) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_step(
    context: int, batch: int, budget: int | float, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Rows of one configuration: dense SDPA, multipole, multipole with a partial far field
    (``far_field_share`` of ``multipole eval``'s ``multipole_partial``) and centroid-only
    (checked, timed). Every tensor it makes is local, so all is freed when it returns."""
    from triton.testing import do_bench

    from ..eval.harness import PARTIAL_FAR_FIELD_SHARE

    gen = torch.Generator(device="cuda").manual_seed(context + batch)
    shape = (batch, H_KV, context, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, H_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense_bytes = 2 * k.numel() * k.element_size()

    q4 = q.unsqueeze(2)

    sdpa = functools.partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=True)

    rows = []
    dense_ms = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
    rows.append(dict(method="sdpa_dense", ms=dense_ms, bytes=dense_bytes))
    dense_out = sdpa().squeeze(2)

    cfg = MultipoleConfig(token_budget=budget, backend="triton")
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    state = MultipoleState.prefill(k, v, cfg)
    end.record()
    torch.cuda.synchronize()
    prefill_ms = start.elapsed_time(end)
    del k, v, sdpa  # the state holds its own copy: one KV less at the reference check

    variants = {
        "multipole": dict(replacement=True),
        "multipole_partial": dict(replacement=True, far_field_share=PARTIAL_FAR_FIELD_SHARE),
        "centroid_only": dict(replacement=False),
    }
    for name, variant in variants.items():
        state.config = dataclasses.replace(cfg, backend="triton", **variant)
        fused = state.attend(q)
        stats = state.stats()
        state.config = dataclasses.replace(state.config, backend="reference")
        ref = state.attend(q)
        err_ref = rel_err(fused, ref)
        err_fused, err_reference = rel_err(fused, dense_out), rel_err(ref, dense_out)
        state.config = dataclasses.replace(state.config, backend="triton")
        # bf16 centroids may flip clusters at the budget boundary against the fp32 reference:
        # the fused output must be as close to dense as the reference's, not bit-equal to it.
        if not torch.isfinite(fused).all() or err_fused > 1.25 * err_reference + 1e-2:
            raise SystemExit(
                f"refcheck failed: {name} {context} {batch} {budget}: vs reference {err_ref}, "
                f"vs dense {err_fused} (reference {err_reference})"
            )
        eager_ms = do_bench(lambda: state.attend(q), warmup=25, rep=200, return_mode="median")
        graph_ms = do_bench(
            graph_of(lambda: state.attend(q)), warmup=25, rep=200, return_mode="median"
        )
        row = dict(
            method=name,
            ms=graph_ms,
            eager_ms=eager_ms,
            bytes=stats.bytes_read,
            read_fraction=stats.read_fraction,
            tokens_exact=stats.tokens_exact,
            clusters_selected=stats.clusters_selected,
            rel_err_vs_reference=err_ref,
            rel_err_vs_dense=err_fused,
            reference_rel_err_vs_dense=err_reference,
            prefill_ms=prefill_ms,
        )
        if name == "multipole" and not args.skip_reference:
            state.config = dataclasses.replace(state.config, backend="reference")
            row["reference_ms"] = do_bench(
                lambda: state.attend(q), warmup=5, rep=50, return_mode="median"
            )
            state.config = dataclasses.replace(state.config, backend="triton")
        rows.append(row)
    for row in rows:
        row.update(
            context=context, batch=batch, budget=budget, speedup_vs_sdpa=dense_ms / row["ms"]
        )
    return rows


def bench_update(args=None) -> dict:
    """Online update per layer (k-means kernels) as a decode loop meets it: an open block of
    6528 tokens (8 heads, batch 1) receives 13 updates of 128 tokens, the last one filling it
    to 8192 (512 clusters; :func:`update_times`). A state's first update runs eagerly and is
    captured as a CUDA graph (``first_update_ms``, kernels already compiled); the others
    replay it, timed two ways in the order ABBA (with 13 updates both see the same block sizes
    on average), medians:

    - from a synchronised start: ``update_ms`` until the GPU is done (the host's work, then
      the GPU's that it could not overlap), ``host_ms`` to issue it, and
      ``update_plus_one_step_ms`` with the next decode step;
    - ``device_ms``: CUDA events around the update issued behind a GPU wait of 5-6 ms, so the
      host is ahead: the GPU's time alone, what a decode loop running ahead of the GPU pays.
      A sample whose host took longer to issue the update than the wait lasted is dropped
      (``device_samples`` counts those kept; ``device_ms`` is None if none is).

    The update also writes the kernels' layout in place. ``eager``: the same updates with
    the graphs off."""
    return dict(graphed=update_times(graphed=True), eager=update_times(graphed=False))


def update_times(graphed: bool, updates: int = 13, profile_at: int | None = None) -> dict:
    """:func:`bench_update`'s timings of ``updates`` updates filling the open block to its
    ``block_size`` (``graphed``: replayed as CUDA graphs), with every sample kept
    (``synced_ms``: host, update, update plus a step; ``device_samples_ms``). ``profile_at``:
    the second state's update of that index (negative: from the end) runs under
    ``torch.profiler`` instead of being timed, and ``profile`` holds its kernels' table (the last
    update, -1, leaves no timed one after it for the profiler to slow)."""
    config = MultipoleConfig(backend="triton")
    block, interval = config.block_size, config.interval
    if not 5 <= updates < block // interval:
        raise ValueError(
            f"updates: expected 5 (two samples of each timing) to {block // interval - 1} "
            f"(the open block must start non-empty), got {updates}"
        )
    if profile_at is not None:
        if not (0 < profile_at < updates or -updates < profile_at < 0):
            raise ValueError(
                f"profile_at: expected 1..{updates - 1} or -{updates - 1}..-1 (0 is the "
                f"capture), got {profile_at}"
            )
        profile_at %= updates
    # sink, clustered region, recent window one token short of an update
    n = config.sink_tokens + block - updates * interval + 2 * interval - 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, H_KV, n + updates * interval, HEAD_DIM)
    k = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, H_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    synced: list[tuple[float, float, float]] = []
    device: list[float] = []
    first, table = 0.0, None
    for timed_state in (False, True):  # the first state compiles every kernel
        state = MultipoleState.prefill(k[:, :, :n], k[:, :, :n], config)
        state._reserve_tokens(k.shape[2])  # no cache growth inside the timed updates
        state.index.update_graphs.enabled = graphed
        state.attend(q)
        pos, synced, device = n, [], []
        for u in range(updates):
            while state.appends_before_update() > 0:
                state.append(k[:, :, pos : pos + 1], k[:, :, pos : pos + 1])
                pos += 1
            state.attend(q)
            new = k[:, :, pos : pos + 1]
            pos += 1
            torch.cuda.synchronize()
            if timed_state and u == profile_at:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    state.append(new, new)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
            # updates 1, 2, 3, ... alternate device, synced, synced, device, device, ... (ABBA)
            elif u > 0 and u % 4 in (0, 1):  # behind a GPU wait: the GPU's work alone
                wait_start, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                wait_start.record()
                torch.cuda._sleep(_SLEEP_CYCLES)
                start.record()
                t0 = time.perf_counter()
                state.append(new, new)
                issue_ms = (time.perf_counter() - t0) * 1e3
                end.record()
                torch.cuda.synchronize()
                if issue_ms < wait_start.elapsed_time(start):  # else the host delayed the GPU
                    device.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                state.append(new, new)
                issued = time.perf_counter()
                torch.cuda.synchronize()
                updated = time.perf_counter()
                state.attend(q)
                torch.cuda.synchronize()
                done = time.perf_counter()
                if u == 0:
                    first = (updated - t0) * 1e3
                else:
                    host_ms, update_ms, plus_step_ms = (
                        (t - t0) * 1e3 for t in (issued, updated, done)
                    )
                    synced.append((host_ms, update_ms, plus_step_ms))
        assert state.clustered_len[0] == block
    host, update, plus_step = zip(*synced, strict=True)
    return dict(
        first_update_ms=first,
        update_ms=statistics.median(update),
        host_ms=statistics.median(host),
        update_plus_one_step_ms=statistics.median(plus_step),
        device_ms=statistics.median(device) if device else None,
        synced_samples=len(synced),
        device_samples=len(device),
        synced_ms=synced,
        device_samples_ms=device,
        replays=state.index.update_graphs.replays,
        **({} if table is None else dict(profile=table)),
    )


def apply_tuning(path: str) -> None:
    """Set ``multipole.fused.TUNING`` and the k-means block sizes from a JSON file."""
    from multipole.ops.kmeans import kernel as km

    with open(path) as f:
        tuning = json.load(f)
    fused.TUNING = fused.Tuning(**tuning.get("fused", {}))
    for name, value in tuning.get("kmeans", {}).items():
        setattr(km, name, value)


def bench_prefill(contexts: list[int]) -> dict:
    """Clustering at prefill, one layer, batch 1 (``MultipoleState.prefill``: k-means of every
    block and head, value centroids, index; median of 3 after a warm-up)."""
    out = {}
    for context in contexts:
        gen = torch.Generator(device="cuda").manual_seed(context)
        k = torch.randn(
            1, H_KV, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen
        )
        cfg = MultipoleConfig(backend="triton")
        MultipoleState.prefill(k, k, cfg)  # warm-up (kernel compilation)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            MultipoleState.prefill(k, k, cfg)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out[str(context)] = sorted(times)[1]
        del k
        torch.cuda.empty_cache()
    return out


def free_memory() -> int:
    """Free GPU memory in bytes once garbage and the allocator's cache are released."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def run_config(
    context: int, batch: int, budget: int | float, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """:func:`bench_step` if the configuration fits in memory, else a skipped row; a run out
    of memory is a skipped row too. Frees the configuration's memory before it returns."""
    free, needed = free_memory(), needed_bytes(context, batch)
    if not fits(context, batch, free):
        reason = (
            f"needs ~{needed / 2**30:.1f} GiB (estimated), {free / 2**30:.1f} GiB free "
            f"(less {HEADROOM:.0%} headroom)"
        )
        return [skipped(context, batch, budget, reason)]
    torch.cuda.reset_peak_memory_stats()
    try:
        rows = bench_step(context, batch, budget, args)
    except torch.cuda.OutOfMemoryError as e:
        # leaving this block drops the traceback, and with it the frames' tensors
        rows = [skipped(context, batch, budget, f"out of memory: {str(e).splitlines()[0]}")]
    else:
        peak = torch.cuda.max_memory_allocated()
        for row in rows:
            row.update(peak_memory_gb=peak / 1e9, estimated_memory_gb=needed / 1e9)
    free_memory()
    return rows


def format_row(r: dict[str, Any]) -> str:
    """One row of the printed table (a skipped configuration with its reason)."""
    head = f"{r['context']:>7} {r['batch']:>3} {str(r['budget']):>6} {r['method']:<14} "
    if r["method"] == "skipped":
        return head + r["reason"]
    gbps = r["bytes"] / (r["ms"] * 1e-3) / 1e9
    return head + (
        f"{r['ms']:>8.3f} {r.get('eager_ms', float('nan')):>8.3f} "
        f"{r['speedup_vs_sdpa']:>7.2f} {gbps:>6.0f} {r.get('read_fraction', 1.0):>6.3f} "
        f"{r.get('rel_err_vs_reference', 0.0):>8.1e}"
    )


def _budget_label(budget: int | float) -> str:
    return f"{budget:.0%}" if isinstance(budget, float) else f"{budget} tokens"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot(report: dict[str, Any], path: str) -> None:
    """Speed-up over dense SDPA against batch, one panel per context, one line per method
    and budget (PNG). Takes the report as loaded from its JSON, so it redraws a saved one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = report["rows"], report["meta"]
    contexts = sorted({r["context"] for r in rows})
    budgets = sorted({r["budget"] for r in rows}, key=lambda b: (isinstance(b, float), b))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        ax.axhline(1.0, color="gray", linestyle=":", label="SDPA (dense)")
        for i, budget in enumerate(budgets):
            for method, style in (
                ("multipole", "o-"),
                ("multipole_partial", "^-."),
                ("centroid_only", "s--"),
            ):
                mine = [
                    r
                    for r in rows
                    if (r["context"], r["budget"], r["method"]) == (context, budget, method)
                ]
                mine.sort(key=lambda r: r["batch"])
                label = f"{method}, {_budget_label(budget)}"
                xs, ys = [r["batch"] for r in mine], [r["speedup_vs_sdpa"] for r in mine]
                ax.plot(xs, ys, style, color=f"C{i}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        gone = sorted(
            {r["batch"] for r in rows if r["context"] == context}
            - {r["batch"] for r in rows if r["context"] == context and r["method"] != "skipped"}
        )
        title = f"context {_tokens(context)}"
        if gone:
            title += f" (not run: batch {', '.join(map(str, gone))})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("speed-up vs SDPA (CUDA graph, median)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Decode attention of one layer, 32 query / 8 KV heads, d=128, bf16: "
        f"{meta['gpu']}, {meta['utc'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the kernel benchmark (needs a CUDA device); ``argv`` as after ``bench kernels``."""
    if not torch.cuda.is_available():
        raise SystemExit("multipole bench kernels: needs a CUDA device, none is available")
    parser = argparse.ArgumentParser(prog="multipole bench kernels")
    parser.add_argument("--contexts", default="32768,131072,524288")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--budgets", default="128,0.05")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--plot", default=None, help="PNG (default: --out with .png; '' none)")
    parser.add_argument(
        "--tuning",
        default=None,
        help="JSON file: launch shapes ({'fused': {...}, 'kmeans': {...}})",
    )
    args = parser.parse_args(argv)
    if args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        args.plot = None
    import triton

    if args.tuning:
        apply_tuning(args.tuning)
    meta = dict(
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        git_sha=git_revision(),
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command=" ".join(
            ["multipole", "bench", "kernels", *(argv if argv is not None else sys.argv[1:])]
        ),
    )
    meta["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    from multipole.ops.kmeans import kernel as km

    meta["tuning"] = dict(
        fused=dataclasses.asdict(fused.TUNING),
        kmeans={
            n: getattr(km, n)
            for n in (
                *("BLOCK_N", "BLOCK_K", "SCAN", "ACCUMULATE_WARPS"),
                *("ASSIGN_BLOCK_N", "ASSIGN_BLOCK_K", "ASSIGN_STAGES", "WARPS"),
            )
        },
    )
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            for budget in args.budgets.split(","):
                value = float(budget) if "." in budget else int(budget)
                step = {r["method"]: r for r in run_config(context, batch, value, args)}
                rows.extend(step.values())
                if "skipped" in step:
                    line = f"skipped: {step['skipped']['reason']}"
                else:
                    dense, mp = step["sdpa_dense"], step["multipole"]
                    line = (
                        f"sdpa {dense['ms']:.3f} ms, multipole {mp['ms']:.3f} ms "
                        f"({mp['speedup_vs_sdpa']:.2f}x), eager {mp['eager_ms']:.3f}, "
                        f"peak {mp['peak_memory_gb']:.1f} GB (est. {mp['estimated_memory_gb']:.1f})"
                    )
                print(f"ctx {context} B {batch} budget {budget}: {line}", flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
    meta["online_update"] = bench_update(args)
    meta["prefill_clustering_ms"] = bench_prefill(list(map(int, args.contexts.split(","))))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    bw = meta["copy_bandwidth_GBps"]
    print(f"\n{meta['gpu']}  copy {bw:.0f} GB/s  update {meta['online_update']}")
    print(f"prefill clustering per layer, batch 1 (ms): {meta['prefill_clustering_ms']}")
    header = ("ctx", "B", "budget", "method", "ms", "eager", "x sdpa", "GB/s", "read", "err")
    print("{:>7} {:>3} {:>6} {:<14} {:>8} {:>8} {:>7} {:>6} {:>6} {:>8}".format(*header))
    for r in rows:
        print(format_row(r))
    print(f"wrote {args.out}")
    if args.plot:
        plot(dict(meta=meta, rows=rows), args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
