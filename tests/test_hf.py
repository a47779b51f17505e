"""transformers integration on tiny random models of each supported family (no download)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import multipole  # noqa: E402
import multipole.baselines  # noqa: E402
import multipole.hf  # noqa: E402
from multipole import MultipoleConfig  # noqa: E402
from multipole.graphs import GraphedDecoder  # noqa: E402

SMALL = MultipoleConfig(interval=32, block_size=128, sink_tokens=4, token_budget=48)
FULL = dataclasses.replace(SMALL, token_budget=10**9)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny_model(family: str, seed: int, **overrides):
    config_cls, model_cls = FAMILIES[family]
    shape = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    config = config_cls(**{**shape, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def word_tokenizer(words: list[str], **kwargs):
    """A word-level fast tokenizer over ``words`` (split on whitespace; ``[UNK]`` for others)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", **kwargs
    )


def generate(model, ids, cache=None, attention_mask=None, **kwargs):
    model.set_attn_implementation("sdpa" if cache is None else "multipole")
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_generates_exactly_what_stock_transformers_does(gen, family):
    model = tiny_model(family, int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    cache = multipole.MultipoleCache(FULL)
    ours = generate(model, ids, cache, max_new_tokens=40)
    assert torch.equal(ours, generate(model, ids, max_new_tokens=40))
    state = cache.layers[0].state
    assert state is not None and state.clustered_len[0] > 256  # online updates ran


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_beam_search_with_full_budget_matches_stock_transformers(gen, device):
    """Beam search reorders the cache every step (``reorder_cache``), across online updates;
    on CUDA through the fused kernels and the per-layer CUDA graphs, rewritten in place."""
    model = tiny_model("qwen2", int(torch.randint(1000, (1,), generator=gen))).to(device)
    ids = torch.randint(1, 128, (2, 300), generator=gen).to(device)
    kwargs = dict(max_new_tokens=40, num_beams=3, num_return_sequences=2)
    cache = multipole.MultipoleCache(FULL)
    ours = generate(model, ids, cache, **kwargs)
    assert torch.equal(ours, generate(model, ids, **kwargs))
    assert cache.layers[0].state.clustered_len[0] > 256  # online updates ran


def test_assisted_generation_with_full_budget_matches_greedy(gen):
    """Speculative decoding crops the rejected draft tokens (``crop``) and verifies drafts in
    multi-token chunks; the output is still greedy's."""
    seed = int(torch.randint(1000, (1,), generator=gen))
    model = tiny_model("llama", seed)
    assistant = tiny_model("llama", seed + 1, num_hidden_layers=1)
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    ours = generate(
        model, ids, multipole.MultipoleCache(FULL), max_new_tokens=60, assistant_model=assistant
    )
    assert torch.equal(ours, generate(model, ids, max_new_tokens=60))


def test_crop_after_decoding_drops_the_newest_tokens_or_says_why(gen):
    model = tiny_model("llama", 0)
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    cache = multipole.MultipoleCache(SMALL)
    generate(model, ids, cache, max_new_tokens=5)
    length = cache.get_seq_length()
    cache.crop(-3)
    assert cache.get_seq_length() == length - 3
    assert cache.layers[0].state.seq_lens == [length - 3]
    with pytest.raises(NotImplementedError, match="fewer draft tokens than config.interval"):
        cache.crop(-200)
    with pytest.raises(NotImplementedError, match="legacy"):
        cache.crop(10)


def test_small_budget_logits_stay_close_to_dense(gen):
    """First decode step, ~350-token middle region: logits within 20% of dense at budget 48 on
    a random model (near-uniform attention, the hard case for any sparse method), closer at
    budget 200, and closer than sink + recent window alone. (Later steps feed back tokens that
    may differ, so they are not compared.)"""
    model = tiny_model("qwen3", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 400), generator=gen)
    kwargs = dict(max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    dense = generate(model, ids, **kwargs)
    configs = {
        "budget48": SMALL,
        "budget200": dataclasses.replace(SMALL, token_budget=200),
        "window": dataclasses.replace(SMALL, token_budget=0, replacement=False),
    }
    errors = {}
    for name, cfg in configs.items():
        ours = generate(model, ids, multipole.MultipoleCache(cfg), **kwargs)
        # logits[0] come from the prompt pass, which is exact
        assert float((ours.logits[0] - dense.logits[0]).abs().max()) < 1e-4
        errors[name] = float((ours.logits[1] - dense.logits[1]).norm() / dense.logits[1].norm())
    assert errors["budget48"] < 0.2, errors
    assert errors["budget200"] < errors["budget48"] < errors["window"], errors


def test_left_padded_batch_equals_sequences_run_alone(gen):
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    long = torch.randint(1, 128, (1, 330), generator=gen)
    short = torch.randint(1, 128, (1, 270), generator=gen)
    batch = torch.zeros(2, 330, dtype=torch.long)
    mask = torch.zeros(2, 330, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, 60:], mask[1, 60:] = short[0], 1
    together = generate(model, batch, multipole.MultipoleCache(SMALL), mask, max_new_tokens=30)
    alone_long = generate(model, long, multipole.MultipoleCache(SMALL), max_new_tokens=30)
    alone_short = generate(model, short, multipole.MultipoleCache(SMALL), max_new_tokens=30)
    assert torch.equal(together[0, 330:], alone_long[0, 330:])
    assert torch.equal(together[1, 330:], alone_short[0, 270:])


def test_per_layer_configs_keep_dense_layers_dense(gen):
    model = tiny_model("llama", 0)
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    cache = multipole.MultipoleCache([None, SMALL])
    generate(model, ids, cache, max_new_tokens=3)
    assert not isinstance(cache.layers[0], multipole.hf.MultipoleLayer)
    assert cache.layers[1].state is not None


def test_cache_keyword_is_the_name_the_installed_transformers_takes(gen):
    """``cache`` where transformers renamed ``past_key_values`` (no deprecation warning for
    the name chosen), through wrappers; generation through it is stock generation."""
    import inspect
    import warnings

    from transformers.generation import utils

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class Wrapped(torch.nn.Module):  # a forward of **kwargs only: the library decides
        def forward(self, *args, **kwargs): ...

    assert multipole.hf.cache_keyword(Old()) == "past_key_values"
    renamed = "cache" in getattr(utils, "ALL_CACHE_NAMES", ())
    assert multipole.hf.cache_keyword(Wrapped()) == ("cache" if renamed else "past_key_values")
    model = tiny_model("qwen2", 0)
    name = multipole.hf.cache_keyword(model)
    assert name in inspect.signature(model.forward).parameters
    assert multipole.hf.cache_keyword(torch.compile(model)) == name  # (compiles nothing)
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    model.set_attn_implementation("multipole")
    cache = multipole.MultipoleCache(FULL)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        ours = model.generate(ids, **{name: cache}, max_new_tokens=8, do_sample=False)
    assert cache.layers[0].state is not None  # the cache was used
    assert torch.equal(ours, generate(model, ids, max_new_tokens=8))


def test_misuse_fails_with_a_clear_message(gen):
    model = tiny_model("llama", 0)
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='multipole'"), torch.no_grad():
        model.generate(ids, past_key_values=multipole.MultipoleCache(SMALL), max_new_tokens=3)
    with pytest.raises(TypeError, match="config: expected a MultipoleConfig"):
        multipole.MultipoleCache({"token_budget": 3})
    with pytest.raises(TypeError, match=r"config\[1\]"):
        multipole.MultipoleCache([SMALL, 3])
    cache = multipole.MultipoleCache([SMALL])
    with pytest.raises(ValueError, match="per-layer configs"):
        generate(model, ids, cache, max_new_tokens=2)


def test_chunked_prefill_gives_the_same_generation(gen):
    model = tiny_model("qwen2", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    whole = generate(model, ids, multipole.MultipoleCache(SMALL), max_new_tokens=20)
    chunked = generate(
        model, ids, multipole.MultipoleCache(SMALL), max_new_tokens=20, prefill_chunk_size=64
    )
    assert torch.equal(whole, chunked)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_kernels_inside_generate_on_cuda(gen, family):
    """On CUDA the decode steps run the fused kernels; a full budget still generates exactly
    what stock transformers does, and a small one stays close for the first step."""
    model = tiny_model(family, int(torch.randint(1000, (1,), generator=gen))).cuda()
    ids = torch.randint(1, 128, (2, 300), generator=gen).cuda()
    kwargs = dict(max_new_tokens=40, output_logits=True, return_dict_in_generate=True)
    dense = generate(model, ids, **kwargs)
    cache = multipole.MultipoleCache(dataclasses.replace(FULL, backend="triton"))
    ours = generate(model, ids, cache, **kwargs)
    assert torch.equal(ours.sequences, dense.sequences)
    assert cache.layers[0].state.clustered_len[0] > 256
    small = generate(model, ids, multipole.MultipoleCache(SMALL), **kwargs)
    err = float((small.logits[1] - dense.logits[1]).norm() / dense.logits[1].norm())
    assert err < 0.2


POSITION_FREE = dataclasses.replace(SMALL, position_free_keys=True, lookup_position=64)


@pytest.mark.parametrize(
    "rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0}], ids=str
)
def test_rotary_moves_vectors_between_positions_like_the_models_own_rope(gen, rope):
    model = tiny_model("llama", 0, rope_parameters={"rope_theta": 500.0, **rope})
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 5, 16, generator=gen, dtype=torch.float64).float()
    positions = torch.randint(0, 4000, (2, 5), generator=gen)

    def rope_at(p):  # the model's own rotation of x at positions p [2, 5]
        cos, sin = model.model.rotary_emb(x, p)
        return transformers.models.llama.modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)[0]

    # the model computes its angles in float32: ~4000 * 6e-8 rad off at these positions
    rotary = multipole.hf.Rotary.of(attention, 16, x.device)
    torch.testing.assert_close(rotary.rotate(rope_at(positions), -positions), x, atol=1e-3, rtol=0)
    moved = rotary.rotate(rope_at(positions), torch.full((1, 1), 77))
    torch.testing.assert_close(moved, rope_at(positions + 77), atol=1e-3, rtol=0)


def test_position_free_keys_are_the_keys_before_rope_through_updates(gen):
    """Keys before RoPE come from a hook on k_proj; the state's clustering keys must equal
    them for every token, prompt and generated (so positions are right across updates), and
    the lookup query must be the query before RoPE rotated to lookup_position."""
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 150), generator=gen)
    attention = model.model.layers[1].self_attn
    pre_rope_keys, pre_rope_queries, lookup_queries = [], [], []
    attention.k_proj.register_forward_hook(lambda m, i, o: pre_rope_keys.append(o))
    attention.q_proj.register_forward_hook(lambda m, i, o: pre_rope_queries.append(o))
    cache = multipole.MultipoleCache(POSITION_FREE)
    generate(model, ids, cache, max_new_tokens=90)  # 150 + 90 tokens: online updates at 32
    state = cache.layers[1].state
    original_attend = state.attend
    state.attend = lambda q, **kw: lookup_queries.append(kw["lookup_q"]) or original_attend(q, **kw)

    keys = torch.cat(pre_rope_keys, dim=1).view(1, -1, 2, 16).transpose(1, 2)  # [1, 2, N, 16]
    n = state.seq_lens[0]
    torch.testing.assert_close(state.cluster_keys[:, :, :n], keys[:, :, :n], atol=1e-4, rtol=0)
    assert state.clustered_len[0] > 150 - 2 * 32  # updates ran on generated tokens

    # one more step: its lookup query is RoPE(query before RoPE, lookup_position)
    step = torch.randint(1, 128, (1, 1), generator=gen)
    with torch.no_grad():
        model(step, past_key_values=cache, position_ids=torch.tensor([[n]]))
    q = pre_rope_queries[-1].view(1, 1, 4, 16).transpose(1, 2)  # [1, 4, 1, 16]
    cos, sin = model.model.rotary_emb(q, torch.tensor([[POSITION_FREE.lookup_position]]))
    expected = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)[0]
    torch.testing.assert_close(lookup_queries[-1], expected[:, :, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_position_free_full_budget_generates_exactly_what_stock_does(gen, family):
    model = tiny_model(family, int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (2, 260), generator=gen)
    cfg = dataclasses.replace(POSITION_FREE, token_budget=10**9)
    ours = generate(model, ids, multipole.MultipoleCache(cfg), max_new_tokens=40)
    assert torch.equal(ours, generate(model, ids, max_new_tokens=40))


@pytest.mark.parametrize("method", ["quest", "oracle_topk", "centroid_only", "window", "dense"])
def test_every_method_runs_through_the_cache(gen, method):
    """A budget covering the middle region makes every method exact."""
    model = tiny_model("qwen2", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    cache = multipole.MultipoleCache(FULL, method=method)
    ours = generate(model, ids, cache, max_new_tokens=20)
    expected = generate(model, ids, max_new_tokens=20)
    assert isinstance(cache.layers[0].state, multipole.baselines.METHODS[method])
    assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="method: expected one of"):
        multipole.MultipoleCache(SMALL, method="topk")


def test_a_stock_cache_after_a_multipole_run_gets_stock_attention(gen):
    """The 'multipole' attention function must not pick up the last MultipoleCache when a
    later call runs with another cache (or none)."""
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    ids = torch.randint(1, 128, (1, 300), generator=gen)
    other = torch.randint(1, 128, (1, 200), generator=gen)
    generate(model, other, multipole.MultipoleCache(SMALL), max_new_tokens=5)
    with torch.no_grad():  # still attn_implementation="multipole", with a DynamicCache
        after = model.generate(
            ids, past_key_values=transformers.DynamicCache(), max_new_tokens=20, do_sample=False
        )
    assert torch.equal(after, generate(model, ids, max_new_tokens=20))


def test_filling_a_cache_outside_a_forward_does_not_capture_the_next_one(gen):
    """Filling a MultipoleCache with update() (as an evaluation does from a dense prefill) must
    not make the next decode step through another cache attend to it."""
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    model.set_attn_implementation("multipole")
    ids = torch.randint(1, 128, (1, 301), generator=gen)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        dense = transformers.DynamicCache()
        model(ids[:, :300], past_key_values=dense)
        filled = multipole.MultipoleCache(SMALL)
        for i, layer in enumerate(dense.layers):
            filled.update(torch.randn_like(layer.keys), torch.randn_like(layer.values), i)
        step = model(ids[:, 300:], past_key_values=dense).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-4)
    assert all(layer.state is None for layer in filled.layers)


def _decoder_twins(gen, cfg, device):
    """A tiny Qwen3 with two MultipoleCaches after the same 300-token prompt: a graphed
    decoder over the first, an eager one over the second, and the first tokens to feed."""
    model = tiny_model("qwen3", int(torch.randint(1000, (1,), generator=gen))).to(device)
    ids = torch.randint(1, 128, (2, 300), generator=gen).to(device)
    model.set_attn_implementation("multipole")
    caches = [multipole.MultipoleCache(cfg, cuda_graphs=False) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            prompt_logits = model(ids, past_key_values=cache, use_cache=True).logits
    graphed = GraphedDecoder(model, caches[0])
    eager = GraphedDecoder(model, caches[1], enabled=False)
    return caches, graphed, eager, prompt_logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.gpu
@pytest.mark.parametrize("position_free", [False, True], ids=["cached-keys", "position-free"])
def test_whole_step_graph_decodes_like_eager_steps_on_cuda(gen, position_free):
    """GraphedDecoder: a tiny model's decode steps replayed as one CUDA graph give the logits,
    lengths and stats of eager steps on a twin cache, across three online updates (run before
    a replay: no capture for them)."""
    cfg = dataclasses.replace(
        SMALL, backend="triton", position_free_keys=position_free, lookup_position=64
    )
    caches, graphed, eager, tokens = _decoder_twins(gen, cfg, "cuda")
    steps = 3 * cfg.interval + 5
    for i in range(steps):
        positions = torch.full((2, 1), 300 + i, device="cuda")
        ours = graphed(tokens, positions).clone()
        ref = eager(tokens, positions)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        tokens = ref.argmax(-1, keepdim=True)
    assert graphed.failure is None, graphed.failure
    assert graphed.replays + graphed.captures + graphed.eager_steps == steps
    assert graphed.captures <= 2 and graphed.replays >= steps - 5, graphed.replays
    assert eager.replays == eager.captures == 0
    for ours, ref in zip(caches[0].layers, caches[1].layers, strict=True):
        assert ours.state.seq_lens == ref.state.seq_lens == [300 + steps] * 2
        assert ours.state.clustered_len == ref.state.clustered_len
        assert ours.state._seq_lens_device.tolist() == ours.state.seq_lens
        assert ours.state.stats() == ref.state.stats()
        assert ours.get_seq_length() == ref.get_seq_length() == 300 + steps


class _EmulatedDecoderGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` under :class:`GraphedDecoder` on the CPU: a
    capture keeps the step's host effects and undoes its device effects (every layer's cache
    write and device lengths), as a real capture runs nothing on the device; a replay redoes
    the device effects only, through the model, into the captured logits and read counts."""

    FIELDS = ("tokens_exact", "clusters_selected", "centroids_scored", "metadata_bytes")

    def __init__(self, decoder: GraphedDecoder) -> None:
        self.decoder = decoder

    def _states(self):
        return [layer.state for layer in self.decoder.cache.layers]

    def capture_begin(self, pool=None, capture_error_mode="global"):
        stores = [(s._keys, s._values, s._cluster_keys, s._seq_lens_device) for s in self._states()]
        self.saved = [(t, t.clone()) for group in stores for t in group if t is not None]
        self.baked = [(id(s._keys), id(s._fused), s.config) for s in self._states()]

    def capture_end(self):
        for t, saved in self.saved:
            t.copy_(saved)
        self.reads = [s._reads for s in self._states()]

    def replay(self):
        states = self._states()
        baked = [(id(s._keys), id(s._fused), s.config) for s in states]
        assert baked == self.baked, "replayed a stale graph"
        layers = self.decoder.cache.layers
        assert all(layer.graph_free_steps() > 0 for layer in layers), "replayed into an update"
        host = [layer.graph_snapshot() for layer in layers]
        logits = self.decoder._forward(*self.decoder._static)
        self.decoder._out.copy_(logits)
        for s, reads in zip(states, self.reads, strict=True):
            for name in self.FIELDS:
                getattr(reads, name).copy_(getattr(s._reads, name))
        for layer, snapshot in zip(layers, host, strict=True):
            layer.graph_restore(snapshot)


@pytest.mark.parametrize("position_free", [False, True], ids=["cached-keys", "position-free"])
def test_whole_step_graph_bookkeeping_with_emulated_graphs(gen, monkeypatch, position_free):
    """GraphedDecoder with an emulated graph on the CPU: logits, lengths (host and device) and
    stats equal an eager twin's over three online updates; the updates run before a replay
    (no capture for them), a config change re-captures, every other step replays (returning
    the same static logits)."""
    import multipole.graphs as graphs

    cfg = dataclasses.replace(SMALL, position_free_keys=position_free, lookup_position=64)
    caches, graphed, eager, tokens = _decoder_twins(gen, cfg, "cpu")
    monkeypatch.setattr(GraphedDecoder, "_on_cuda", staticmethod(lambda t: True))
    monkeypatch.setattr(graphs, "graphable_state", lambda state: True)
    monkeypatch.setattr(graphs, "fused_path", lambda state, lookup_is_query, keys: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _EmulatedDecoderGraph(graphed))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    steps, outs, counts = 3 * cfg.interval + 5, [], []
    for i in range(steps):
        if i == 20:  # a config change between steps: the next step must not replay
            for cache in caches:
                for layer in cache.layers:
                    layer.state.config = dataclasses.replace(cfg, token_budget=40)
        positions = torch.full((2, 1), 300 + i)
        ours = graphed(tokens, positions)
        if i == 0:
            clustered = list(caches[0].layers[0].state.clustered_len)
        outs.append(ours)
        counts.append((graphed.replays, graphed.captures))
        ref = eager(tokens, positions)
        # CPU kernels may round differently on buffers at other addresses: 1 ulp, not more
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        tokens = ref.argmax(-1, keepdim=True)
        for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
            assert a.state.seq_lens == b.state.seq_lens == [301 + i] * 2
            assert a.state._seq_lens_device.tolist() == a.state.seq_lens
            assert a.get_seq_length() == b.get_seq_length() == 301 + i
            assert a.state.stats() == b.state.stats()
    assert graphed.failure is None, graphed.failure
    assert graphed.replays + graphed.captures + graphed.eager_steps == steps
    first = caches[0].layers[0].state
    assert min(first.clustered_len) >= clustered[0] + 3 * cfg.interval  # three updates
    # eager: the prompt's step, then one before each capture (the first, the config change's)
    assert (graphed.captures, graphed.eager_steps) == (2, 3), (graphed.replays, graphed.captures)
    assert counts[20][0] == counts[19][0]  # no replay right after the change
    for i in range(1, steps):  # two replays in a row with no capture between: the same logits
        (r0, c0), (r1, c1) = counts[i - 1], counts[i]
        if r1 == r0 + 1 and c1 == c0 and i >= 2 and counts[i - 2][0] < r0:
            assert outs[i] is outs[i - 1]


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_sliding_window_shorter_than_the_sequence_is_refused(gen, family):
    """Multipole approximates full attention: a layer whose window hides tokens must not decode
    over what is left (the window's mask would read as padding). Shorter sequences run."""
    window = dict(sliding_window=64)
    if family == "qwen2":
        window.update(use_sliding_window=True, max_window_layers=0)
    model = tiny_model(family, int(torch.randint(1000, (1,), generator=gen)), **window)
    ids = torch.randint(1, 128, (1, 60), generator=gen)
    ours = generate(model, ids, multipole.MultipoleCache(FULL), max_new_tokens=4)
    assert torch.equal(ours, generate(model, ids, max_new_tokens=4))
    with pytest.raises(NotImplementedError, match="sliding window of 64 tokens"):
        generate(model, ids, multipole.MultipoleCache(FULL), max_new_tokens=8)
