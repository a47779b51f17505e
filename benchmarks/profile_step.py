"""Where the time of a fused decode step goes, launch variants, and the k-means kernels (GPU).

python benchmarks/profile_step.py [--context 131072] [--batches 1,16] [--budgets 128,0.05]
    [--shares 1.0,0.05] [--variants [--tunings A,B]] [--kmeans] [--out FILE.json]

- default: per-kernel GPU time of one step (torch.profiler, 20 steps);
- ``--variants``: each launch variant of ``multipole.fused.Tuning`` checked against the
  default (same state, same query) and timed as a CUDA graph replay (median of do_bench);
  ``--tunings`` picks them: names of ``VARIANTS`` or ``FIELD=VALUE+...`` (``Tuning.parse``), as
  ``profile_decode.py --tunings`` takes them;
- ``--kmeans``: the k-means kernels at realistic sizes: invariants (sizes = label histogram,
  centroids = member means, labels nearest up to the assignment's rounding), prefill clustering
  per layer and the online update (8K open block + 128 tokens) against the PyTorch reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from multipole import MultipoleConfig, MultipoleState
from multipole import fused as fused_mod
from multipole.bench.kernels import graph_of, rel_err

DEVICE = "cuda"  # (a dry run of this script's logic can set "cpu" under TRITON_INTERPRET=1)

VARIANTS = {
    "default": {},
    "expand4": dict(expand_programs_per_sm=4),
    "exact4": dict(exact_programs_per_sm=4),
    "bn128": dict(block_n=128),
    "cent4": dict(centroid_programs_per_sm=4),
    "cblock128": dict(centroid_block=128),
    "keys2": dict(keys_only_programs_per_sm=2),
    "kblock128": dict(keys_only_block=128),
    "kbn64": dict(keys_only_block_n=64),
    "select256": dict(select_chunk=256),
    "select1024": dict(select_chunk=1024),
    "one_stream": dict(band_beside_expansion=False),
    "plain_launch": dict(dependent_launch=False),
}
KMEANS_VARIANTS = {
    "default": {},
    "assign256": dict(ASSIGN_BLOCK_N=256),
    "acc128": dict(BLOCK_K=128),
    "both": dict(ASSIGN_BLOCK_N=256, BLOCK_K=128),
}


def make_state(context: int, batch: int, budget, replacement: bool = True, share: float = 1.0):
    gen = torch.Generator(device=DEVICE).manual_seed(context + batch)
    k = torch.randn(batch, 8, context, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, 8, context, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, 32, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    cfg = MultipoleConfig(
        token_budget=budget, backend="triton", replacement=replacement, far_field_share=share
    )
    return MultipoleState.prefill(k, v, cfg), q, k, v


def profile_steps(args, budgets, rows) -> None:
    shares = [float(x) for x in args.shares.split(",")]
    batches = map(int, args.batches.split(","))
    for batch, budget, share in itertools.product(batches, budgets, shares):
        state, q, _, _ = make_state(args.context, batch, budget, share=share)
        for _ in range(5):
            state.attend(q)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                state.attend(q)
            torch.cuda.synchronize()
        print(f"\n=== context {args.context} batch {batch} budget {budget} far-field share {share}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
                rows.append(
                    _row(
                        "profile",
                        args,
                        batch,
                        budget,
                        share,
                        kernel=e.key,
                        us_per_step=e.self_device_time_total / 20,
                    )
                )
        del state
        torch.cuda.empty_cache()


def _row(kind: str, args, batch: int, budget, share: float, **fields) -> dict:
    return dict(
        kind=kind,
        context=args.context,
        batch=batch,
        budget=budget,
        far_field_share=share,
        **fields,
    )


def step_ms(state, q) -> float:
    """Median time of one decode step replayed as a CUDA graph (ms)."""
    from triton.testing import do_bench

    return do_bench(graph_of(lambda: state.attend(q)), warmup=25, rep=200, return_mode="median")


def tuning_of(spec: str) -> fused_mod.Tuning:
    """The tuning a ``--tunings`` item names: a key of ``VARIANTS`` or ``Tuning.parse``'s form."""
    if spec in VARIANTS:
        return fused_mod.Tuning(**VARIANTS[spec])
    if "=" not in spec:
        raise ValueError(f"{spec!r}: expected a name of {list(VARIANTS)} or FIELD=VALUE+...")
    return fused_mod.Tuning.parse(spec)


def time_variants(args, budgets, rows, variants: dict[str, fused_mod.Tuning]) -> dict:
    """Time each variant (graph replay) per configuration; returns {variant: [ms, ...]}."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    shares = [float(x) for x in args.shares.split(",")]
    batches = map(int, args.batches.split(","))
    for batch, budget, share in itertools.product(batches, budgets, shares):
        state, q, _, _ = make_state(args.context, batch, budget, share=share)
        fused_mod.TUNING = fused_mod.Tuning()
        base = state.attend(q)
        state.config = dataclasses.replace(state.config, backend="reference")
        ref = state.attend(q)
        state.config = dataclasses.replace(state.config, backend="triton")
        print(
            f"ctx {args.context} B {batch} budget {budget} share {share}: default vs reference "
            f"{rel_err(base, ref):.2e}",
            flush=True,
        )
        for name, tuning in variants.items():
            fused_mod.TUNING = tuning
            out = state.attend(q)
            err = rel_err(out, base)
            ms = step_ms(state, q)
            rows.append(
                _row(
                    "variant",
                    args,
                    batch,
                    budget,
                    share,
                    variant=name,
                    ms=ms,
                    rel_err_vs_default=err,
                )
            )
            print(f"  {name:12s} {ms * 1e3:8.1f} us  err {err:.1e}", flush=True)
            times[name].append(ms)
        fused_mod.TUNING = fused_mod.Tuning()
        del state
        torch.cuda.empty_cache()
    return times


def _geo_ratio(ms: list[float], base: list[float]) -> float:
    prod = 1.0
    for a, b in zip(ms, base, strict=True):
        prod *= a / b
    return prod ** (1 / max(1, len(ms)))


def pick_tuning(args, budgets, rows) -> dict:
    """Single variants, then every improving option together; the best by geometric mean of
    time ratios against the default over the configurations."""
    times = time_variants(args, budgets, rows, {name: tuning_of(name) for name in VARIANTS})
    score = {n: _geo_ratio(t, times["default"]) for n, t in times.items()}
    good = sorted((s, n) for n, s in score.items() if s < 0.99 and n != "default")
    combo: dict = {}
    for _, name in good:  # better first; a later option never overrides an earlier one
        for key, value in VARIANTS[name].items():
            combo.setdefault(key, value)
    best_name = min(score, key=score.get)
    best = dict(VARIANTS[best_name])
    if len(good) > 1:
        combos = {"default": fused_mod.Tuning(), "combo": fused_mod.Tuning(**combo)}
        t = time_variants(args, budgets, rows, combos)
        combo_score = _geo_ratio(t["combo"], t["default"])
        print(f"combo {combo}: {combo_score:.3f} vs best single {best_name} {score[best_name]:.3f}")
        if combo_score < score[best_name]:
            best = combo
    rows.append(dict(kind="pick", scores=score, picked=best))
    print(f"picked fused tuning: {best} (scores {score})", flush=True)
    return best


def pick_kmeans(rows) -> dict:
    """Prefill clustering at 128K (batch 1) per k-means block variant; the fastest."""
    from multipole.ops.kmeans import kernel as km

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    k = torch.randn(1, 8, 131072, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    saved = {n: getattr(km, n) for v in KMEANS_VARIANTS.values() for n in v}
    result = {}
    for name, kw in KMEANS_VARIANTS.items():
        for n, value in {**saved, **kw}.items():
            setattr(km, n, value)
        MultipoleState.prefill(k, k, MultipoleConfig(backend="triton"))  # compile
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            MultipoleState.prefill(k, k, MultipoleConfig(backend="triton"))
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        result[name] = statistics.median(times)
        print(f"kmeans {name}: prefill 128K {result[name]:.1f} ms", flush=True)
    for n, value in saved.items():
        setattr(km, n, value)
    best = min(result, key=result.get)
    rows.append(dict(kind="kmeans_pick", ms=result, picked=best))
    return dict(KMEANS_VARIANTS[best])


def check_index(state: MultipoleState) -> dict:
    """Invariants of the kernel-built index: sizes = histogram, centroids = member means,
    labels nearest (up to the assignment's rounding)."""
    from multipole.ops.kmeans import cluster_means

    index, n = state.index, max(state.seq_lens)
    labels = index.labels[:, :, :n]
    worst_mean = worst_gap = 0.0
    hist_ok = True
    for b in range(state.batch_size):
        lab = labels[b]
        c = index.level0.sizes.shape[-1]
        for data, cent in (
            (state.cluster_keys[b], index.level0.key_centroids[b]),
            (state.values[b], index.level0.value_centroids[b]),
        ):
            means, counts = cluster_means(data, lab, torch.ones_like(lab, dtype=torch.float32), c)
            hist_ok &= bool(torch.equal(counts.long(), index.level0.sizes[b]))
            live = counts > 0
            scale = means[live].abs().max().clamp_min(1e-6)
            worst_mean = max(worst_mean, float((cent[live] - means[live]).abs().max() / scale))
        # nearest among the clusters of the same block: distance to own centroid vs the best
        cfg = state.config
        for start in range(0, state.clustered_len[b], cfg.block_size):
            pos = slice(
                cfg.sink_tokens + start,
                cfg.sink_tokens + min(start + cfg.block_size, state.clustered_len[b]),
            )
            x = state.cluster_keys[b][:, pos].float()
            lab_blk = lab[:, pos]
            lo, hi = int(lab_blk.min()), int(lab_blk.max()) + 1
            cent = index.level0.key_centroids[b][:, lo:hi]
            d = torch.cdist(x, cent).square()
            own = d.gather(-1, (lab_blk - lo).unsqueeze(-1)).squeeze(-1)
            gap = (own - d.min(-1).values) / x.square().sum(-1).clamp_min(1e-6)
            worst_gap = max(worst_gap, float(gap.max()))
    return dict(histogram_ok=hist_ok, worst_mean_rel=worst_mean, worst_nearest_gap_rel=worst_gap)


def kmeans_checks(args, rows) -> None:
    def prefill_ms(context: int, backend: str, reps: int = 3) -> tuple[float, MultipoleState]:
        gen = torch.Generator(device=DEVICE).manual_seed(context)
        k = torch.randn(1, 8, context, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        times, state = [], None
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            state = MultipoleState.prefill(k, k, MultipoleConfig(backend=backend))
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), state

    for context in (32768, 131072):
        for backend in ("triton", "reference"):
            ms, state = prefill_ms(context, backend, 3 if backend == "triton" else 1)
            row = dict(kind="prefill_clustering", context=context, backend=backend, ms=ms)
            if backend == "triton":
                row.update(check_index(state))
            rows.append(row)
            print(row, flush=True)
            del state
            torch.cuda.empty_cache()

    # online update: 8064-token open block + 128 new tokens, 8 heads, then one decode step
    n = 16 + 8064 + 255
    for backend in ("triton", "reference"):
        times = []
        for seed in range(5):
            gen = torch.Generator(device=DEVICE).manual_seed(seed)
            k = torch.randn(1, 8, n + 1, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            cfg = MultipoleConfig(backend="triton")
            state = MultipoleState.prefill(k[:, :, :n], k[:, :, :n], cfg)
            state.config = dataclasses.replace(cfg, backend=backend)
            q = torch.randn(1, 32, 128, device=DEVICE, dtype=torch.bfloat16)
            state.attend(q)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            state.append(k[:, :, n:], k[:, :, n:])
            state.config = dataclasses.replace(cfg, backend="triton")
            state.attend(q)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            if seed == 4 and backend == "triton":
                rows.append(dict(kind="update_check", **check_index(state)))
        row = dict(
            kind="online_update", backend=backend, ms=statistics.median(times[1:]), runs_ms=times
        )
        rows.append(row)
        print(row, flush=True)


def profile_update(rows, context: int | None = None, batch: int = 1) -> None:
    """Where an online update and the next step spend time: wall time of each part
    (synchronised; the update includes the layout's refresh; a build from scratch also
    alone) and the top operators by GPU time (torch.profiler). Default shape: an 8K open
    block + 128 tokens, 8 heads, batch 1; ``context``: a cache of that many tokens per
    sequence (32 q / 8 kv heads, d=128)."""
    n = 16 + 8064 + 255 if context is None else context
    cfg = MultipoleConfig(backend="triton")
    parts: dict[str, list[float]] = {
        "append+update": [], "layout_build": [], "attend": []
    }  # fmt: skip

    def timed(name, fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        parts[name].append((time.perf_counter() - t) * 1e3)

    def fresh(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        k = torch.randn(batch, 8, n + 64, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        q = torch.randn(batch, 32, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        state = MultipoleState.prefill(k, k, cfg, lengths=[n] * batch)  # room for new tokens
        state.attend(q)
        # append up to the token before the update, so the next append updates
        while state.appends_before_update() > 0:
            state.append(k[:, :, n : n + 1], k[:, :, n : n + 1])
        return state, k, q

    for seed in range(4):
        state, k, q = fresh(seed)
        new = k[:, :, n : n + 1]
        timed("append+update", lambda s=state, x=new: s.append(x, x))
        # the update refreshes the layout in place; a build from scratch, for comparison
        timed(
            "layout_build",
            lambda s=state: fused_mod.FusedLayout.build(
                s.index, s.dtype, s.clustered_len, s._fused_budget, 0
            ),
        )
        timed("attend", lambda s=state, q=q: s.attend(q))
        del state, k, q
    row = {name: statistics.median(v[1:]) for name, v in parts.items()}
    row.update(context=n, batch=batch)
    print(f"update parts (ms, median of 3): {row}", flush=True)
    rows.append(dict(kind="update_parts", **row))
    state, k, q = fresh(9)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        state.append(k[:, :, n : n + 1], k[:, :, n : n + 1])
        state.attend(q)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(table)
    rows.append(dict(kind="update_profile", context=n, batch=batch, table=table))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--budgets", default="128,0.05")
    parser.add_argument("--shares", default="1.0", help="far_field_share values to profile")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument(
        "--tunings",
        default=",".join(VARIANTS),
        help="with --variants, the variants to time: NAME (of VARIANTS) or FIELD=VALUE+..., "
        "comma-separated (default: all of VARIANTS)",
    )
    parser.add_argument("--kmeans", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pick", default=None, help="write the best tuning (JSON) here")
    parser.add_argument("--update", action="store_true", help="profile the online update")
    parser.add_argument(
        "--update-at",
        default=None,
        help="CONTEXT:BATCH,... profile the online update of caches of these sizes",
    )
    args = parser.parse_args()
    try:  # every tuning checked before anything runs
        tunings = {spec: tuning_of(spec) for spec in args.tunings.split(",")}
    except ValueError as e:
        parser.error(f"--tunings: {e}")
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    rows: list[dict] = []
    try:
        if args.pick:
            picked = dict(fused=pick_tuning(args, budgets, rows), kmeans=pick_kmeans(rows))
            with open(args.pick, "w") as f:
                json.dump(picked, f)
            fused_mod.TUNING = fused_mod.Tuning(**picked["fused"])
            from multipole.ops.kmeans import kernel as km

            for name, value in picked["kmeans"].items():
                setattr(km, name, value)
        if args.update:
            profile_update(rows)
        for shape in args.update_at.split(",") if args.update_at else []:
            context, batch = map(int, shape.split(":"))
            profile_update(rows, context, batch)
        if args.kmeans:
            kmeans_checks(args, rows)
        if args.variants:
            time_variants(args, budgets, rows, tunings)
        if not args.no_profile:
            profile_steps(args, budgets, rows)
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(gpu=torch.cuda.get_device_name(0), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
