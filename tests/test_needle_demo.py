"""The README's demo (a fact hidden in essays, asked back) on a tiny random model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from multipole.needle_demo import (  # noqa: E402
    NeedleDemoSettings,
    format_needle_table,
    run_needle_demo,
)


@pytest.fixture
def tiny_model_dir(tmp_path, gen):
    """A tiny Llama with a word-level tokenizer over the essays' most common words."""
    from test_hf import word_tokenizer

    from multipole import data

    try:
        text = " ".join(data.essays(progress=False)[:5])
    except Exception as error:  # offline: the essays cannot be fetched
        pytest.skip(f"essays unavailable: {error}")
    words = ["[UNK]", "[PAD]"] + sorted(set(text.split()))[:2000]
    tokenizer = word_tokenizer(words, pad_token="[PAD]", eos_token="[PAD]")
    config = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    path = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_answers_with_every_method_from_one_prefill(tiny_model_dir):
    settings = NeedleDemoSettings(
        model=str(tiny_model_dir), context=1500, read_fraction=1 / 4, max_new_tokens=6
    )
    report = run_needle_demo(settings)
    dense, *sparse = report["results"]
    assert [r["method"] for r in report["results"]] == ["dense", "multipole", "multipole_partial"]
    assert dense["read_fraction"] == 1.0 and dense["kl_to_dense"] == 0.0
    for row in sparse:
        assert 0.15 < row["read_fraction"] < 0.3  # the bytes it was given, centroids counted
        assert row["kl_to_dense"] >= 0 and len(row["tokens"]) == 6
    assert report["settings"]["configs"]["multipole_partial"]["far_field_share"] < 1
    assert 1400 < report["prompt_tokens"] <= 1500 and report["expected"]
    table = format_needle_table(report)
    rows = [line.split()[0] for line in table.splitlines()[1:4]]
    assert rows == ["dense", "multipole", "multipole_partial"]


def test_demo_and_eval_commands(tiny_model_dir, tmp_path, capsys):
    from multipole.cli import main

    report_path = tmp_path / "demo.json"
    args = ["demo", "--model", str(tiny_model_dir), "--context", "1200", "--max-new-tokens", "4"]
    assert main([*args, "--read-fraction", "0.25", "--json", str(report_path)]) == 0
    assert "magic number" in capsys.readouterr().out and report_path.stat().st_size > 0

    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "fidelity,perplexity"]
    args += ["--methods", "multipole,window", "--fractions", "1/4", "--context", "300"]
    args += ["--decode-tokens", "16", "--fidelity-steps", "8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "multipole@1/4" in printed and (out / "summary.json").exists()
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "fidelity,nonsense"])
