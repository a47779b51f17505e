"""A MultipoleCache reused across ``generate`` calls (multi-turn chat), and the memory a long
generation holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import tiny_model  # noqa: E402

import multipole  # noqa: E402
import multipole.hf  # noqa: E402
from multipole import MultipoleConfig  # noqa: E402
from multipole.index import GROW_MIN  # noqa: E402

# a budget covering every clustered token: decode steps are exact, so greedy tokens match
FULL = MultipoleConfig(token_budget=10**6, sink_tokens=4, interval=8, block_size=64)
SMALL = dataclasses.replace(FULL, token_budget=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run tiny ops: extra threads only add overhead (and stall on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reply(model, cache, ids, attention_mask=None, max_new_tokens=12):
    """One greedy ``generate`` call on the whole conversation ``ids`` with ``cache``."""
    stock = isinstance(cache, transformers.DynamicCache)
    model.set_attn_implementation("sdpa" if stock else "multipole")
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def chat(model, cache, prompt, turns, max_new_tokens=12):
    """Reply to ``prompt``, then to each user turn appended to the conversation so far, with
    the same ``cache`` throughout; returns the whole conversation."""
    ids = reply(model, cache, prompt, max_new_tokens=max_new_tokens)
    for turn in turns:
        ids = reply(model, cache, torch.cat([ids, turn], dim=1), max_new_tokens=max_new_tokens)
    return ids


def tokens(gen, batch, length):
    return torch.randint(1, 128, (batch, length), generator=gen)


@pytest.mark.parametrize("position_free", [False, True], ids=["cached_keys", "position_free"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_reused_cache_continues_a_conversation_like_a_dynamic_cache(gen, family, position_free):
    model = tiny_model(family, int(torch.randint(1000, (1,), generator=gen)))
    prompt, turns = tokens(gen, 1, 100), [tokens(gen, 1, 30), tokens(gen, 1, 75)]
    cfg = dataclasses.replace(FULL, position_free_keys=position_free)
    cache = multipole.MultipoleCache(cfg)
    ours = chat(model, cache, prompt, turns)
    assert torch.equal(ours, chat(model, transformers.DynamicCache(), prompt, turns))
    # the turns went into the state: every token but the last generated one is cached
    assert cache.layers[0].state.seq_lens == [ours.shape[1] - 1]


def test_a_reused_cache_holds_every_token_seen_and_clusters_the_turns(gen):
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    prompt = tokens(gen, 2, 90)  # two sequences of the same length: no padding
    turns = [tokens(gen, 2, 20), tokens(gen, 2, 150)]  # the second spans whole k-means blocks
    cache = multipole.MultipoleCache(FULL)
    out = chat(model, cache, prompt, turns, max_new_tokens=10)
    seen = out.shape[1] - 1  # the last generated token is never fed back
    assert seen == 90 + 3 * 10 + 20 + 150 - 1
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        state = layer.state
        assert state.seq_lens == [seen, seen]
        for b in range(2):  # the recent window is back to [interval, 2 * interval) tokens
            recent = seen - FULL.sink_tokens - state.clustered_len[b]
            assert FULL.interval <= recent < 2 * FULL.interval
            # every clustered token of every KV head belongs to one cluster
            sizes = state.index.level0.sizes[b].sum(-1)
            assert sizes.tolist() == [state.clustered_len[b]] * state.num_kv_heads


def test_a_turn_attends_exactly_whatever_the_budget(gen):
    """With a small budget decode steps are approximate, but a turn's tokens attend exactly to
    everything cached: on a one-layer model (cached keys do not depend on attention) the
    turn's logits are those of a dense forward over the whole conversation. The turn's
    position-free keys are its keys before RoPE, as for every other token."""
    model = tiny_model("qwen3", int(torch.randint(1000, (1,), generator=gen)), num_hidden_layers=1)
    model.set_attn_implementation("multipole")
    pre_rope_keys = []  # qwen3: k_norm gives the keys right before RoPE, [B, T, H_kv, D]
    model.model.layers[0].self_attn.k_norm.register_forward_hook(
        lambda m, i, o: pre_rope_keys.append(o.transpose(1, 2))
    )
    conversation = tokens(gen, 1, 200)
    cache = multipole.MultipoleCache(dataclasses.replace(SMALL, position_free_keys=True))
    with torch.no_grad():
        dense = transformers.DynamicCache()
        expected = model(conversation, past_key_values=dense).logits
        model(conversation[:, :120], past_key_values=cache)
        for t in range(120, 150):  # teacher-forced decode steps through the state
            step = model(conversation[:, t : t + 1], past_key_values=cache).logits
        turn = model(conversation[:, 150:], past_key_values=cache).logits
    assert cache.layers[0].state.clustered_len[0] > 64  # the middle is read sparsely...
    assert float((step[:, -1] - expected[:, 149]).abs().max()) > 1e-3  # ...and approximately
    torch.testing.assert_close(turn, expected[:, 150:], atol=1e-4, rtol=1e-4)
    state = cache.layers[0].state
    assert state.seq_lens == [200]
    keys = torch.cat(pre_rope_keys[1:], dim=2)  # [0] is the dense forward's
    torch.testing.assert_close(state.cluster_keys, keys, atol=1e-4, rtol=0)


def test_a_ragged_batch_fails_clearly_and_leaves_the_cache_as_it_was(gen):
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)))
    # sequences of different lengths (left padding): their states differ in length
    prompt, mask = tokens(gen, 2, 80), torch.ones(2, 80, dtype=torch.long)
    prompt[1, :10], mask[1, :10] = 0, 0
    cache = multipole.MultipoleCache(FULL)
    out = reply(model, cache, prompt, mask)
    lengths = cache.layers[0].state.seq_lens
    assert lengths == [out.shape[1] - 1, out.shape[1] - 11]
    turn = tokens(gen, 2, 20)
    mask = torch.cat([mask, torch.ones(2, out.shape[1] - 80 + 20, dtype=torch.long)], 1)
    with pytest.raises(NotImplementedError, match="ragged batch"):
        reply(model, cache, torch.cat([out, turn], 1), mask)
    assert cache.layers[0].state.seq_lens == lengths

    # same lengths, but a shorter turn for one sequence (padding inside the new tokens)
    prompt = tokens(gen, 2, 80)
    cache = multipole.MultipoleCache(FULL)
    out = reply(model, cache, prompt)
    seen = cache.get_seq_length()
    mask = torch.ones(2, out.shape[1] + 20, dtype=torch.long)
    mask[1, out.shape[1] : out.shape[1] + 5] = 0
    with pytest.raises(NotImplementedError, match="padding in the attention mask"):
        reply(model, cache, torch.cat([out, turn], 1), mask)
    assert cache.get_seq_length() == seen
    assert all(layer.state.seq_lens == [seen, seen] for layer in cache.layers)
    # the rejected call changed nothing: the conversation goes on as with a stock cache
    stock = transformers.DynamicCache()
    assert torch.equal(reply(model, stock, prompt), out)
    ids = torch.cat([out, turn], 1)
    assert torch.equal(reply(model, cache, ids), reply(model, stock, ids))


def test_a_long_generation_holds_its_tokens_plus_bounded_spare_capacity(gen):
    """Thousands of generated tokens: the cache holds its tokens' keys, values and labels with
    at most max(GROW_MIN, 1/8) spare slots, plus the centroids. Bound, per layer, for batch 1,
    H KV heads of dimension D, element size e:

    - token slots (keys, values: 2 * H * D * e; labels: 8 * H bytes; the PyTorch path's
      ranks within clusters: 4 * H bytes) grow by
      max(GROW_MIN, capacity // 8) when full, so capacity <= tokens + max(GROW_MIN, tokens // 8);
    - centroid slots (key and value means in float32: 2 * H * D * 4; sizes: 8 * H bytes) number
      at most max(GROW_MIN + 1, 2 * clusters) (the index grows them by doubling), and there are
      at most tokens * centroid_ratio + one per k-means block clusters;
    - the last step's token mask (H bytes per token) and a few per-sequence counters.

    A doubling policy on the token slots would hold prompt * 2^k >= tokens slots: from a
    64-token prompt to ~2160 tokens that is 4096, far above the bound (~3190).
    """
    cfg = MultipoleConfig(token_budget=64, sink_tokens=4, interval=16, block_size=256)
    model = tiny_model("llama", int(torch.randint(1000, (1,), generator=gen)), num_hidden_layers=1)
    model.set_attn_implementation("multipole")
    prompt, new_tokens = tokens(gen, 1, 64), 2100
    cache = multipole.MultipoleCache(cfg)
    with torch.no_grad():
        out = model.generate(
            prompt, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False
        )
    assert out.shape[1] == 64 + new_tokens

    state = cache.layers[0].state
    n = out.shape[1] - 1
    assert state.seq_lens == [n]
    h, d, e = state.num_kv_heads, state.head_dim, state.keys.element_size()
    token_bytes = 2 * h * d * e + 8 * h + 4 * h
    cluster_bytes = 2 * h * d * 4 + 8 * h
    blocks = -(-n // cfg.block_size)
    clusters = n * cfg.centroid_ratio + blocks
    bound = (
        (n + max(GROW_MIN, n // 8)) * token_bytes
        + max(GROW_MIN + 1, 2 * clusters) * cluster_bytes
        + h * n
        + 4096
    )
    held = cache.memory_bytes()
    assert held <= bound, (held, bound)

    # memory_bytes counts at least the stores it must
    index = state.index
    stores = [state._keys, state._values, index.labels, index.level0.key_centroids]
    stores += [index.level0.value_centroids, index.level0.sizes]
    assert held >= sum(t.numel() * t.element_size() for t in stores)
    assert state._keys.shape[2] <= n + max(GROW_MIN, n // 8)

    # the bound would catch a doubling policy at this length: 64 * 2^k >= n token slots
    doubling = 64
    while doubling < n:
        doubling *= 2
    assert held + (doubling - state._keys.shape[2]) * token_bytes > bound
