"""The replayed online update's GPU time with the host ahead, and where it goes (GPU only).

One layer (8 KV heads, d=128, bf16, batch 1): an open block of ``--clustered`` tokens receives
``--updates`` updates of 128 tokens (two states; the first compiles every kernel, the
second's first update is the capture). The second state's replayed updates are timed
alternately two ways:

- from a synchronised start: ``wall`` until the GPU is done, ``host`` to issue the update,
  ``plus_step`` with the next decode step;
- ``device``: CUDA events around the update issued behind a long GPU wait
  (``torch.cuda._sleep``), so the host is ahead and the events time the GPU's work alone.

Update ``--profile-at`` is run under ``torch.profiler`` instead: the per-kernel GPU time of one
replayed update (the table is in the JSON).

    python benchmarks/probe_update_device.py --out update_device.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from multipole import MultipoleConfig, MultipoleState

H_KV, H_Q, HEAD_DIM = 8, 32, 128
SLEEP_CYCLES = 3_000_000  # 1.5-1.8 ms of GPU wait: longer than the host takes to issue an update


def run(clustered: int, updates: int, profile_at: int) -> dict:
    n = 16 + clustered + 255  # sink, clustered region, a recent window one token short
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, H_KV, n + updates * 128 + 8, HEAD_DIM)
    k = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, H_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    times: dict[str, list[float]] = dict(wall=[], host=[], device=[], plus_step=[])
    table = None
    for timed_state in (False, True):
        state = MultipoleState.prefill(k[:, :, :n], k[:, :, :n], MultipoleConfig(backend="triton"))
        state._reserve_tokens(k.shape[2])
        state.attend(q)
        pos = n
        for u in range(updates):
            while state.appends_before_update() > 0:
                state.append(k[:, :, pos : pos + 1], k[:, :, pos : pos + 1])
                pos += 1
            state.attend(q)
            new = k[:, :, pos : pos + 1]
            pos += 1
            torch.cuda.synchronize()
            keep = timed_state and u > 0  # (update 0 of a state is its capture)
            if timed_state and u == profile_at:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    state.append(new, new)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
            elif u % 2 == 0:
                start = time.perf_counter()
                state.append(new, new)
                issued = time.perf_counter()
                torch.cuda.synchronize()
                updated = time.perf_counter()
                state.attend(q)
                torch.cuda.synchronize()
                done = time.perf_counter()
                if keep:
                    times["host"].append((issued - start) * 1e3)
                    times["wall"].append((updated - start) * 1e3)
                    times["plus_step"].append((done - start) * 1e3)
                continue
            else:
                begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                torch.cuda._sleep(SLEEP_CYCLES)
                begin.record()
                state.append(new, new)
                end.record()
                torch.cuda.synchronize()
                if keep:
                    times["device"].append(begin.elapsed_time(end))
            state.attend(q)
    medians = {f"{name}_ms": statistics.median(v) for name, v in times.items() if v}
    return dict(
        medians=medians,
        runs=times,
        replays=state.index.update_graphs.replays,
        profile=table,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clustered", type=int, default=7168, help="open block's first size")
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--profile-at", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = dict(gpu=torch.cuda.get_device_name(0), command=vars(args))
    result.update(run(args.clustered, args.updates, args.profile_at))
    print(json.dumps(result["medians"]), result["replays"])
    print(result["profile"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
