"""Input validation of every public entry: one test per rule, and extreme logits.

Every error must be a ValueError or TypeError whose message names the argument, the expected
value and the received value; the tests match all three.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch

from multipole import MultipoleConfig, MultipoleState, dense_attention

B, HKV, HQ, N, D = 2, 4, 8, 100, 16
CONFIG = MultipoleConfig(
    interval=32, block_size=256, sink_tokens=4, token_budget=32, kmeans_iters=2
)
NAN, INF = float("nan"), float("inf")
GENERATOR = torch.Generator().manual_seed(0)


def message(*parts: str) -> str:
    """Regex matching ``parts`` in order (argument, expected value, received value)."""
    return ".*".join(re.escape(part) for part in parts)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GENERATOR, dtype=dtype)


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``t`` with one entry set to ``value``."""
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def kv(b=B, h=HKV, n=N, d=D, dtype=torch.float32) -> torch.Tensor:
    return randn(b, h, n, d, dtype=dtype)


def query(b=B, hq=HQ, d=D, dtype=torch.float32) -> torch.Tensor:
    return randn(b, hq, d, dtype=dtype)


@pytest.fixture
def state() -> MultipoleState:
    return MultipoleState.prefill(kv(), kv(), CONFIG)


# ---------------------------------------------------------------------------------- prefill
PREFILL_ERRORS = [
    # (overrides of prefill's arguments, exception, message parts)
    pytest.param(
        {"keys": kv().tolist()},
        TypeError,
        ("keys: expected a torch.Tensor", "got list"),
        id="keys_not_tensor",
    ),
    pytest.param(
        {"keys": kv().long()},
        TypeError,
        ("keys: expected dtype float16, bfloat16, float32 or float64", "got torch.int64"),
        id="keys_int_dtype",
    ),
    pytest.param(
        {"keys": kv()[0]},
        ValueError,
        ("keys: expected 4 dims [B, num_kv_heads, N, head_dim]", "got shape [4, 100, 16]"),
        id="keys_3d",
    ),
    pytest.param(
        {"keys": kv(n=0), "values": kv(n=0)},
        ValueError,
        ("keys: expected non-empty [B, num_kv_heads, N, head_dim]", "got [2, 4, 0, 16]"),
        id="keys_no_tokens",
    ),
    pytest.param(
        {"keys": kv(b=0), "values": kv(b=0)},
        ValueError,
        ("keys: expected non-empty", "got [0, 4, 100, 16]"),
        id="keys_no_sequences",
    ),
    pytest.param(
        {"keys": kv(h=0), "values": kv(h=0)},
        ValueError,
        ("keys: expected non-empty", "got [2, 0, 100, 16]"),
        id="keys_no_heads",
    ),
    pytest.param(
        {"keys": kv(d=0), "values": kv(d=0)},
        ValueError,
        ("keys: expected non-empty", "got [2, 4, 100, 0]"),
        id="keys_head_dim_zero",
    ),
    pytest.param(
        {"values": None},
        TypeError,
        ("values: expected a torch.Tensor", "got NoneType"),
        id="values_not_tensor",
    ),
    pytest.param(
        {"values": kv(n=N - 1)},
        ValueError,
        (
            "values: expected shape [B, num_kv_heads, N, head_dim] = [2, 4, 100, 16]",
            "got [2, 4, 99, 16]",
        ),
        id="values_shape",
    ),
    pytest.param(
        {"values": kv(dtype=torch.float64)},
        TypeError,
        ("values: expected dtype torch.float32 (as keys)", "got torch.float64"),
        id="values_dtype",
    ),
    pytest.param(
        {"cluster_keys": kv(d=8)},
        ValueError,
        ("cluster_keys: expected shape", "= [2, 4, 100, 16]", "got [2, 4, 100, 8]"),
        id="cluster_keys_shape",
    ),
    pytest.param(
        {"cluster_keys": kv(dtype=torch.float16)},
        TypeError,
        ("cluster_keys: expected dtype torch.float32 (as keys)", "got torch.float16"),
        id="cluster_keys_dtype",
    ),
    pytest.param(
        {"lengths": torch.tensor([[N, N]])},
        ValueError,
        ("lengths: expected shape [B] = [2]", "got [1, 2]"),
        id="lengths_2d",
    ),
    pytest.param(
        {"lengths": [N]},
        ValueError,
        ("lengths: expected shape [B] = [2]", "got [1]"),
        id="lengths_too_few",
    ),
    pytest.param(
        {"lengths": torch.tensor([50.0, 100.0])},
        TypeError,
        ("lengths: expected an integer tensor [B] = [2]", "got torch.float32"),
        id="lengths_float",
    ),
    pytest.param(
        {"lengths": "all"},
        TypeError,
        ("lengths: expected an integer tensor [B] = [2]", "got str"),
        id="lengths_str",
    ),
    pytest.param(
        {"lengths": [0, N]},
        ValueError,
        ("lengths: expected values in [1, 100]", "got min 0, max 100"),
        id="lengths_zero",
    ),
    pytest.param(
        {"lengths": [N, N + 1]},
        ValueError,
        ("lengths: expected values in [1, 100]", "got min 100, max 101"),
        id="lengths_above_N",
    ),
    pytest.param(
        {"config": {"token_budget": 32}},
        TypeError,
        ("config: expected a MultipoleConfig", "got dict"),
        id="config_dict",
    ),
    pytest.param(
        {"keys": with_value(kv(), NAN)},
        ValueError,
        ("keys: expected finite values", "got NaN or inf"),
        id="keys_nan",
    ),
    pytest.param(
        {"keys": with_value(kv(), -INF)},
        ValueError,
        ("keys: expected finite values", "got NaN or inf"),
        id="keys_inf",
    ),
    pytest.param(
        {"values": with_value(kv(), INF)},
        ValueError,
        ("values: expected finite values", "got NaN or inf"),
        id="values_inf",
    ),
    pytest.param(
        {"cluster_keys": with_value(kv(), NAN)},
        ValueError,
        ("cluster_keys: expected finite values", "got NaN or inf"),
        id="cluster_keys_nan",
    ),
    pytest.param(
        {"keys": with_value(kv(), NAN), "config": MultipoleConfig(validate=True)},
        ValueError,
        ("keys: expected finite values", "got NaN or inf"),
        id="keys_nan_validate_true",
    ),
]


def prefill_args(**overrides) -> dict:
    return {"keys": kv(), "values": kv(), "config": CONFIG} | overrides


@pytest.mark.parametrize(("overrides", "error", "parts"), PREFILL_ERRORS)
def test_prefill_rejects(overrides, error, parts):
    with pytest.raises(error, match=message(*parts)):
        MultipoleState.prefill(**prefill_args(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"keys": with_value(kv(), NAN)}, id="keys_nan"),
        pytest.param({"values": with_value(kv(), INF)}, id="values_inf"),
        pytest.param({"cluster_keys": with_value(kv(), -INF)}, id="cluster_keys_inf"),
    ],
)
def test_prefill_skips_finite_check_when_validate_false(overrides):
    config = dataclasses.replace(CONFIG, validate=False)
    state = MultipoleState.prefill(**prefill_args(config=config, **overrides))
    assert state.seq_lens == [N, N]


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([1, N], id="shortest"),
        pytest.param(torch.tensor([N, 37], dtype=torch.int32), id="int32_tensor"),
        pytest.param(None, id="default"),
    ],
)
def test_prefill_accepts_lengths(lengths):
    state = MultipoleState.prefill(**prefill_args(lengths=lengths))
    expected = [N, N] if lengths is None else [int(n) for n in lengths]
    assert state.seq_lens == expected


# ---------------------------------------------------------------------------------- dense
DENSE_ERRORS = [
    # (overrides of dense_attention's arguments, exception, message parts)
    pytest.param(
        {"q": query().numpy()},
        TypeError,
        ("q: expected a torch.Tensor", "got ndarray"),
        id="q_not_tensor",
    ),
    pytest.param(
        {"q": query().int()},
        TypeError,
        ("q: expected dtype float16, bfloat16, float32 or float64", "got torch.int32"),
        id="q_int_dtype",
    ),
    pytest.param(
        {"q": query()[0]},
        ValueError,
        ("q: expected 3 dims [B, num_q_heads, head_dim]", "got shape [8, 16]"),
        id="q_2d",
    ),
    pytest.param(
        {"q": query(b=3)},
        ValueError,
        ("q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [3, 8, 16]"),
        id="q_batch",
    ),
    pytest.param(
        {"q": query(d=8)},
        ValueError,
        ("q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [2, 8, 8]"),
        id="q_head_dim",
    ),
    pytest.param(
        {"q": query(hq=6)},
        ValueError,
        ("q: expected num_q_heads to be a multiple of num_kv_heads=4", "got num_q_heads=6"),
        id="q_heads_not_multiple_of_kv_heads",
    ),
    pytest.param(
        {"q": query(dtype=torch.float64)},
        TypeError,
        ("q: expected dtype torch.float32 (as keys)", "got torch.float64"),
        id="q_dtype",
    ),
    pytest.param(
        {"keys": (kv() * 4).to(torch.int8)},
        TypeError,
        ("keys: expected dtype float16, bfloat16, float32 or float64", "got torch.int8"),
        id="keys_int_dtype",
    ),
    pytest.param(
        {"keys": kv()[..., 0]},
        ValueError,
        ("keys: expected 4 dims [B, num_kv_heads, N, head_dim]", "got shape [2, 4, 100]"),
        id="keys_3d",
    ),
    pytest.param(
        {"keys": kv(d=0), "values": kv(d=0), "q": query(d=0)},
        ValueError,
        ("keys: expected non-empty", "got [2, 4, 100, 0]"),
        id="keys_head_dim_zero",
    ),
    pytest.param(
        {"values": kv(h=2)},
        ValueError,
        (
            "values: expected shape [B, num_kv_heads, N, head_dim] = [2, 4, 100, 16]",
            "got [2, 2, 100, 16]",
        ),
        id="values_shape",
    ),
    pytest.param(
        {"values": kv(dtype=torch.bfloat16)},
        TypeError,
        ("values: expected dtype torch.float32 (as keys)", "got torch.bfloat16"),
        id="values_dtype",
    ),
    pytest.param(
        {"lengths": torch.tensor([N, N, N])},
        ValueError,
        ("lengths: expected shape [B] = [2]", "got [3]"),
        id="lengths_too_many",
    ),
    pytest.param(
        {"lengths": [10.0, 20.0]},
        TypeError,
        ("lengths: expected an integer tensor [B] = [2]", "got torch.float32"),
        id="lengths_float",
    ),
    pytest.param(
        {"lengths": [N, N + 1]},
        ValueError,
        ("lengths: expected values in [0, 100]", "got min 100, max 101"),
        id="lengths_above_N",
    ),
    pytest.param(
        {"lengths": [-1, N]},
        ValueError,
        ("lengths: expected values in [0, 100]", "got min -1, max 100"),
        id="lengths_negative",
    ),
    pytest.param(
        {"q": with_value(query(), NAN)},
        ValueError,
        ("q: expected finite values", "got NaN or inf"),
        id="q_nan",
    ),
    pytest.param(
        {"keys": with_value(kv(), NAN)},
        ValueError,
        ("keys: expected finite values", "got NaN or inf"),
        id="keys_nan",
    ),
    pytest.param(
        {"values": with_value(kv(), -INF)},
        ValueError,
        ("values: expected finite values", "got NaN or inf"),
        id="values_inf",
    ),
]


def dense_args(**overrides) -> dict:
    return {"q": query(), "keys": kv(), "values": kv()} | overrides


@pytest.mark.parametrize(("overrides", "error", "parts"), DENSE_ERRORS)
def test_dense_attention_rejects(overrides, error, parts):
    with pytest.raises(error, match=message(*parts)):
        dense_attention(**dense_args(**overrides))


def test_dense_attention_allows_empty_sequences():
    out, lse = dense_attention(**dense_args(lengths=[0, N]), return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_dense_attention_with_no_tokens_returns_zeros():
    out = dense_attention(**dense_args(keys=kv(n=0), values=kv(n=0)))
    assert torch.equal(out, torch.zeros(B, HQ, D))


# ---------------------------------------------------------------------------------- scale
BAD_SCALES = [
    pytest.param(0.0, "got 0.0", id="zero"),
    pytest.param(-0.25, "got -0.25", id="negative"),
    pytest.param(NAN, "got nan", id="nan"),
    pytest.param(INF, "got inf", id="inf"),
    pytest.param(True, "got True", id="bool"),
    pytest.param("0.25", "got '0.25'", id="str"),
]


@pytest.mark.parametrize(("scale", "received"), BAD_SCALES)
def test_attend_rejects_scale(state, scale, received):
    with pytest.raises(ValueError, match=message("scale: expected a finite float > 0", received)):
        state.attend(query(), scale=scale)


@pytest.mark.parametrize(("scale", "received"), BAD_SCALES)
def test_dense_attention_rejects_scale(scale, received):
    with pytest.raises(ValueError, match=message("scale: expected a finite float > 0", received)):
        dense_attention(**dense_args(), scale=scale)


# ---------------------------------------------------------------------------------- attend
ATTEND_ERRORS = [
    # (overrides of attend's arguments, exception, message parts)
    pytest.param(
        {"q": None},
        TypeError,
        ("q: expected a torch.Tensor", "got NoneType"),
        id="q_not_tensor",
    ),
    pytest.param(
        {"q": query().to(torch.int16)},
        TypeError,
        ("q: expected dtype float16, bfloat16, float32 or float64", "got torch.int16"),
        id="q_int_dtype",
    ),
    pytest.param(
        {"q": query().unsqueeze(2)},
        ValueError,
        ("q: expected 3 dims [B, num_q_heads, head_dim]", "got shape [2, 8, 1, 16]"),
        id="q_4d",
    ),
    pytest.param(
        {"q": query(b=1)},
        ValueError,
        ("q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [1, 8, 16]"),
        id="q_batch",
    ),
    pytest.param(
        {"q": query(d=32)},
        ValueError,
        ("q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [2, 8, 32]"),
        id="q_head_dim",
    ),
    pytest.param(
        {"q": query(hq=6)},
        ValueError,
        ("q: expected num_q_heads to be a multiple of num_kv_heads=4", "got num_q_heads=6"),
        id="q_heads_not_multiple_of_kv_heads",
    ),
    pytest.param(
        {"q": query(dtype=torch.float16)},
        TypeError,
        ("q: expected dtype torch.float32 (as keys)", "got torch.float16"),
        id="q_dtype",
    ),
    pytest.param(
        {"q": with_value(query(), NAN)},
        ValueError,
        ("q: expected finite values", "got NaN or inf"),
        id="q_nan",
    ),
    pytest.param(
        {"q": with_value(query(), INF)},
        ValueError,
        ("q: expected finite values", "got NaN or inf"),
        id="q_inf",
    ),
    pytest.param(
        {"lookup_q": query(d=8)},
        ValueError,
        ("lookup_q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [2, 8, 8]"),
        id="lookup_q_head_dim",
    ),
    pytest.param(
        {"lookup_q": query(hq=4)},
        ValueError,
        ("lookup_q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [2, 4, 16]"),
        id="lookup_q_fewer_heads_than_q",
    ),
    pytest.param(
        {"lookup_q": query(hq=16)},
        ValueError,
        ("lookup_q: expected shape [B, num_q_heads, head_dim] = [2, 8, 16]", "got [2, 16, 16]"),
        id="lookup_q_more_heads_than_q",
    ),
    pytest.param(
        {"lookup_q": query(dtype=torch.float64)},
        TypeError,
        ("lookup_q: expected dtype torch.float32 (as keys)", "got torch.float64"),
        id="lookup_q_dtype",
    ),
    pytest.param(
        {"lookup_q": with_value(query(), NAN)},
        ValueError,
        ("lookup_q: expected finite values", "got NaN or inf"),
        id="lookup_q_nan",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "parts"), ATTEND_ERRORS)
def test_attend_rejects(state, overrides, error, parts):
    with pytest.raises(error, match=message(*parts)):
        state.attend(**({"q": query()} | overrides))


def test_stats_before_attend_raises(state):
    with pytest.raises(RuntimeError, match=message("stats: no attend has run")):
        state.stats()


# ---------------------------------------------------------------------------------- append
def step(t=1, **shape) -> torch.Tensor:
    """New tokens for :meth:`MultipoleState.append`: ``[B, H_kv, t, D]``."""
    return kv(n=t, **shape)


APPEND_ERRORS = [
    # (overrides of append's arguments, exception, message parts)
    pytest.param(
        {"keys": step().numpy()},
        TypeError,
        ("keys: expected a torch.Tensor", "got ndarray"),
        id="keys_not_tensor",
    ),
    pytest.param(
        {"keys": step(h=2)},
        ValueError,
        (
            "keys: expected shape [B, num_kv_heads, T, head_dim] = [2, 4, 1, 16]",
            "got [2, 2, 1, 16]",
        ),
        id="keys_kv_heads",
    ),
    pytest.param(
        {"keys": step(d=8)},
        ValueError,
        ("keys: expected shape [B, num_kv_heads, T, head_dim] = [2, 4, 1, 16]", "got [2, 4, 1, 8]"),
        id="keys_head_dim",
    ),
    pytest.param(
        {"keys": step(b=1)},
        ValueError,
        (
            "keys: expected shape [B, num_kv_heads, T, head_dim] = [2, 4, 1, 16]",
            "got [1, 4, 1, 16]",
        ),
        id="keys_batch",
    ),
    pytest.param(
        {"keys": step()[0]},
        ValueError,
        ("keys: expected 4 dims [B, num_kv_heads, T, head_dim]", "got shape [4, 1, 16]"),
        id="keys_3d",
    ),
    pytest.param(
        {"values": step(t=2)},
        ValueError,
        (
            "values: expected shape [B, num_kv_heads, T, head_dim] = [2, 4, 1, 16]",
            "got [2, 4, 2, 16]",
        ),
        id="values_tokens_differ_from_keys",
    ),
    pytest.param(
        {"values": step(d=8)},
        ValueError,
        ("values: expected shape", "= [2, 4, 1, 16]", "got [2, 4, 1, 8]"),
        id="values_head_dim",
    ),
    pytest.param(
        {"keys": step(t=0), "values": step(t=0)},
        ValueError,
        ("keys: expected at least one new token (T >= 1)", "got T = 0"),
        id="no_new_tokens",
    ),
    pytest.param(
        {"keys": step(dtype=torch.float64), "values": step(dtype=torch.float64)},
        TypeError,
        ("keys: expected dtype torch.float32 (as the cache)", "got torch.float64"),
        id="keys_dtype",
    ),
    pytest.param(
        {"values": step(dtype=torch.bfloat16)},
        TypeError,
        ("values: expected dtype torch.float32 (as the cache)", "got torch.bfloat16"),
        id="values_dtype",
    ),
    pytest.param(
        {"cluster_keys": step()},
        ValueError,
        ("cluster_keys: prefill had no cluster_keys", "must not pass them"),
        id="cluster_keys_without_prefill_cluster_keys",
    ),
    pytest.param(
        {"keys": with_value(step(t=3), NAN), "values": step(t=3)},
        ValueError,
        ("keys: expected finite values", "got NaN or inf"),
        id="keys_nan",
    ),
    pytest.param(
        {"values": with_value(step(), INF)},
        ValueError,
        ("values: expected finite values", "got NaN or inf"),
        id="values_inf",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "parts"), APPEND_ERRORS)
def test_append_rejects(state, overrides, error, parts):
    with pytest.raises(error, match=message(*parts)):
        state.append(**({"keys": step(), "values": step()} | overrides))
    assert state.seq_lens == [N, N]


@pytest.fixture
def state_with_cluster_keys() -> MultipoleState:
    return MultipoleState.prefill(kv(), kv(), CONFIG, cluster_keys=kv())


CLUSTER_KEY_APPEND_ERRORS = [
    pytest.param(
        None,
        ValueError,
        ("cluster_keys: prefill had cluster_keys", "must pass them"),
        id="missing",
    ),
    pytest.param(
        step(t=2),
        ValueError,
        ("cluster_keys: expected shape", "= [2, 4, 1, 16]", "got [2, 4, 2, 16]"),
        id="shape",
    ),
    pytest.param(
        step(dtype=torch.float64),
        TypeError,
        ("cluster_keys: expected dtype torch.float32 (as the cache)", "got torch.float64"),
        id="dtype",
    ),
    pytest.param(
        with_value(step(), NAN),
        ValueError,
        ("cluster_keys: expected finite values", "got NaN or inf"),
        id="nan",
    ),
]


@pytest.mark.parametrize(("cluster_keys", "error", "parts"), CLUSTER_KEY_APPEND_ERRORS)
def test_append_checks_cluster_keys(state_with_cluster_keys, cluster_keys, error, parts):
    with pytest.raises(error, match=message(*parts)):
        state_with_cluster_keys.append(step(), step(), cluster_keys=cluster_keys)
    assert state_with_cluster_keys.seq_lens == [N, N]


# ---------------------------------------------------------------------------------- messages
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: MultipoleState.prefill([1.0], kv(), CONFIG), id="not_tensor"),
        pytest.param(lambda: MultipoleState.prefill(kv()[0], kv(), CONFIG), id="wrong_ndim"),
    ],
)
def test_messages_show_no_empty_size_list(call):
    """A dims list without sizes must not print ``= []`` as if the expected sizes were empty."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert "= []" not in str(info.value)


# ---------------------------------------------------------------------------------- devices
def device_cases(device: str) -> list:
    """Calls that pass one argument on ``device`` against a CPU cache or CPU keys."""

    def other(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=device)

    return [
        pytest.param(lambda s: s.attend(other(B, HQ, D)), "q", "keys", id="attend_q"),
        pytest.param(
            lambda s: s.attend(query(), lookup_q=other(B, HQ, D)), "lookup_q", "keys", id="lookup_q"
        ),
        pytest.param(
            lambda s: s.append(other(B, HKV, 1, D), other(B, HKV, 1, D)),
            "keys",
            "the cache",
            id="append_keys",
        ),
        pytest.param(
            lambda s: s.append(step(), other(B, HKV, 1, D)),
            "values",
            "the cache",
            id="append_values",
        ),
        pytest.param(
            lambda s: MultipoleState.prefill(kv(), other(B, HKV, N, D), CONFIG),
            "values",
            "keys",
            id="prefill_values",
        ),
        pytest.param(
            lambda s: MultipoleState.prefill(kv(), kv(), CONFIG, cluster_keys=other(B, HKV, N, D)),
            "cluster_keys",
            "keys",
            id="prefill_cluster_keys",
        ),
        pytest.param(
            lambda s: dense_attention(other(B, HQ, D), kv(), kv()), "q", "keys", id="dense_q"
        ),
        pytest.param(
            lambda s: dense_attention(query(), kv(), other(B, HKV, N, D)),
            "values",
            "keys",
            id="dense_values",
        ),
    ]


@pytest.mark.parametrize(("call", "name", "ref"), device_cases("meta"))
def test_meta_device_rejected(state, call, name, ref):
    with pytest.raises(
        ValueError, match=message(f"{name}: expected device cpu (as {ref})", "meta")
    ):
        call(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("call", "name", "ref"), device_cases("cuda"))
def test_cuda_device_rejected(state, call, name, ref):
    with pytest.raises(
        ValueError, match=message(f"{name}: expected device cpu (as {ref})", "cuda")
    ):
        call(state)


# ---------------------------------------------------------------------------------- extreme logits
EXTREME_HKV, EXTREME_GROUP, EXTREME_N, EXTREME_D = 2, 2, 600, 64
EXTREME_LENGTHS = [600, 450]


@pytest.fixture(scope="module")
def extreme_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``scale * q.k`` of about +-1e4 with the default scale ``1 / sqrt(64) = 1/8``.

    Keys have norm 1e2 and queries 8e2 (random directions), so logits span (-1e4, 1e4); one
    clustered key of each KV head is aligned with the group's first query (+1e4) and one is
    opposite to it (-1e4).
    """
    g = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (x / x.norm(dim=-1, keepdim=True)).float()

    q = 8e2 * unit(B, EXTREME_HKV * EXTREME_GROUP, EXTREME_D)
    keys = 1e2 * unit(B, EXTREME_HKV, EXTREME_N, EXTREME_D)
    first_query = q.view(B, EXTREME_HKV, EXTREME_GROUP, EXTREME_D)[:, :, 0] / 8e2
    keys[:, :, 100] = 1e2 * first_query
    keys[:, :, 300] = -1e2 * first_query
    values = torch.randn(B, EXTREME_HKV, EXTREME_N, EXTREME_D, generator=g)
    return q, keys, values


def test_extreme_logits_have_the_intended_magnitude(extreme_inputs):
    q, keys, _ = extreme_inputs
    grouped = q.view(B, EXTREME_HKV, EXTREME_GROUP, EXTREME_D)
    logits = torch.einsum("bhgd,bhnd->bhgn", grouped, keys) / math.sqrt(EXTREME_D)
    assert logits.max().item() == pytest.approx(1e4, rel=1e-4)
    assert logits.min().item() == pytest.approx(-1e4, rel=1e-4)


def test_dense_attention_extreme_logits_finite(extreme_inputs):
    q, keys, values = extreme_inputs
    out, lse = dense_attention(q, keys, values, lengths=EXTREME_LENGTHS, return_lse=True)
    assert torch.isfinite(out).all()
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize(
    ("levels", "replacement", "budget"),
    [
        pytest.param(
            levels,
            replacement,
            budget,
            id=f"levels{levels}-{'multipole' if replacement else 'centroid_only'}-{budget}_budget",
        )
        for levels, replacement, budget in itertools.product(
            (1, 2), (True, False), ("small", "full")
        )
    ],
)
def test_multipole_extreme_logits(extreme_inputs, levels, replacement, budget):
    q, keys, values = extreme_inputs
    full = budget == "full"
    config = MultipoleConfig(
        interval=32,
        block_size=256,
        sink_tokens=4,
        kmeans_iters=3,
        token_budget=EXTREME_N if full else 32,
        coarse_budget=EXTREME_N if full else 0.25,
        levels=levels,
        replacement=replacement,
    )
    state = MultipoleState.prefill(keys, values, config, lengths=EXTREME_LENGTHS)
    out = state.attend(q)
    assert torch.isfinite(out).all()
    if full:
        reference = dense_attention(q, keys, values, lengths=EXTREME_LENGTHS)
        tolerance = 1e-5 * reference.abs().max().item()
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=tolerance)
