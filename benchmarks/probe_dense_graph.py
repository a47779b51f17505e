"""Can dense decode attention run inside a CUDA graph as fast as SDPA runs eagerly?

A whole decode step captured as one CUDA graph needs a dense baseline whose KV length lives on
the device (SDPA over ``cache[:, :, :length]`` bakes the length into the graph). Candidates:
FlashAttention's varlen entry point (``torch.ops.aten._flash_attention_forward`` with
``seqused_k``: the cache as one packed buffer, each row's used length read on the device).
This times it against SDPA's flash backend on the same keys and values, eagerly and replayed,
checks its output, and writes JSON. 32 q / 8 kv heads, d=128, bf16 (GPU only).

    python benchmarks/probe_dense_graph.py --out probe.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

HQ, HKV, DIM = 32, 8, 128


def sdpa(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def varlen(q, packed_k, packed_v, cum_q, cum_k, capacity, used, **extra):
    """q [B, Hq, D]; packed_k/v [B * capacity, Hkv, D]; used [B] int32 -> [B, Hq, D]."""
    out = torch.ops.aten._flash_attention_forward(
        q, packed_k, packed_v, cum_q, cum_k, 1, capacity, 0.0, False, False,
        scale=DIM**-0.5, seqused_k=used, **extra,
    )  # fmt: skip
    return out[0]


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(context: int, batch: int) -> dict:
    """SDPA on the prefix against varlen (eager and replayed) at one shape; a ragged batch
    (the last row 1000 tokens shorter) checks varlen's output."""
    capacity = context + 256
    torch.manual_seed(0)
    k = torch.randn(batch, capacity, HKV, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16)
    lengths = [context] * batch
    if batch > 1:
        lengths[-1] = context - 1000
    cum_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    cum_k = cum_q * capacity
    pk, pv = k.view(-1, HKV, DIM), v.view(-1, HKV, DIM)
    kt, vt, q4 = k.transpose(1, 2), v.transpose(1, 2), q[:, :, None]
    want = torch.cat(
        [
            sdpa(q4[i : i + 1], kt[i : i + 1, :, :n], vt[i : i + 1, :, :n])[:, :, 0]
            for i, n in enumerate(lengths)
        ]
    ).float()
    row: dict = dict(context=context, batch=batch)
    row["sdpa_ms"] = do_bench(
        lambda: sdpa(q4, kt[:, :, :context], vt[:, :, :context]),
        warmup=25, rep=200, return_mode="median",
    )  # fmt: skip
    used = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    equal = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    for name, extra in (("varlen", {}), ("varlen_splits", {"num_splits": 0})):
        try:
            got = varlen(q, pk, pv, cum_q, cum_k, capacity, used, **extra).float()
            row[f"{name}_max_err"] = (got - want).abs().max().item()

            def call(extra=extra):
                return varlen(q, pk, pv, cum_q, cum_k, capacity, equal, **extra)

            row[f"{name}_ms"] = do_bench(call, warmup=25, rep=200, return_mode="median")
            row[f"{name}_graph_ms"] = do_bench(
                graphed(call), warmup=25, rep=200, return_mode="median"
            )
        except Exception as error:  # noqa: BLE001 - recorded, the probe goes on
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    print(schema)
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            rows.append(measure(context, batch))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, schema=schema)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
