"""The command line (info, demo, generate) on small settings."""

from __future__ import annotations

import json

import pytest
import torch

from multipole import MultipoleConfig
from multipole.cli import main
from multipole.demo import DemoSettings, format_table, run_demo


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "fused kernels" in out


def test_demo_compares_every_method_at_equal_bytes():
    settings = DemoSettings(
        context=1500,
        steps=40,
        num_kv_heads=2,
        num_q_heads=8,
        head_dim=32,
        read_fraction=0.3,
        device="cpu",
        config=MultipoleConfig(interval=32, block_size=256, sink_tokens=4),
    )
    report = run_demo(settings, progress=False)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense", "multipole", "centroid_only", "quest", "oracle_topk", "window"}
    assert rows["dense"]["rel_error_max"] == 0 and rows["dense"]["read_fraction"] == 1
    for name, row in rows.items():
        if name != "dense":
            assert 0.2 < row["read_fraction"] <= 0.31, (name, row)
    assert rows["multipole"]["rel_error_mean"] < rows["window"]["rel_error_mean"]
    assert report["online_updates"] >= 1
    assert "multipole" in format_table(report)


def test_demo_command_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    args = ["demo", "--synthetic", "--context", "900", "--steps", "4", "--kv-heads", "1"]
    args += ["--q-heads", "2"]
    args += ["--head-dim", "16", "--interval", "32", "--block-size", "256", "--quiet"]
    args += ["--read-fraction", "0.4", "--json", str(path)]
    assert main(args) == 0
    assert "rel. error" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["settings"]["context"] == 900 and len(report["results"]) == 6


# ---------------------------------------------------------------------------- multipole generate
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)
REPORT_KEYS = {
    "command", "utc", "model", "method", "config", "generation", "device", "dtype",
    "tensor_parallel", "versions", "text", "prompt_tokens", "new_tokens", "prefill_s",
    "first_step_s", "decode_s", "decode_tokens_per_s", "total_s", "read_fraction",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer (words w0..w125), saved like a hub
    model, with a chat template."""
    pytest.importorskip("transformers")
    from test_hf import tiny_model, word_tokenizer

    fast = word_tokenizer(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(126)], pad_token="[PAD]")
    fast.chat_template = CHAT_TEMPLATE
    model = tiny_model("llama", 0, bos_token_id=None, eos_token_id=None, pad_token_id=1)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _generate(model_dir, prompt_file, json_path, *options):
    args = ["generate", "--model", str(model_dir), "--prompt-file", str(prompt_file)]
    args += ["--max-new-tokens", "24", "--interval", "32", "--no-progress"]
    args += ["--json", str(json_path)]
    assert main([*args, *options]) == 0
    return json.loads(json_path.read_text())


def test_generate_with_a_full_budget_writes_the_dense_text(tiny_model_dir, tmp_path, gen, capsys):
    """300 prompt tokens, 24 new ones with online updates every 32 tokens: a budget covering
    the context generates exactly what stock attention does; a small one reads less."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i}" for i in torch.randint(126, (300,), generator=gen)))
    full = _generate(tiny_model_dir, prompt, tmp_path / "full.json", "--budget", "100000")
    streamed = capsys.readouterr().out
    dense = _generate(tiny_model_dir, prompt, tmp_path / "dense.json", "--dense")
    small = _generate(tiny_model_dir, prompt, tmp_path / "small.json", "--budget", "0.05")

    assert full["text"] == dense["text"] and full["new_tokens"] == dense["new_tokens"] == 24
    assert full["text"] in streamed
    assert set(full) == set(dense) == REPORT_KEYS
    assert full["prompt_tokens"] == 300 + 3 and full["generation"]["chat_template"]
    assert full["method"] == "multipole" and full["config"]["token_budget"] == 100000
    assert dense["method"] == "dense" and dense["config"] is None and dense["read_fraction"] == 1
    assert full["read_fraction"] > 1  # everything, plus the centroids scored
    assert small["read_fraction"] < 0.8 and small["config"]["token_budget"] == 0.05
    assert full["command"].startswith("multipole generate --model")
    for report in (full, dense, small):
        assert report["prefill_s"] > 0 and report["decode_tokens_per_s"] > 0
        assert report["device"] and report["versions"]["torch"] == torch.__version__


def test_generate_raw_skips_the_chat_template(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w5 w6 w7 w8")
    raw = _generate(tiny_model_dir, prompt, tmp_path / "raw.json", "--raw", "--dense")
    assert raw["prompt_tokens"] == 4 and not raw["generation"]["chat_template"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--prompt", "w1"], "--model"),
        (["--model", "m"], "one of the arguments --prompt --prompt-file is required"),
        (["--model", "m", "--prompt", "w1", "--prompt-file", "f"], "not allowed with"),
        (["--model", "m", "--prompt", "w1", "--budget", "1.5"], "float in (0, 1)"),
        (["--model", "m", "--prompt", "w1", "--budget", "lots"], "--budget: expected an int"),
        (["--model", "m", "--prompt", "w1", "--method", "topk"], "invalid choice: 'topk'"),
        (["--model", "m", "--prompt", "w1", "--dense", "--method", "quest"], "drop --method"),
        (["--model", "m", "--prompt", "w1", "--temperature", "0.5"], "add --sample"),
        (["--model", "m", "--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", "m", "--prompt", "w1", "--interval", "100"], "--block-size: expected a"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_generate_rejects_bad_arguments_before_loading(capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: multipole generate" in err


def test_generate_defaults_are_the_config_defaults():
    from multipole.cli import build_parser
    from multipole.generate import check_args

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "w1"])
    assert check_args(args) == MultipoleConfig()
