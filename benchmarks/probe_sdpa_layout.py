"""Does SDPA's decode read a strided (preallocated, sliced) KV cache as fast as a contiguous
one? 128K tokens, 32 q / 8 kv heads, d=128, bf16, batches 1 and 16 (GPU)."""

import torch
import torch.nn.functional as F
from triton.testing import do_bench

for batch in (1, 16):
    n, cap = 131072, 131072 + 256
    buf_k = torch.randn(batch, 8, cap, 128, device="cuda", dtype=torch.bfloat16)
    buf_v = torch.randn_like(buf_k)
    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    sliced = (buf_k[:, :, :n], buf_v[:, :, :n])
    dense = (sliced[0].contiguous(), sliced[1].contiguous())
    for name, (k, v) in (("contiguous", dense), ("sliced", sliced)):
        ms = do_bench(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            warmup=25,
            rep=100,
            return_mode="median",
        )
        print(f"batch {batch} {name:>10}: {ms:.3f} ms")
    del buf_k, buf_v, sliced, dense
