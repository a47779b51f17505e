"""The online update replayed as a CUDA graph against the same update run eagerly (GPU only).

One layer (8 KV heads, d=128, bf16, batch 1): an open block of 6528 tokens receives 13 updates
of 128 tokens (to 8192), timed on the host around a synchronised ``append`` (and with the decode
step after it) and on the GPU with the host ahead. See
:func:`multipole.bench.kernels.bench_update`, which ``multipole bench kernels`` also runs.

    python benchmarks/probe_update_graph.py --out update.json
"""

from __future__ import annotations

import argparse
import json

import torch

from multipole.bench.kernels import bench_update


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = dict(gpu=torch.cuda.get_device_name(0), **bench_update())
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
