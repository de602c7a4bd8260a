"""Bad PMSS input: the specific error class, a message naming the bad value, and the model left unchanged
(module tree and state dict identical before / after)."""

from __future__ import annotations

import pytest
from peft import get_peft_model
from pmss_cases import CASES_BY_ID
from pmss_helpers import assert_same_snapshot, snapshot

from structpeft import ConfigError, ShapeError, UnknownStructureError
from structpeft.errors import SelectionError

BAD_CONFIGS = [
    # (config kwargs, error class, regex the message must match)
    pytest.param({"k_in": 10_000, "k_out": 2}, SelectionError, r"k_in=10000", id="k_in-too-large"),
    pytest.param({"k_in": 2, "k_out": 10_000}, SelectionError, r"k_out=10000", id="k_out-too-large"),
    # lin0 (40 x 24) and lin1 (13 x 40) accept 12; only the last targeted layer, lin2 (11 x 13), does not
    pytest.param({"k_in": 12, "k_out": 12}, SelectionError, r"k_in=12.*\(11, 13\)", id="k-too-large-last-layer"),
    pytest.param({"selection": "foo"}, UnknownStructureError, r"'foo'.*deim", id="unknown-strategy"),
    pytest.param({"k_in": 3}, ConfigError, r"k_in=3.*k_out=None", id="k_in-without-k_out"),
    pytest.param({"k_out": 3}, ConfigError, r"k_in=None.*k_out=3", id="k_out-without-k_in"),
    pytest.param({"skeleton_scaling": "foo"}, ConfigError, r"skeleton_scaling='foo'", id="bad-scaling"),
    pytest.param({"k_in": 0, "k_out": 2}, ConfigError, r"k_in=0", id="k_in-zero"),
    pytest.param({"budget": "lora-0"}, ConfigError, r"lora-0", id="bad-budget"),
    pytest.param({"init_weights": "bar"}, ConfigError, r"init_weights='bar'", id="bad-init"),
    pytest.param({"dropout": 1.5}, ConfigError, r"dropout=1.5", id="bad-dropout"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CONFIGS)
def test_bad_config_raises_and_leaves_the_model_unchanged(kwargs, error, message):
    case = CASES_BY_ID["linear-mlp"]
    model = case.model()
    before = snapshot(model)
    with pytest.raises(error, match=message) as info:
        get_peft_model(model, case.config(**kwargs))
    assert isinstance(info.value, ValueError)  # `except ValueError` keeps working
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "changes,error,message",
    [
        pytest.param({"selection": "foo"}, UnknownStructureError, r"'foo'", id="selection"),
        pytest.param({"k_in": 10_000}, ShapeError, r"k_in=10000", id="k_in-too-large"),
        # k_out alone was ignored: the layers were silently sized by the budget instead
        pytest.param({"k_in": None}, ConfigError, r"k_in=None.*k_out=2.*give both or neither", id="k_out-without-k_in"),
        pytest.param(
            {"k_out": None}, ConfigError, r"k_in=2.*k_out=None.*give both or neither", id="k_in-without-k_out"
        ),
        pytest.param(
            {"k_in": None, "k_out": None, "budget": None},
            ConfigError,
            r"budget=None and k_in/k_out unset",
            id="no-size-at-all",
        ),
        # every other field too (each was accepted, or failed inside torch / PEFT, before validate() ran here)
        pytest.param({"compute": "x"}, ConfigError, r"compute='x'.*auto, fast", id="compute"),
        pytest.param({"dropout": -1.0}, ConfigError, r"dropout=-1.0", id="dropout"),
        pytest.param({"alpha": float("nan")}, ConfigError, r"alpha=nan", id="alpha"),
        pytest.param({"seed": 1.5}, ConfigError, r"seed=1.5.*integer", id="seed"),
        pytest.param({"modules_to_save": [1]}, ConfigError, r"modules_to_save=\[1\]", id="modules_to_save"),
        pytest.param({"target_modules": "(["}, ConfigError, r"not a valid regular expression", id="regex"),
    ],
)
def test_values_set_after_construction_are_checked_before_the_model_changes(changes, error, message):
    """A config mutated after ``__post_init__`` is still refused by get_peft_model, before any replacement; sizes
    (k_in / k_out / budget) with the constructor's ConfigError (not a layer sized by something else, nor an error
    about a derived value)."""
    case = CASES_BY_ID["linear-mlp"]
    cfg = case.config(k_in=2, k_out=2)
    for field, value in changes.items():
        setattr(cfg, field, value)
    model = case.model()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        get_peft_model(model, cfg)
    assert_same_snapshot(before, snapshot(model))
    assert cfg.layer_options == {}


def test_unsupported_target_type_names_it():
    from structpeft import UnsupportedLayerError

    case = CASES_BY_ID["conv1d-gpt2"]
    model = case.model()
    before = snapshot(model)
    with pytest.raises(UnsupportedLayerError, match="LayerNorm") as info:
        get_peft_model(model, case.config(target_modules=["ln_1"]))
    assert isinstance(info.value, TypeError)
    assert_same_snapshot(before, snapshot(model))


def test_no_matching_target_lists_what_exists():
    from structpeft import TargetModulesError

    case = CASES_BY_ID["linear-mlp"]
    model = case.model()
    before = snapshot(model)
    with pytest.raises(TargetModulesError, match=r"no_such_layer.*lin0"):
        get_peft_model(model, case.config(target_modules=["no_such_layer"]))
    assert_same_snapshot(before, snapshot(model))


def _load_with_edited_records(tmp_path, edit, match: str) -> None:
    """Save a PMSS adapter, ``edit(options)`` every layer record of its adapter_config.json, and check that loading
    it raises a ConfigError matching ``match`` before the model changes."""
    import json

    from peft import PeftModel

    case = CASES_BY_ID["linear-mlp"]
    get_peft_model(case.model(), case.config(k_in=2, k_out=2)).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for rec in config["layer_options"].values():
        edit(rec["options"])
    path.write_text(json.dumps(config))
    model = case.model()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("missing", ["checksum", "col_idx", "k_in"])
def test_a_saved_skeleton_record_without_its_fields_is_refused(missing, tmp_path):
    """A PMSS layer record in adapter_config.json lacking its selection (edited, foreign): ConfigError naming the
    entry and the missing field before the model changes (was: KeyError from the checksum check)."""
    _load_with_edited_records(
        tmp_path, lambda options: options.pop(missing), rf"layer_options\[.*options lack \['{missing}'\]"
    )


@pytest.mark.parametrize("sketch", [[1.0, 2.0], "abc", [float("nan")] * 9, [True] * 9])
def test_an_edited_sketch_is_refused(sketch, tmp_path):
    _load_with_edited_records(
        tmp_path, lambda options: options.__setitem__("sketch", sketch), r"\['sketch'\] is invalid"
    )
