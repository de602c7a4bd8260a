"""Tests of structpeft.budget (trainable-parameter budgets and the PMSS k rule)."""

from __future__ import annotations

import pytest

from structpeft.budget import (
    ParameterBudget,
    budget_to_parameters,
    lora_parameter_count,
    parse_budget,
    pmss_k_for_budget,
)
from structpeft.errors import ConfigError, SelectionError, ShapeError


@pytest.mark.parametrize("text,rank", [("lora-8", 8), ("LoRA-8", 8), ("LORA-16", 16), (" lora-1 ", 1), ("lora-64", 64)])
def test_parse_lora_budget(text, rank):
    assert parse_budget(text) == ParameterBudget("lora", rank)


def test_parse_other_forms():
    assert parse_budget(None) is None
    assert parse_budget(6144) == ParameterBudget("parameters", 6144)
    assert parse_budget("6144") == ParameterBudget("parameters", 6144)
    parsed = parse_budget("lora-4")
    assert parse_budget(parsed) is parsed
    assert str(parsed) == "lora-4" and str(parse_budget(12)) == "12"


@pytest.mark.parametrize("bad", ["lora-0", "lora8", "lora-", "lora-x", "lora--8", "foo", "", "0", "-5", "1.5"])
def test_parse_bad_strings(bad):
    with pytest.raises(ConfigError, match="valid: 'lora-<r>'") as info:
        parse_budget(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, True, False, 2.0, [8]])
def test_parse_bad_values(bad):
    with pytest.raises(ConfigError, match="valid: 'lora-<r>'") as info:
        parse_budget(bad)
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_lora_parameter_count():
    assert lora_parameter_count(384, 384, 8) == 8 * 768
    assert lora_parameter_count(1536, 384, 8) == 8 * 1920
    assert lora_parameter_count(4096, 4096, 8) == 65536
    with pytest.raises(ConfigError, match="r=0"):
        lora_parameter_count(10, 10, 0)
    with pytest.raises(ShapeError, match="in_features=0"):
        lora_parameter_count(10, 0, 4)


def test_budget_to_parameters():
    assert budget_to_parameters("lora-8", 384, 384) == 6144
    assert budget_to_parameters("lora-8", 1536, 384) == 15360
    assert budget_to_parameters(1000, 1536, 384) == 1000
    assert budget_to_parameters(None, 1536, 384) is None
    with pytest.raises(ConfigError, match="'lora8'"):
        budget_to_parameters("lora8", 10, 10)


def test_pmss_k_examples():
    # MiniLM attention 384 x 384 at lora-8: 6144 parameters -> k = 78 (78^2 = 6084 <= 6144 < 79^2)
    assert pmss_k_for_budget(6144, 384, 384) == (78, 78)
    # MiniLM intermediate (out=1536, in=384) at lora-8: 15360 -> k = 123 (123^2 = 15129 <= 15360 < 124^2)
    assert pmss_k_for_budget(15360, 1536, 384) == (123, 123)
    assert pmss_k_for_budget(15360, 384, 1536) == (123, 123)
    # 4096 x 4096 at lora-8: 65536 -> k = 256 exactly
    assert pmss_k_for_budget(budget_to_parameters("lora-8", 4096, 4096), 4096, 4096) == (256, 256)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 99, 100, 101, 6144, 15360, 10**6])
def test_pmss_k_rule_properties(n):
    k_in, k_out = pmss_k_for_budget(n, 4096, 1024)
    assert k_in == k_out
    assert k_in * k_out <= n
    assert 1 <= k_in <= 1023
    if k_in < 1023:  # not clipped: the largest square that fits
        assert (k_in + 1) ** 2 > n


def test_pmss_k_clipping():
    # a large budget on a small layer is clipped to min(out, in) - 1
    assert pmss_k_for_budget(10**6, 16, 64) == (15, 15)
    assert pmss_k_for_budget(10**6, 2, 2) == (1, 1)
    with pytest.raises(SelectionError, match=r"\(1, 64\)"):
        pmss_k_for_budget(100, 1, 64)
    with pytest.raises(ConfigError, match="n_params=0"):
        pmss_k_for_budget(0, 64, 64)
    with pytest.raises(ShapeError, match="out_features=-1"):
        pmss_k_for_budget(10, -1, 64)


# ------------------------------------------------------------------------------------------ audit cases
@pytest.mark.parametrize("kind, value", [("parameters", -5), ("parameters", 0), ("bogus", 3), ("lora", 2.5)])
def test_a_parameter_budget_validates_itself(kind, value):
    from structpeft.budget import ParameterBudget

    with pytest.raises(ConfigError, match=repr(kind) if kind == "bogus" else repr(value)):
        ParameterBudget(kind, value)


def test_a_parameter_budget_is_accepted_by_configs_as_its_string_form():
    from structpeft import PmssConfig, SurmConfig
    from structpeft.budget import ParameterBudget

    assert PmssConfig(budget=ParameterBudget("lora", 2)).budget == "lora-2"  # was a TypeError
    assert SurmConfig(budget=ParameterBudget("parameters", 500)).budget == "500"


def test_kronecker_too_small_names_the_true_minimum():
    from structpeft.operators.kronecker import KroneckerOperator

    with pytest.raises(ConfigError, match="has 20$"):  # (1, 13) factors: 1 + 7 * 1 + ... = 20, not the default's 32
        KroneckerOperator.options_for_budget(7, 13, 10)
    assert KroneckerOperator.options_for_budget(7, 13, 20)


def test_an_adapter_bias_larger_than_the_budget_is_named():
    from peft import get_peft_model
    from torch import nn

    from structpeft import SurmConfig

    model = nn.Sequential(nn.Linear(20, 20))
    with pytest.raises(ConfigError, match=r"budget=10 .* bias alone takes 20"):  # was 'budget of -10 parameters'
        get_peft_model(model, SurmConfig(placement="adapter", target_modules=["0"], budget=10))
