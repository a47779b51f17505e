"""The evaluation harness on synthetic attention inputs and tiny random models (CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from test_hf import tiny_model  # noqa: E402

from multipole import MultipoleConfig  # noqa: E402
from multipole.eval import (  # noqa: E402
    AttentionInputs,
    EvalSettings,
    Run,
    attention_fidelity,
    generate,
    method_config,
    run_eval,
    teacher_forced,
)
from multipole.eval.harness import PARTIAL_FAR_FIELD_SHARE, runs_for, token_agreement  # noqa: E402
from multipole.synthetic import PlantedKV  # noqa: E402

SMALL_BASE = MultipoleConfig(sink_tokens=4, interval=32, block_size=256, backend="reference")


def planted_inputs(seed: int, layers: int = 2, n: int = 900) -> AttentionInputs:
    planted = PlantedKV(num_kv_heads=2, head_dim=32, num_centers=24, seed=seed)
    keys, values = planted.kv(layers, n)
    queries = planted.queries(layers * n, 4).view(layers, n, 8, 32).transpose(1, 2)
    return AttentionInputs(queries, keys, values, 32**-0.5, layers, rotary=None)


def test_fidelity_orders_methods_on_planted_structure(gen):
    """At equal bytes on clustered keys, both cluster lookups beat the window; dense is exact;
    every method reads about the bytes it was given. (Multipole vs centroid-only is not
    asserted: on this data, with appends, they are within 30% of each other either way.)"""
    inputs = planted_inputs(int(torch.randint(10**6, (1,), generator=gen)))
    settings = EvalSettings(base=SMALL_BASE, metadata_share=0.5)
    prefix, fraction = 860, 0.25
    results = {}
    for method in ("multipole", "centroid_only", "window", "dense"):
        config = method_config(method, fraction, prefix, 32, settings)
        results[method] = attention_fidelity(inputs, method, config, prefix)
    assert float(results["dense"].rel_error.max()) < 1e-5
    assert torch.allclose(results["dense"].mass, torch.ones(2))
    assert results["dense"].read_fraction == pytest.approx(1.0)
    error = {m: float(r.rel_error.mean()) for m, r in results.items()}
    assert max(error["multipole"], error["centroid_only"]) < 0.8 * error["window"], error
    for method in ("multipole", "centroid_only", "window"):
        assert results[method].read_fraction == pytest.approx(fraction, rel=0.15), method
        assert 0 < float(results[method].mass.min()) <= 1


def test_unreachable_fractions_are_skipped_not_faked():
    settings = EvalSettings(base=SMALL_BASE)
    assert method_config("window", 1 / 64, 500, 32, settings) is None  # sink + window > 1/64
    cfg = method_config("multipole", 1 / 4, 5000, 32, settings)
    assert cfg.centroid_ratio == 1 / 16 and cfg.token_budget > 0


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [
        ("multipole_2level", "levels", 2),
        ("multipole_partial", "far_field_share", PARTIAL_FAR_FIELD_SHARE),
    ],
)
def test_multipole_variants_read_their_fraction(gen, variant, field, value):
    """``multipole_2level`` (the hierarchy) and ``multipole_partial`` (a far field over the
    clusters of largest mass) run the multipole state with their config and still read about
    the bytes they were given (every centroid read counted), beating the window there."""
    inputs = planted_inputs(int(torch.randint(10**6, (1,), generator=gen)))
    settings = EvalSettings(base=SMALL_BASE)
    prefix, fraction = 860, 0.25
    config = method_config(variant, fraction, prefix, 32, settings)
    assert getattr(config, field) == value and config.token_budget > 0
    runs, _ = runs_for(dataclasses.replace(settings, methods=(variant,)), prefix, 32)
    assert [(r.label, r.method) for r in runs[-1:]] == [(f"{variant}@1/8", "multipole")]
    result = attention_fidelity(inputs, "multipole", config, prefix)
    assert result.read_fraction == pytest.approx(fraction, rel=0.15)
    window = attention_fidelity(
        inputs, "window", method_config("window", fraction, prefix, 32, settings), prefix
    )
    assert float(result.rel_error.mean()) < float(window.rel_error.mean())


def test_dense_method_through_the_cache_matches_stock_decoding(gen):
    model = tiny_model("qwen3", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (2, 330), generator=gen)
    full = dataclasses.replace(SMALL_BASE, token_budget=10**9)
    runs = [Run("dense_state", "dense", full), Run("multipole_full", "multipole", full)]
    partial = []
    results = teacher_forced(model, ids, 300, runs, checkpoint=partial.append, checkpoint_every=8)
    assert set(results) == {"dense", "dense_state", "multipole_full"}
    # a stopped run keeps its first part: the checkpoints are prefixes of the final results
    assert [p["multipole_full"].nll.shape[1] for p in partial] == [8, 16, 24]
    for p in partial:
        n = p["dense"].nll.shape[1]
        assert torch.equal(p["dense"].nll, results["dense"].nll[:, :n])
        assert len(p["multipole_full"].read_fraction) == n
    for label in ("dense_state", "multipole_full"):
        assert float(results[label].kl.max()) < 1e-5, label
        torch.testing.assert_close(results[label].nll, results["dense"].nll, atol=1e-4, rtol=1e-3)
    assert results["dense"].nll.shape == (2, 29)


def test_generation_from_one_prefill_is_each_methods_own_generation(gen):
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    small = dataclasses.replace(SMALL_BASE, token_budget=40)
    out = generate(model, ids, [Run("dense", None), Run("small", "multipole", small)], 12)
    model.set_attn_implementation("multipole")
    from multipole import MultipoleCache

    with torch.no_grad():
        alone = model.generate(
            ids, past_key_values=MultipoleCache(small), max_new_tokens=12, do_sample=False
        )
    assert out["small"][0] == alone[0, 300:].tolist()
    assert out["dense"][1] == 1.0 and out["small"][1] < 0.6


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert token_agreement([], [1, 2]) == 0.0


def test_run_eval_writes_every_output(gen, tmp_path):
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    windows = torch.randint(1, 128, (2, 400), generator=gen).tolist()
    settings = EvalSettings(
        tasks=("fidelity", "perplexity"),
        methods=("multipole", "window"),
        fractions=(1 / 4,),
        context=300,
        decode_tokens=24,
        fidelity_steps=12,
        base=SMALL_BASE,
    )
    summary = run_eval(model, None, settings, tmp_path, windows=windows, progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["tasks"].keys() == {"fidelity", "perplexity"}
    assert set(saved["tasks"]["perplexity"]) == {"dense", "multipole@1/4", "window@1/4"}
    assert saved["tasks"]["perplexity"]["dense"]["kl"] == 0.0
    assert saved["environment"]["command"] and saved["environment"]["torch"]
    for label in ("multipole@1/4", "window@1/4"):
        assert 0.2 < summary["tasks"]["fidelity"][label]["read_fraction"] < 0.3
        assert summary["tasks"]["perplexity"][label]["kl"] > 0
    assert (tmp_path / "metrics_vs_read_fraction.png").stat().st_size > 0


class _LengthTokenizer:
    """Chat template of a prompt of ``int(content)`` random tokens; every output reads '7'."""

    def __init__(self, gen):
        self.gen = gen

    def apply_chat_template(self, messages, **kwargs):
        length = int(messages[0]["content"])
        return {"input_ids": torch.randint(1, 128, (1, length), generator=self.gen)}

    def decode(self, tokens, skip_special_tokens=True):
        return "Answer: 7"


def test_gsm_runs_are_sized_for_each_prompt(gen, tmp_path, monkeypatch):
    """A GSM prompt is much shorter than ``settings.context``: budgets sized for the context
    would read everything. Each problem's runs read about the fraction at its own length."""
    from multipole import data

    problems = [data.ReasoningSample(str(n), "7", [{"role": "user", "content": str(n)}])
                for n in (260, 700)]  # fmt: skip
    monkeypatch.setattr(data, "gsm_tasks", lambda count, seed=0: problems[:count])
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    settings = EvalSettings(
        tasks=("gsm",), methods=("window",), fractions=(1 / 4,), context=4096,
        gsm_samples=2, gsm_new_tokens=8, base=SMALL_BASE,
    )  # fmt: skip
    summary = run_eval(model, _LengthTokenizer(gen), settings, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    window = [r for r in rows if r["run"] == "window@1/4"]
    assert [r["prompt_tokens"] for r in window] == [260, 700]
    for row in window:  # the recent window moves with the update interval: +-32 tokens
        assert row["read_fraction"] == pytest.approx(0.25, rel=0.25), row
    assert summary["tasks"]["gsm"]["dense"]["accuracy"] == 1.0
    assert summary["tasks"]["gsm"]["window@1/4"]["samples"] == 2
