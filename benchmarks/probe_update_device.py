"""The replayed online update's GPU time with the host ahead, and where it goes (GPU only).

:func:`multipole.bench.kernels.update_times` (one layer, 8 KV heads, d=128, bf16, batch 1:
``--updates`` updates of 128 tokens filling an open block to 8192 tokens, the replays timed
alternately from a synchronised start and behind a GPU wait, so that the host is ahead), with
update ``--profile-at`` (default -1: the last) run under ``torch.profiler`` instead: the
per-kernel GPU time of one replayed update (the table is in the JSON).

    python benchmarks/probe_update_device.py --out update_device.json
"""

from __future__ import annotations

import argparse
import json

import torch

from multipole.bench.kernels import update_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=None, help="(default: update_times')")
    parser.add_argument("--profile-at", type=int, default=-1, help="(default: the last)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = dict(gpu=torch.cuda.get_device_name(0), command=vars(args))
    updates = {} if args.updates is None else dict(updates=args.updates)
    result.update(update_times(graphed=True, profile_at=args.profile_at, **updates))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
    print(result.get("profile"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
