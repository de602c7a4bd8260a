"""Several named adapters over structures × layer types: summing active adapters, switching, deleting,
disabling (also while merged)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import get_peft_model
from surm_cases import LAYERS_BY_ID, ONE_PER_STRUCTURE
from surm_testing import adapter_deltas, assert_close64, assert_same_snapshot, dense_reference, snapshot, surm_layers

from structpeft import BaseModelMismatchError

F64 = torch.float64
ALPHA, ALPHA2 = 0.7, -1.3


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _two_adapters(structure, case):
    model = get_peft_model(case.model(F64), structure.config(case, init_weights=False, alpha=ALPHA))
    # "other": same structure and options, its own random ΔW and scale; no modules_to_save of its own
    model.add_adapter("other", structure.config(case, init_weights=False, alpha=ALPHA2, modules_to_save=None))
    return model


def test_two_active_adapters_are_summed(structure, layer_case):
    """base + alpha·ΔW_default + alpha2·ΔW_other (PEFT's C3A chains them; SURM must sum)."""
    model = _two_adapters(structure, layer_case)
    inputs = layer_case.inputs(F64)
    model.base_model.set_adapter(["default", "other"])
    assert sorted(model.active_adapters) == ["default", "other"]
    out = _run(layer_case, model, inputs)
    deltas = adapter_deltas(model, {"default": ALPHA, "other": ALPHA2})
    assert_close64(out, dense_reference(layer_case, deltas, inputs, F64))

    # merging both active adapters gives the same output, unmerging restores it
    model.merge_adapter()
    assert all(sorted(layer.merged_adapters) == ["default", "other"] for layer in surm_layers(model).values())
    assert_close64(_run(layer_case, model, inputs), out)
    model.unmerge_adapter()
    assert_close64(_run(layer_case, model, inputs), out)


def test_two_active_adapters_of_different_structures(structure, layer_case):
    """ "other" uses another structure (default options) on the same layers: still the sum of both ΔW."""
    i = [s.structure for s in ONE_PER_STRUCTURE].index(structure.structure)
    other = ONE_PER_STRUCTURE[(i + 1) % len(ONE_PER_STRUCTURE)]
    model = get_peft_model(layer_case.model(F64), structure.config(layer_case, init_weights=False, alpha=ALPHA))
    model.add_adapter("other", other.config(layer_case, init_weights=False, alpha=ALPHA2, modules_to_save=None))
    model.base_model.set_adapter(["default", "other"])
    inputs = layer_case.inputs(F64)
    deltas = adapter_deltas(model, {"default": ALPHA, "other": ALPHA2})
    assert_close64(_run(layer_case, model, inputs), dense_reference(layer_case, deltas, inputs, F64))
    for layer in surm_layers(model).values():
        assert layer.surm_op["other"].structure == other.structure


def test_merge_and_unload_named_adapter(structure, layer_case):
    """merge_and_unload(adapter_names=["other"]) merges that adapter only, whatever is active."""
    model = _two_adapters(structure, layer_case)
    inputs = layer_case.inputs(F64)
    expected = dense_reference(layer_case, adapter_deltas(model, {"other": ALPHA2}), inputs, F64)
    unloaded = model.merge_and_unload(adapter_names=["other"])
    assert not surm_layers(unloaded)
    assert_close64(_run(layer_case, unloaded, inputs), expected)


def test_switching_adapters(structure, layer_case):
    model = _two_adapters(structure, layer_case)
    inputs = layer_case.inputs(F64)
    assert model.active_adapters == ["default"]
    out_default = _run(layer_case, model, inputs)
    assert_close64(out_default, dense_reference(layer_case, adapter_deltas(model, {"default": ALPHA}), inputs, F64))

    model.set_adapter("other")
    out_other = _run(layer_case, model, inputs)
    assert (out_other - out_default).abs().max() > 1e-6
    # "other" has no modules_to_save copy: the base classifier (identical to default's unchanged copy) is used
    assert_close64(out_other, dense_reference(layer_case, adapter_deltas(model, {"other": ALPHA2}), inputs, F64))

    model.set_adapter("default")
    assert_close64(_run(layer_case, model, inputs), out_default)


def test_delete_adapter(structure, layer_case):
    model = _two_adapters(structure, layer_case)
    inputs = layer_case.inputs(F64)
    out_default = _run(layer_case, model, inputs)
    assert any(".other." in k for k, _ in model.named_parameters())

    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")

    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not [k for k in model.state_dict() if ".other." in k or k.endswith(".other")]
    for layer in surm_layers(model).values():
        assert "other" not in layer.surm_op
        assert "other" not in layer.surm_scaling
        assert "other" not in layer.surm_dropout
    assert model.active_adapters == ["default"]
    assert_close64(_run(layer_case, model, inputs), out_default)


def test_delete_active_and_merged_adapters(structure, layer_case):
    model = _two_adapters(structure, layer_case)
    inputs = layer_case.inputs(F64)
    model.set_adapter("other")
    out_other = _run(layer_case, model, inputs)

    # a merged adapter cannot be deleted, and the failed call changes nothing
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot delete adapter.*'other'.*merged"):
        model.delete_adapter("other")
    assert_close64(_run(layer_case, model, inputs), out_other)
    assert_same_snapshot(before, snapshot(model))  # module tree, state-dict keys and values
    assert list(model.peft_config) == ["default", "other"]
    assert all(layer.merged_adapters == ["other"] for layer in surm_layers(model).values())
    model.unmerge_adapter()

    # deleting the active adapter activates the remaining one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    assert_close64(
        _run(layer_case, model, inputs),
        dense_reference(layer_case, adapter_deltas(model, {"default": ALPHA}), inputs, F64),
    )


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapter_context(structure, layer_case, merged):
    model = get_peft_model(layer_case.model(F64), structure.config(layer_case, init_weights=False))
    with torch.no_grad():  # make the modules_to_save copies differ from the base modules too
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    inputs = layer_case.inputs(F64)
    base_out = _run(layer_case, layer_case.model(F64), inputs)
    out = _run(layer_case, model, inputs)
    assert (out - base_out).abs().max() > 1e-6
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        disabled = _run(layer_case, model, inputs)
        if merged:
            assert_close64(disabled, base_out)
        else:
            assert torch.equal(disabled, base_out)
    assert_close64(_run(layer_case, model, inputs), out)
    assert not any(layer.disable_adapters for layer in surm_layers(model).values())


def test_unload_returns_base_model(structure, layer_case):
    model = get_peft_model(layer_case.model(F64), structure.config(layer_case, init_weights=False))
    inputs = layer_case.inputs(F64)
    base_out = _run(layer_case, layer_case.model(F64), inputs)
    unloaded = model.unload()
    assert not surm_layers(unloaded)
    assert torch.equal(_run(layer_case, unloaded, inputs), base_out)


def test_load_adapter_as_second_adapter(structure, layer_case, tmp_path):
    """PeftModel.load_adapter next to an adapter of another structure; both active: their ΔW are summed."""
    # no modules_to_save: PEFT allows only one active modules_to_save adapter
    cfg = structure.config(layer_case, init_weights=False, alpha=ALPHA2, modules_to_save=None)
    saved = get_peft_model(layer_case.model(F64), cfg)
    saved.save_pretrained(str(tmp_path))
    i = [s.structure for s in ONE_PER_STRUCTURE].index(structure.structure)
    first = ONE_PER_STRUCTURE[(i + 1) % len(ONE_PER_STRUCTURE)]
    model = get_peft_model(layer_case.model(F64), first.config(layer_case, init_weights=False, alpha=ALPHA))
    model.load_adapter(str(tmp_path), adapter_name="second")
    model.base_model.set_adapter(["default", "second"])
    for path, layer in surm_layers(model).items():
        for name, p in layer.surm_op["second"].named_parameters():
            assert torch.equal(p, surm_layers(saved)[path].surm_op["default"].get_parameter(name))
    inputs = layer_case.inputs(F64)
    deltas = adapter_deltas(model, {"default": ALPHA, "second": ALPHA2})
    assert_close64(_run(layer_case, model, inputs), dense_reference(layer_case, deltas, inputs, F64))


def test_load_adapter_with_other_shapes_changes_nothing(one_structure, layer_case, tmp_path):
    saved = get_peft_model(layer_case.model(), one_structure.config(layer_case, init_weights=False))
    saved.save_pretrained(str(tmp_path))
    model = get_peft_model(layer_case.model(mismatched=True), one_structure.config(layer_case, init_weights=False))
    # the first targeted module (in module order) whose weight shape differs between the two base models
    original = layer_case.model()
    first = next(
        p
        for p, layer in surm_layers(model).items()
        if layer.get_base_layer().weight.shape != original.get_submodule(p).weight.shape
    )
    before = snapshot(model)
    with pytest.raises(BaseModelMismatchError, match=rf"module '{re.escape(first)}' has ΔW shape"):
        model.load_adapter(str(tmp_path), adapter_name="second")
    assert_same_snapshot(before, snapshot(model))
    assert list(model.peft_config) == ["default"]


TARGET_SELECTIONS = {
    # target_modules=None: the model-type preset
    "preset-bert": ("linear-bert", {"target_modules": None}, {"query", "value"}, 4),
    "preset-gpt2": ("conv1d-gpt2", {"target_modules": None}, {"c_attn"}, 2),
    "all-linear": (
        "linear-bert",
        {"target_modules": "all-linear"},
        {"query", "key", "value", "dense", "classifier"},
        14,
    ),
    "regex": (
        "linear-bert",
        {"target_modules": r".*layer\.1\.attention\.self\.(query|key)"},
        {"query", "key"},
        2,
    ),
    "layers-to-transform": (
        "linear-bert",
        {"target_modules": ["query"], "layers_to_transform": [0], "layers_pattern": "layer"},
        {"query"},
        1,
    ),
    "exclude": (
        "linear-bert",
        {"target_modules": ["query", "value"], "exclude_modules": ["value"]},
        {"query"},
        2,
    ),
}


@pytest.mark.parametrize("selection", list(TARGET_SELECTIONS), ids=list(TARGET_SELECTIONS))
def test_target_selection(one_structure, selection):
    case_id, kwargs, leaf_names, count = TARGET_SELECTIONS[selection]
    case = LAYERS_BY_ID[case_id]
    model = get_peft_model(case.model(), one_structure.config(case, modules_to_save=None, **kwargs))
    layers = surm_layers(model)
    assert len(layers) == count and {p.rsplit(".", 1)[-1] for p in layers} == leaf_names
    assert set(model.peft_config["default"].layer_options) == set(layers)
