"""Bad SURM-Adapter input: the specific error class, a message naming the bad value, the model unchanged."""

from __future__ import annotations

import pytest
from adapter_cases import CASES_BY_ID
from adapter_helpers import assert_same_snapshot, snapshot
from peft import get_peft_model

from structpeft import ConfigError, ShapeError, SurmConfig, UnsupportedLayerError

TARGETS = ["attention.output.dense", "output.dense"]  # n = 24 in the BERT-like model


def _adapter(**kwargs):
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("structure", "circulant")
    return SurmConfig(**kwargs)


BAD = [
    # (config factory, error class, regex the message must match)
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="bottleneck", bottleneck=24),
        ShapeError,
        r"bottleneck=24.*n=24",
        id="bottleneck-equal-to-n",
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="bottleneck", bottleneck=100, structure="dense"),
        ShapeError,
        r"bottleneck=100",
        id="bottleneck-above-n",
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="square", bottleneck=4),
        ConfigError,
        r"bottleneck=4.*square",
        id="bottleneck-with-square",
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="bottleneck"),
        ConfigError,
        r"bottleneck=None",
        id="bottleneck-form-without-width",
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="bottleneck", bottleneck=0),
        ConfigError,
        r"bottleneck=0",
        id="bottleneck-zero",
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", activation="foo"), ConfigError, r"activation='foo'", id="activation-foo"
    ),
    pytest.param(
        lambda: _adapter(placement="lora", activation="gelu"),
        ConfigError,
        r"activation='gelu'.*placement='adapter'",
        id="activation-with-lora-placement",
    ),
    pytest.param(
        lambda: _adapter(placement="lora", adapter_form="bottleneck", bottleneck=4),
        ConfigError,
        r"adapter_form='bottleneck'",
        id="form-with-lora-placement",
    ),
    pytest.param(lambda: _adapter(placement="sideways"), ConfigError, r"placement='sideways'", id="placement-foo"),
    pytest.param(
        lambda: _adapter(placement="adapter", adapter_form="wide"), ConfigError, r"adapter_form='wide'", id="form-foo"
    ),
    pytest.param(
        lambda: _adapter(placement="adapter", target_modules=["LayerNorm"]),
        UnsupportedLayerError,
        r"LayerNorm.*supported types",
        id="layernorm-target",
    ),
]


@pytest.mark.parametrize("make_config,error,message", BAD)
def test_bad_adapter_input_raises_and_leaves_the_model_unchanged(make_config, error, message):
    model = CASES_BY_ID["bert-like"].model()
    before = snapshot(model)
    with pytest.raises(error, match=message) as info:
        get_peft_model(model, make_config())
    assert isinstance(info.value, ValueError if error is not UnsupportedLayerError else TypeError)
    assert_same_snapshot(before, snapshot(model))


def test_unsupported_layer_error_names_the_module_path():
    model = CASES_BY_ID["bert-like"].model()
    with pytest.raises(UnsupportedLayerError, match=r"'encoder\.layer\.0\.attention\.output\.LayerNorm'"):
        get_peft_model(model, _adapter(placement="adapter", target_modules=["attention.output.LayerNorm"]))


def test_bottleneck_too_wide_for_one_of_several_targets_changes_nothing():
    """Conv2d net: conv0 has 6 channels, conv1 has 8; bottleneck 7 fits only conv1 (the later module)."""
    case = CASES_BY_ID["conv2d"]
    model = case.model()
    before = snapshot(model)
    with pytest.raises(ShapeError, match=r"bottleneck=7.*n=6.*conv0"):
        get_peft_model(model, case.config("toeplitz", "bottleneck", bottleneck=7))
    assert_same_snapshot(before, snapshot(model))


def test_bottleneck_form_set_after_construction_without_a_width_is_a_config_error():
    """adapter_form switched to 'bottleneck' on a built config, bottleneck left None: the constructor's
    ConfigError naming bottleneck=None, before any replacement (was a TypeError comparing None with an int)."""
    config = _adapter(placement="adapter", adapter_form="square")
    config.adapter_form = "bottleneck"
    model = CASES_BY_ID["bert-like"].model()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"bottleneck=None.*integer width"):
        get_peft_model(model, config)
    assert_same_snapshot(before, snapshot(model))
