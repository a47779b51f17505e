"""Tensor parallelism on CPU: two gloo ranks through transformers' TP (``DistributedConfig``).

Each rank holds half of the KV heads; Multipole Attention clusters and attends its own heads
with no collectives, and seeds k-means per global KV head, so TP=2 must generate exactly what
one process does.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import tiny_model  # noqa: E402

import multipole  # noqa: E402
import multipole.hf  # noqa: E402
from multipole import MultipoleConfig  # noqa: E402

SMALL = MultipoleConfig(interval=32, block_size=128, sink_tokens=4, token_budget=48)
CONFIGS = {"small": SMALL, "full": dataclasses.replace(SMALL, token_budget=10**9)}
MAX_NEW_TOKENS = 24
FAMILIES = ("qwen3", "llama")


def prompt() -> torch.Tensor:
    return torch.randint(1, 128, (2, 300), generator=torch.Generator().manual_seed(7))


def save_tiny_model(family: str, path: Path, seed: int) -> transformers.PreTrainedModel:
    model = tiny_model(family, seed, num_attention_heads=8, num_key_value_heads=4)
    model.save_pretrained(path)
    return model


def test_tp2_generates_what_one_process_does(gen, tmp_path):
    seed = int(torch.randint(1000, (1,), generator=gen))
    models = {family: save_tiny_model(family, tmp_path / family, seed) for family in FAMILIES}
    out = tmp_path / "tp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += [str(Path(__file__).with_name("tp_worker.py")), str(out)]
    command += [str(tmp_path / family) for family in FAMILIES]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tp = json.loads(out.read_text())

    for family, model in models.items():
        model.set_attn_implementation("sdpa")
        kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            stock = model.generate(prompt(), **kwargs)
            model.set_attn_implementation("multipole")
            small = model.generate(
                prompt(), past_key_values=multipole.MultipoleCache(SMALL), **kwargs
            )
        assert tp[f"{tmp_path / family}:small"] == small.tolist(), family
        assert tp[f"{tmp_path / family}:full"] == stock.tolist(), family


def test_a_sharded_layer_without_distributed_fails_clearly():
    class Attention(torch.nn.Module):
        config = transformers.Qwen3Config(num_attention_heads=8, num_key_value_heads=4)

    with pytest.raises(ValueError, match="holds 2 of the model's 4 KV heads"):
        multipole.hf._first_kv_head(Attention(), 2)
    assert multipole.hf._first_kv_head(Attention(), 4) == 0
