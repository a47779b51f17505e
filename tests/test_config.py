"""MultipoleConfig: one test per validation rule, plus the budget and cluster-count helpers."""

from __future__ import annotations

import dataclasses
import re

import pytest

from multipole import MultipoleConfig


def message(*parts: str) -> str:
    """Regex matching ``parts`` in order (argument, expected value, received value)."""
    return ".*".join(re.escape(part) for part in parts)


VALID = [
    pytest.param({}, id="defaults"),
    pytest.param({"centroid_ratio": 1.0, "level_ratio": 1}, id="ratios_one"),
    pytest.param({"token_budget": 0}, id="budget_zero_tokens"),
    pytest.param({"token_budget": 0.5, "coarse_budget": 0.999}, id="budget_fractions"),
    pytest.param({"coarse_budget": 4096}, id="coarse_budget_tokens"),
    pytest.param({"sink_tokens": 0, "interval": 1, "block_size": 1}, id="smallest_regions"),
    pytest.param({"interval": 32, "block_size": 256, "sink_tokens": 4}, id="small_blocks"),
    pytest.param({"kmeans_iters": 1, "update_iters": 1}, id="one_iteration"),
    pytest.param({"levels": 2}, id="two_levels"),
    pytest.param({"replacement": False}, id="centroid_only"),
    pytest.param({"far_field_keys": "attention"}, id="attention_far_field"),
    pytest.param({"far_field_share": 0.1}, id="partial_far_field"),
    pytest.param({"validate": True}, id="validate_on"),
    pytest.param({"validate": False}, id="validate_off"),
    pytest.param({"lookup_position": 0, "seed": 0}, id="zero_position_and_seed"),
]


@pytest.mark.parametrize("kwargs", VALID)
def test_valid_config_constructs(kwargs):
    config = MultipoleConfig(**kwargs)
    for field, value in kwargs.items():
        assert getattr(config, field) == value


INVALID = [
    # (kwargs, exception, message parts: argument, expected, received)
    pytest.param(
        {"centroid_ratio": 0.0},
        ValueError,
        ("MultipoleConfig.centroid_ratio", "a float in (0, 1]", "got 0.0"),
        id="centroid_ratio_zero",
    ),
    pytest.param(
        {"centroid_ratio": 1.5},
        ValueError,
        ("MultipoleConfig.centroid_ratio", "a float in (0, 1]", "got 1.5"),
        id="centroid_ratio_above_one",
    ),
    pytest.param(
        {"centroid_ratio": float("nan")},
        ValueError,
        ("MultipoleConfig.centroid_ratio", "a float in (0, 1]", "got nan"),
        id="centroid_ratio_nan",
    ),
    pytest.param(
        {"centroid_ratio": "1/16"},
        TypeError,
        ("MultipoleConfig.centroid_ratio", "expected a float", "got '1/16'"),
        id="centroid_ratio_str",
    ),
    pytest.param(
        {"centroid_ratio": True},
        TypeError,
        ("MultipoleConfig.centroid_ratio", "expected a float", "got True"),
        id="centroid_ratio_bool",
    ),
    pytest.param(
        {"level_ratio": 0},
        ValueError,
        ("MultipoleConfig.level_ratio", "a float in (0, 1]", "got 0"),
        id="level_ratio_zero",
    ),
    pytest.param(
        {"level_ratio": 2.0},
        ValueError,
        ("MultipoleConfig.level_ratio", "a float in (0, 1]", "got 2.0"),
        id="level_ratio_above_one",
    ),
    pytest.param(
        {"token_budget": -1},
        ValueError,
        ("MultipoleConfig.token_budget", "an int >= 0", "got -1"),
        id="token_budget_negative",
    ),
    pytest.param(
        {"token_budget": 1.5},
        ValueError,
        ("MultipoleConfig.token_budget", "a float in (0, 1)", "got 1.5"),
        id="token_budget_fraction_above_one",
    ),
    pytest.param(
        {"token_budget": 1.0},
        ValueError,
        ("MultipoleConfig.token_budget", "a float in (0, 1)", "got 1.0"),
        id="token_budget_fraction_one",
    ),
    pytest.param(
        {"token_budget": 0.0},
        ValueError,
        ("MultipoleConfig.token_budget", "a float in (0, 1)", "got 0.0"),
        id="token_budget_fraction_zero",
    ),
    pytest.param(
        {"token_budget": float("nan")},
        ValueError,
        ("MultipoleConfig.token_budget", "a float in (0, 1)", "got nan"),
        id="token_budget_nan",
    ),
    pytest.param(
        {"token_budget": True},
        TypeError,
        ("MultipoleConfig.token_budget", "an int (tokens) or a float in (0, 1)", "got bool"),
        id="token_budget_bool",
    ),
    pytest.param(
        {"token_budget": "128"},
        TypeError,
        ("MultipoleConfig.token_budget", "an int (tokens) or a float in (0, 1)", "got str"),
        id="token_budget_str",
    ),
    pytest.param(
        {"coarse_budget": -8},
        ValueError,
        ("MultipoleConfig.coarse_budget", "an int >= 0", "got -8"),
        id="coarse_budget_negative",
    ),
    pytest.param(
        {"coarse_budget": 1.5},
        ValueError,
        ("MultipoleConfig.coarse_budget", "a float in (0, 1)", "got 1.5"),
        id="coarse_budget_fraction_above_one",
    ),
    pytest.param(
        {"coarse_budget": 0.0},
        ValueError,
        ("MultipoleConfig.coarse_budget", "a float in (0, 1)", "got 0.0"),
        id="coarse_budget_fraction_zero",
    ),
    pytest.param(
        {"coarse_budget": None},
        TypeError,
        ("MultipoleConfig.coarse_budget", "an int (tokens) or a float in (0, 1)", "got NoneType"),
        id="coarse_budget_none",
    ),
    pytest.param(
        {"sink_tokens": -1},
        ValueError,
        ("MultipoleConfig.sink_tokens", "an int >= 0", "got -1"),
        id="sink_tokens_negative",
    ),
    pytest.param(
        {"sink_tokens": True},
        TypeError,
        ("MultipoleConfig.sink_tokens", "expected an int", "got bool"),
        id="sink_tokens_bool",
    ),
    pytest.param(
        {"interval": 0},
        ValueError,
        ("MultipoleConfig.interval", "an int >= 1", "got 0"),
        id="interval_zero",
    ),
    pytest.param(
        {"interval": 32.0},
        TypeError,
        ("MultipoleConfig.interval", "expected an int", "got float"),
        id="interval_float",
    ),
    pytest.param(
        {"block_size": 0},
        ValueError,
        ("MultipoleConfig.block_size", "an int >= 1", "got 0"),
        id="block_size_zero",
    ),
    pytest.param(
        {"interval": 32, "block_size": 100},
        ValueError,
        ("MultipoleConfig.block_size", "a multiple of interval=32", "got 100"),
        id="block_size_not_multiple_of_interval",
    ),
    pytest.param(
        {"kmeans_iters": 0},
        ValueError,
        ("MultipoleConfig.kmeans_iters", "an int >= 1", "got 0"),
        id="kmeans_iters_zero",
    ),
    pytest.param(
        {"kmeans_iters": True},
        TypeError,
        ("MultipoleConfig.kmeans_iters", "expected an int", "got bool"),
        id="kmeans_iters_bool",
    ),
    pytest.param(
        {"update_iters": 0},
        ValueError,
        ("MultipoleConfig.update_iters", "an int >= 1", "got 0"),
        id="update_iters_zero",
    ),
    pytest.param(
        {"lookup_position": -1},
        ValueError,
        ("MultipoleConfig.lookup_position", "an int >= 0", "got -1"),
        id="lookup_position_negative",
    ),
    pytest.param(
        {"seed": -1},
        ValueError,
        ("MultipoleConfig.seed", "an int >= 0", "got -1"),
        id="seed_negative",
    ),
    pytest.param(
        {"seed": 2**32},
        ValueError,
        ("MultipoleConfig.seed", "an int <= 4294967295", "got 4294967296"),
        id="seed_beyond_32_bits",
    ),
    pytest.param(
        {"token_budget": 2**63},
        ValueError,
        ("MultipoleConfig.token_budget", "an int <= 2**62", "got 9223372036854775808"),
        id="token_budget_beyond_int64",
    ),
    pytest.param(
        {"levels": 2, "coarse_budget": 10**30},
        ValueError,
        ("MultipoleConfig.coarse_budget", "an int <= 2**62", "got 1000000000000000000000000000000"),
        id="coarse_budget_beyond_int64",
    ),
    pytest.param(
        {"levels": 3},
        ValueError,
        ("MultipoleConfig.levels", "1 or 2", "got 3"),
        id="levels_three",
    ),
    pytest.param(
        {"levels": 0},
        ValueError,
        ("MultipoleConfig.levels", "1 or 2", "got 0"),
        id="levels_zero",
    ),
    pytest.param(
        {"levels": True},
        TypeError,
        ("MultipoleConfig.levels", "expected an int", "got bool"),
        id="levels_bool",
    ),
    pytest.param(
        {"levels": 2.0},
        TypeError,
        ("MultipoleConfig.levels", "expected an int", "got float"),
        id="levels_float",
    ),
    pytest.param(
        {"replacement": 1},
        TypeError,
        ("MultipoleConfig.replacement", "expected a bool", "got 1"),
        id="replacement_int",
    ),
    pytest.param(
        {"replacement": "yes"},
        TypeError,
        ("MultipoleConfig.replacement", "expected a bool", "got 'yes'"),
        id="replacement_str",
    ),
    pytest.param(
        {"position_free_keys": 1},
        TypeError,
        ("MultipoleConfig.position_free_keys", "expected a bool", "got 1"),
        id="position_free_keys_int",
    ),
    pytest.param(
        {"far_field_share": 0.0},
        ValueError,
        ("MultipoleConfig.far_field_share", "a float in (0, 1]", "got 0.0"),
        id="far_field_share_zero",
    ),
    pytest.param(
        {"far_field_share": 1.5},
        ValueError,
        ("MultipoleConfig.far_field_share", "a float in (0, 1]", "got 1.5"),
        id="far_field_share_above_one",
    ),
    pytest.param(
        {"far_field_share": 0.5, "levels": 2},
        ValueError,
        ("MultipoleConfig.far_field_share", "1.0 when levels=2", "got 0.5"),
        id="far_field_share_two_levels",
    ),
    pytest.param(
        {"far_field_keys": "keys"},
        ValueError,
        ("MultipoleConfig.far_field_keys", "'clustering' or 'attention'", "got 'keys'"),
        id="far_field_keys_unknown",
    ),
    pytest.param(
        {"far_field_keys": "Clustering"},
        ValueError,
        ("MultipoleConfig.far_field_keys", "'clustering' or 'attention'", "got 'Clustering'"),
        id="far_field_keys_wrong_case",
    ),
    pytest.param(
        {"validate": "yes"},
        ValueError,
        ("MultipoleConfig.validate", "None, True or False", "got 'yes'"),
        id="validate_str",
    ),
    pytest.param(
        {"validate": 1},
        ValueError,
        ("MultipoleConfig.validate", "None, True or False", "got 1"),
        id="validate_int",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "parts"), INVALID)
def test_invalid_config_rejected(kwargs, error, parts):
    with pytest.raises(error, match=message(*parts)):
        MultipoleConfig(**kwargs)


def test_config_is_frozen():
    config = MultipoleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="token_budget"):
        config.token_budget = 0


def test_to_dict_round_trips():
    config = MultipoleConfig(token_budget=0.25, levels=2, replacement=False, validate=True)
    assert MultipoleConfig(**config.to_dict()) == config


@pytest.mark.parametrize("clustered_len", [0, 1, 100, 544])
def test_int_budget_is_a_token_count(clustered_len):
    config = MultipoleConfig(token_budget=128, coarse_budget=256)
    assert config.budget_tokens(clustered_len) == 128
    assert config.coarse_budget_tokens(clustered_len) == 256


@pytest.mark.parametrize(
    ("fraction", "clustered_len", "tokens"),
    [
        pytest.param(0.25, 0, 0, id="empty_region"),
        pytest.param(0.25, 3, 0, id="rounds_down_to_zero"),
        pytest.param(0.25, 544, 136, id="quarter"),
        pytest.param(0.3, 10, 3, id="inexact_fraction"),
        pytest.param(0.999, 1000, 999, id="almost_all"),
    ],
)
def test_float_budget_is_a_fraction(fraction, clustered_len, tokens):
    config = MultipoleConfig(token_budget=fraction, coarse_budget=fraction)
    assert config.budget_tokens(clustered_len) == tokens == int(fraction * clustered_len)
    assert config.coarse_budget_tokens(clustered_len) == tokens
    assert isinstance(config.budget_tokens(clustered_len), int)


@pytest.mark.parametrize(
    ("num_tokens", "clusters"),
    [
        pytest.param(0, 0, id="empty"),
        pytest.param(-3, 0, id="negative"),
        pytest.param(1, 1, id="at_least_one"),
        pytest.param(100, 6, id="rounds_6.25_down"),
        pytest.param(120, 8, id="rounds_7.5_to_even"),
        pytest.param(256, 16, id="exact"),
    ],
)
def test_clusters_for(num_tokens, clusters):
    assert MultipoleConfig(centroid_ratio=1 / 16).clusters_for(num_tokens) == clusters


@pytest.mark.parametrize(
    ("num_clusters", "coarse"),
    [
        pytest.param(0, 0, id="empty"),
        pytest.param(3, 1, id="at_least_one"),
        pytest.param(34, 4, id="rounds_4.25_down"),
        pytest.param(64, 8, id="exact"),
    ],
)
def test_coarse_clusters_for(num_clusters, coarse):
    assert MultipoleConfig(level_ratio=1 / 8).coarse_clusters_for(num_clusters) == coarse
