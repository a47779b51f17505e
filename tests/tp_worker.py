"""Run by tests/test_tp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): greedy generation
with tensor parallelism through transformers, written by rank 0 as JSON.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py OUT MODEL_DIR...
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

# the settings test_tp.py compares against, shared by both sides
from test_tp import CONFIGS, MAX_NEW_TOKENS, prompt

import multipole.hf  # noqa: F401  (registers attn_implementation="multipole")
from multipole import MultipoleCache


def main(out: str, model_dirs: list[str]) -> None:
    results = {}
    for model_dir in model_dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir,
            attn_implementation="multipole",
            distributed_config=transformers.DistributedConfig(
                tp_size=int(os.environ["WORLD_SIZE"])
            ),
        )
        for name, config in CONFIGS.items():
            with torch.no_grad():
                ids = model.generate(
                    prompt(),
                    past_key_values=MultipoleCache(config),
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=0,
                )
            results[f"{model_dir}:{name}"] = ids.tolist()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    dist.destroy_process_group()
