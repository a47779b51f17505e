"""The end-to-end decode benchmark, on the tiny architecture and the CPU."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytest.importorskip("transformers")

from multipole import MultipoleConfig  # noqa: E402
from multipole.bench import decode  # noqa: E402
from multipole.cli import main  # noqa: E402

TINY = ["--arch", "tiny", "--context", "512", "--batch", "1,2", "--steps", "4", "--warmup", "1"]


def run(tmp_path, *options: str) -> dict:
    out = tmp_path / "decode.json"
    args = ["bench", "decode", *TINY, "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*args, *options]) == 0
    return json.loads(out.read_text())


def test_tiny_arch_gives_a_checked_row_per_context_batch_and_method(tmp_path, capsys):
    report = run(tmp_path)
    rows = report["rows"]
    expected = {(512, b, m) for b in (1, 2) for m in ("dense", "multipole")}
    assert sorted((r["context"], r["batch"], r["method"]) for r in rows) == sorted(expected)
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["mean_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        assert r["layers_run"] == r["layers_full"] == 2 and r["steps"] == 4
        if r["method"] == "dense":
            assert r["read_fraction"] == 1 and r["speedup_vs_dense"] == 1
            assert r["clustering_ms"] is None
        else:
            # 512 tokens: sink + recent window are half the cache, 5% of the rest is exact
            assert 0.4 < r["read_fraction"] < 0.7 and r["budget"] == 0.05
            assert r["clustering_ms"] > 0
    check = report["meta"]["check"]
    assert check["passed"] and check["max_rel_err"] < 1e-4 and check["budget"] >= 512
    meta = report["meta"]
    assert meta["command"].startswith("multipole bench decode --arch tiny")
    assert {"gpu", "device", "versions", "git_sha", "utc", "dtype", "config"} <= set(meta)
    out = capsys.readouterr().out
    assert "x dense" in out and out.count("multipole  ") == 2


def test_check_fails_when_the_methods_see_different_caches(tmp_path, monkeypatch):
    """The check compares logits of the same inputs: let every call draw other keys and values
    and it must refuse to time anything."""
    calls = itertools.count()
    original = decode.synthetic_kv

    def drifting(*args, seed, **kwargs):
        return original(*args, seed=seed + 1000 * next(calls), **kwargs)

    monkeypatch.setattr(decode, "synthetic_kv", drifting)
    with pytest.raises(SystemExit, match="check failed"):
        run(tmp_path)
    report = json.loads((tmp_path / "decode.json").read_text())
    assert not report["meta"]["check"]["passed"] and report["rows"] == []


def test_synthetic_caches_repeat_and_have_cluster_structure():
    shape = decode.Shape.of(decode.load_arch("tiny"), torch.float32)
    kw = dict(dtype=torch.float32, device="cpu", seed=3)
    k, v = decode.synthetic_kv(shape, 2, 700, 710, **kw)
    k2, v2 = decode.synthetic_kv(shape, 2, 700, 710, **kw)
    assert torch.equal(k, k2) and torch.equal(v, v2) and k.shape == (2, 2, 710, 16)
    assert k[:, :, 700:].abs().sum() == 0  # room for the decoded tokens
    tk, tv = decode.synthetic_kv(shape, 2, 700, 710, **kw, token_major=True)
    assert torch.equal(tk, k.transpose(1, 2)) and torch.equal(tv, v.transpose(1, 2))

    def close_keys(x):  # mean number of keys within cosine 0.8 of a key (itself included)
        unit = torch.nn.functional.normalize(x, dim=-1)
        return float((unit @ unit.T > 0.8).float().sum(-1).mean())

    # keys share one of 256 directions per head: 700 keys have ~2.7 partners each; random
    # keys almost none
    assert close_keys(k[0, 0, :700]) > 3 and close_keys(torch.randn_like(k[0, 0, :700])) < 1.5


def test_memory_plan_truncates_the_depth_to_what_fits():
    shape = decode.Shape.of(decode.load_arch("qwen3-8b"), torch.bfloat16)
    assert shape.fixed_bytes == 2 * 151936 * 4096 * 2 + 4096 * 2  # embedding, LM head, norm
    assert shape.layers_full == 36 and shape.num_kv_heads == 8 and shape.head_dim == 128
    cfg = MultipoleConfig(token_budget=0.05)
    free = 80 * 2**30
    fits = {
        (n, b): decode.layers_that_fit(shape, b, n, 2, cfg, free)
        for n in (32768, 131072)
        for b in (1, 16)
    }
    assert fits[32768, 1] == 36  # the whole model
    assert 1 <= fits[131072, 16] < fits[32768, 16] < 36
    kv = shape.kv_bytes(16, 131072, 2)  # 8.6 GB per layer
    used = shape.fixed_bytes + fits[131072, 16] * (shape.layer_bytes + kv)
    assert used < 0.85 * free
    assert decode.layers_that_fit(shape, 16, 131072, 2, cfg, 2**30) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--arch", "gpt-9"], "invalid choice: 'gpt-9'"),
        (["--context", "0"], "expected positive ints"),
        (["--batch", "1,x"], "expected positive ints"),
        (["--budget", "2.5"], "float in (0, 1)"),
        (["--steps", "0"], "--steps: expected an int >= 1"),
    ],
)
def test_bad_arguments_fail_before_running(capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        decode.main(options)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_configuration_out_of_memory_runs_again_with_fewer_layers(tmp_path, monkeypatch):
    original = decode.run_method

    def tight(method, model, s, context, batch, layers, config=None):
        if batch == 2 and layers > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(method, model, s, context, batch, layers, config)

    monkeypatch.setattr(decode, "run_method", tight)
    report = run(tmp_path)
    assert sorted({(r["batch"], r["layers_run"]) for r in report["rows"]}) == [(1, 2), (2, 1)]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        dict(context=n, batch=b, method=m, tokens_per_s=t, speedup_vs_dense=x, layers_run=4)
        for n in (32768, 65536)
        for b in (1, 4)
        for m, t, x in (("dense", 100.0 / n, 1.0), ("multipole", 300.0 / n, 3.0))
    ]
    meta = dict(arch="qwen3-8b", gpu=None, config=dict(token_budget=0.05))
    decode.plot(dict(meta=meta, rows=rows), str(tmp_path / "decode.png"))
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_whole_step_graphs_on_cuda_replay_both_methods(tmp_path):
    """On CUDA (default ``--graphs step``) the check passes and both methods' steps replay as
    whole-step graphs, the dense one through FlashAttention's variable-length entry."""
    out = tmp_path / "decode.json"
    args = ["bench", "decode", *TINY, "--steps", "40", "--quiet", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["check"]["passed"]
    for r in report["rows"]:
        g = r["graph_steps"]
        assert g["replays"] >= 30 and g["captures"] >= 1, r
        assert g["replays"] + g["captures"] + g["eager"] == 41, r


def test_dense_layer_writes_each_row_at_its_length_and_attends_its_prefix(gen):
    """The dense baseline's layer on the CPU: a step writes the token at each row's (device)
    length and attention equals SDPA over the valid prefix."""
    b, cap, h, d, n = 2, 12, 2, 8, 9
    keys, values = (torch.randn(b, cap, h, d, generator=gen) for _ in range(2))
    layer = decode.DenseLayer(keys.clone(), values.clone(), n)
    new_k, new_v = (torch.randn(b, h, 1, d, generator=gen) for _ in range(2))
    layer.update(new_k, new_v)
    assert layer.get_seq_length() == n + 1 and layer.lengths.tolist() == [n + 1] * b
    assert torch.equal(layer.buffers[0][:, n], new_k[:, :, 0])
    assert torch.equal(layer.buffers[1][:, :n], values[:, :n])
    q = torch.randn(b, 2 * h, 1, d, generator=gen)
    out, _ = decode._dense_decode_attention(None, q, new_k, new_v, None, scaling=0.3)
    k, v = (t[:, : n + 1].transpose(1, 2) for t in layer.buffers)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_git_revision_marks_a_checkout_with_changes(tmp_path):
    """Reports name the commit that made them, ``+dirty`` when tracked files changed, and
    ``unknown`` outside a checkout."""
    import shutil
    import subprocess

    from multipole.bench import git_revision

    if shutil.which("git") is None:
        pytest.skip("needs the git executable on PATH: git_revision asks git for the commit")
    assert git_revision(tmp_path) == "unknown"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    sha = git("rev-parse", "--short", "HEAD")
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_revision(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == f"{sha}+dirty"
