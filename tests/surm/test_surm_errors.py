"""Bad input: each error is the specific class, its message names the bad value, and the model is unchanged.

The model check (``snapshot``): the module tree (names and types) and the whole state dict are identical
before and after the failed call.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from surm_cases import BAD_OPTIONS, LAYERS_BY_ID, ONE_PER_STRUCTURE, STRUCTURE_CASES
from surm_testing import assert_same_snapshot, snapshot
from torch import nn

from structpeft import (
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    SurmConfig,
    TargetModulesError,
    UnknownStructureError,
    UnsupportedLayerError,
)
from testkit import tiny_bert_cls

WEIGHTS = "adapter_model.safetensors"


def _fails_without_change(model, call, error, *needles):
    """``call()`` raises ``error`` whose message contains every needle; ``model`` is left unchanged."""
    before = snapshot(model)
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_same_snapshot(before, snapshot(model))
    return info.value


# ------------------------------------------------------------------------------------------------ config
def test_unknown_structure(layer_case):
    model = layer_case.model()

    def call():
        return get_peft_model(model, SurmConfig(structure="foo", target_modules=list(layer_case.target_modules)))

    err = _fails_without_change(model, call, UnknownStructureError, "'foo'", "circulant")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("alpha", float("nan"), r"alpha=nan"),
        ("placement", "x", r"placement='x'.*lora, adapter"),
        ("compute", "gpu", r"compute='gpu'.*auto, fast, dense, hybrid"),
        ("dropout", 1.5, r"dropout=1.5"),
        ("dropout", "0.1", r"dropout='0.1'"),
        ("fold_inference", "x", r"fold_inference='x'"),
        ("compute_tokens", 0, r"compute_tokens=0"),
        ("adapter_form", "wide", r"adapter_form='wide'.*square, bottleneck"),
        ("target_modules", 3, r"target_modules=3"),
        ("target_modules", "([", r"target_modules='\(\[' is not a valid regular expression"),
        ("layers_to_transform", "abc", r"layers_to_transform='abc'"),
        ("layers_pattern", 3, r"layers_pattern=3"),
        ("modules_to_save", [1], r"modules_to_save=\[1\]"),
        ("block_size", 4, r"budget=.*block_size=4.*give one of them"),
    ],
)
@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter"])
def test_values_set_after_construction_are_checked_before_the_model_changes(field, value, message, how):
    """PEFT's documented pattern is to change a config after construction: get_peft_model and add_adapter check it
    again (ConfigError naming the value), before any layer changes; a failed add_adapter leaves no trace."""
    case = LAYERS_BY_ID["linear-mlp"]
    config = SurmConfig(structure="circulant", target_modules=list(case.target_modules), budget="lora-2")
    setattr(config, field, value)
    model = case.model()
    if how == "get_peft_model":
        _fails_without_change(model, lambda: get_peft_model(model, config), ConfigError, field)
        with pytest.raises(ConfigError, match=message):
            get_peft_model(model, config)
        return
    peft_model = get_peft_model(model, SurmConfig(structure="circulant", target_modules=list(case.target_modules)))
    _fails_without_change(peft_model, lambda: peft_model.add_adapter("b", config), ConfigError, field)
    assert list(peft_model.peft_config) == ["default"]
    assert not any(".b." in key for key in peft_model.state_dict())


def test_a_numpy_integer_budget_is_stored_as_an_int_and_saves(tmp_path):
    import json

    import numpy as np

    case = LAYERS_BY_ID["linear-mlp"]
    config = SurmConfig(structure="circulant", target_modules=list(case.target_modules), budget=np.int64(40))
    assert type(config.budget) is int and config.budget == 40
    get_peft_model(case.model(), config).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["budget"] == 40


def test_bad_structure_options(one_structure, layer_case):
    """Out-of-range values, and options that do not apply to the structure (surm_cases.BAD_OPTIONS)."""
    model = layer_case.model()
    for options, needle in BAD_OPTIONS[one_structure.structure]:
        kwargs = {"structure": one_structure.structure, "target_modules": list(layer_case.target_modules)}

        def call(options=options, kwargs=kwargs):
            return get_peft_model(model, SurmConfig(**kwargs, **options))

        err = _fails_without_change(model, call, ConfigError, needle)
        assert isinstance(err, ValueError)


@pytest.mark.parametrize(("field", "value"), [("dropout", 1.5), ("dropout", -0.1), ("alpha", float("nan"))])
def test_bad_common_values(structure, layer_case, field, value):
    model = layer_case.model()

    def call():
        return get_peft_model(model, structure.config(layer_case, **{field: value}))

    _fails_without_change(model, call, ConfigError, f"{field}={value!r}")


def test_factor_shape_that_does_not_fit_a_layer():
    """The MLP's 1 -> 5 layer (in = 1) cannot take L of shape 2 x 3: refused before any layer is replaced
    (lin0 and lin1, which come first, would fit)."""
    case = LAYERS_BY_ID["linear-mlp"]
    model = case.model()
    cfg = SurmConfig(structure="kronecker", factor_shape=[2, 3], target_modules=list(case.target_modules))
    _fails_without_change(model, lambda: get_peft_model(model, cfg), ConfigError, "factor_shape", "(5 x 1)")


# ----------------------------------------------------------------------------------------------- targets
def test_target_modules_matching_nothing(structure, layer_case):
    model = layer_case.model()
    cfg = structure.config(layer_case, target_modules=["no_such_layer"])
    existing = layer_case.target_modules[0].rsplit(".", 1)[-1]
    err = _fails_without_change(
        model, lambda: get_peft_model(model, cfg), TargetModulesError, "no_such_layer", existing
    )
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    ("targets", "path", "type_name"),
    [
        (["word_embeddings"], "bert.embeddings.word_embeddings", "Embedding"),
        # query (supported, comes first) must not be replaced before the LayerNorm is refused
        (
            ["query", "attention.output.LayerNorm"],
            "bert.encoder.layer.0.attention.output.LayerNorm",
            "LayerNorm",
        ),
    ],
    ids=["embedding", "query+layernorm"],
)
def test_unsupported_layer_type(one_structure, targets, path, type_name):
    case = LAYERS_BY_ID["linear-bert"]
    model = case.model()
    cfg = one_structure.config(case, target_modules=targets)
    err = _fails_without_change(model, lambda: get_peft_model(model, cfg), UnsupportedLayerError, path, type_name)
    assert isinstance(err, TypeError)


# ---------------------------------------------------------------------------------------------- loading
def _saved_adapter(structure, case, folder) -> str:
    model = get_peft_model(case.model(), structure.config(case, init_weights=False))
    model.save_pretrained(folder)
    return str(folder)


def _edit_config(folder, edit) -> str:
    import json

    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(folder)


def _first_record(config):
    return config["layer_options"][sorted(config["layer_options"])[0]]


LAYER_OPTION_EDITS = {
    "shape-not-a-pair": (lambda c: _first_record(c).__setitem__("shape", "x"), "shape='x'"),
    "shape-missing": (lambda c: _first_record(c).pop("shape"), "shape=None"),
    "options-a-list": (lambda c: _first_record(c).__setitem__("options", [1, 2]), "options=[1, 2]"),
    "role-options-a-list": (lambda c: _first_record(c).__setitem__("options", {"delta": [1]}), "operator role"),
    "compute-unknown": (lambda c: _first_record(c).__setitem__("compute", {"delta": "gpu"}), "'gpu'"),
    "records-a-list": (lambda c: c.__setitem__("layer_options", [1]), "layer_options=[1]"),
}


@pytest.mark.parametrize("edit", sorted(LAYER_OPTION_EDITS))
def test_edited_layer_options_are_refused_naming_the_entry(edit, tmp_path):
    """An edited or foreign layer_options in adapter_config.json: ConfigError naming the entry, model untouched
    (was: ValueError / KeyError / TypeError / AttributeError from inside the build, or a silent load)."""
    case = LAYERS_BY_ID["linear-mlp"]
    change, needle = LAYER_OPTION_EDITS[edit]
    folder = _edit_config(_saved_adapter(ONE_PER_STRUCTURE[0], case, tmp_path / "adapter"), change)
    base = case.model()
    _fails_without_change(base, lambda: PeftModel.from_pretrained(base, folder), ConfigError, "layer_options", needle)


def test_our_config_class_on_a_lora_folder_names_what_the_folder_holds(tmp_path):
    case = LAYERS_BY_ID["linear-mlp"]
    get_peft_model(case.model(), LoraConfig(target_modules=list(case.target_modules))).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFileError, match="holds a LORA adapter.*not a SURM one"):
        SurmConfig.from_pretrained(str(tmp_path))


def test_load_onto_base_model_with_other_shapes(structure, layer_case, tmp_path):
    folder = _saved_adapter(structure, layer_case, tmp_path / "adapter")
    other = layer_case.model(mismatched=True)
    expected = {k: m for k, m in layer_case.model().named_modules()}
    # the first targeted module whose ΔW shape differs
    differing = [k for k, m in other.named_modules() if k in expected and _shape(m) != _shape(expected[k])]
    assert differing
    err = _fails_without_change(
        other, lambda: PeftModel.from_pretrained(other, folder), BaseModelMismatchError, differing[0]
    )
    assert isinstance(err, AdapterFileError) and isinstance(err, ValueError)


def test_load_onto_base_model_lacking_recorded_layers(tmp_path):
    """layer_options records layer.1 modules that the base model does not have: BaseModelMismatchError naming
    them, model untouched (not a silently dropped part of the adapter)."""
    case = LAYERS_BY_ID["linear-bert"]
    folder = _saved_adapter(ONE_PER_STRUCTURE[0], case, tmp_path / "adapter")  # the same for every structure
    torch.manual_seed(case.seed)
    smaller = tiny_bert_cls(num_hidden_layers=1).eval()
    _fails_without_change(
        smaller, lambda: PeftModel.from_pretrained(smaller, folder), BaseModelMismatchError, "layer.1"
    )


def test_load_onto_base_model_with_extra_target_layers(tmp_path):
    """The base model has targeted modules (layer.2) that layer_options does not record: BaseModelMismatchError
    naming them, model untouched (not a fresh adapter built from the saved config for them)."""
    case = LAYERS_BY_ID["linear-bert"]
    folder = _saved_adapter(ONE_PER_STRUCTURE[0], case, tmp_path / "adapter")  # the same for every structure
    torch.manual_seed(case.seed)
    larger = tiny_bert_cls(num_hidden_layers=3).eval()
    with warnings.catch_warnings():  # scoped: a bare filterwarnings would leak into later tests
        warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
        _fails_without_change(
            larger, lambda: PeftModel.from_pretrained(larger, folder), BaseModelMismatchError, "layer.2"
        )


def _shape(module):
    w = getattr(module, "weight", None)
    return None if w is None else tuple(w.shape)


def _truncate(folder, case, structure, tmp_path):
    path = os.path.join(folder, WEIGHTS)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return [WEIGHTS]


def _foreign_lora(folder, case, structure, tmp_path):
    with warnings.catch_warnings():  # LoRA's notes on Conv1D (fan_in_fan_out) and grouped convs
        warnings.simplefilter("ignore", UserWarning)
        lora_cfg = LoraConfig(target_modules=list(case.target_modules), init_lora_weights=False)
        get_peft_model(case.model(), lora_cfg).save_pretrained(tmp_path / "lora")
    shutil.copy(tmp_path / "lora" / WEIGHTS, os.path.join(folder, WEIGHTS))
    assert any("lora_" in k for k in load_file(os.path.join(folder, WEIGHTS)))
    return [WEIGHTS, "surm_"]


def _with_nan(folder, case, structure, tmp_path):
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    key = sorted(k for k in tensors if ".surm_" in k)[-1]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return [WEIGHTS, key]


def _missing_layer(folder, case, structure, tmp_path):
    """Drop the tensors of one recorded layer from the file."""
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    layer = sorted(k for k in tensors if ".surm_" in k)[0].split(".surm_")[0]
    save_file({k: v for k, v in tensors.items() if not k.startswith(layer + ".")}, path, metadata={"format": "pt"})
    return [WEIGHTS, repr(layer[len("base_model.model.") :])]


def _pickle_only(folder, case, structure, tmp_path):
    path = os.path.join(folder, WEIGHTS)
    torch.save(load_file(path), os.path.join(folder, "adapter_model.bin"))
    os.remove(path)
    return ["adapter_model.bin"]


CORRUPTIONS = {
    "truncated": _truncate,
    "foreign-lora": _foreign_lora,
    "nan": _with_nan,
    "missing-layer": _missing_layer,
    "pickle-only": _pickle_only,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_bad_adapter_file(one_structure, layer_case, tmp_path, corrupt):
    folder = _saved_adapter(one_structure, layer_case, tmp_path / "adapter")
    needles = corrupt(folder, layer_case, one_structure, tmp_path)
    base = layer_case.model()
    _fails_without_change(base, lambda: PeftModel.from_pretrained(base, folder), AdapterFileError, *needles)


def _swap_weights_file(config_structure, file_structure, case, tmp_path) -> str:
    """A folder with ``config_structure``'s adapter_config.json and ``file_structure``'s weights."""
    folder = _saved_adapter(config_structure, case, tmp_path / "adapter")
    other = _saved_adapter(file_structure, case, tmp_path / "other")
    shutil.copy(os.path.join(other, WEIGHTS), os.path.join(folder, WEIGHTS))
    return folder


def test_adapter_file_with_other_options_of_the_structure(one_structure, tmp_path):
    """A weights file whose tensor shapes do not fit the config's layer_options (saved with the structure's
    other option set) is refused with AdapterFileError before the model is touched (not a size-mismatch
    RuntimeError from load_state_dict after injection)."""
    layer_case = LAYERS_BY_ID["linear-mlp"]
    sibling = next(s for s in STRUCTURE_CASES if s.structure == one_structure.structure and s != one_structure)
    folder = _swap_weights_file(one_structure, sibling, layer_case, tmp_path)
    base = layer_case.model()
    _fails_without_change(base, lambda: PeftModel.from_pretrained(base, folder), AdapterFileError, WEIGHTS)


def test_adapter_file_of_another_structure(one_structure, tmp_path):
    """A SURM weights file of another structure (other parameter names, or the same names with other shapes)
    is refused with AdapterFileError before the model is touched, rather than loading with freshly initialised
    layers or failing in load_state_dict after injection."""
    layer_case = LAYERS_BY_ID["linear-mlp"]
    names = [s.structure for s in ONE_PER_STRUCTURE]
    other = ONE_PER_STRUCTURE[(names.index(one_structure.structure) + 1) % len(names)]
    folder = _swap_weights_file(one_structure, other, layer_case, tmp_path)
    base = layer_case.model()
    with warnings.catch_warnings():  # scoped: a bare filterwarnings would leak into later tests
        warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
        _fails_without_change(base, lambda: PeftModel.from_pretrained(base, folder), AdapterFileError, WEIGHTS)


@pytest.mark.parametrize("name", ["circ", "weight", "core", "ops"])
def test_adapter_name_colliding_with_an_operator_tensor_is_refused(name):
    """PEFT strips adapter names from state-dict keys by position: an adapter called like a tensor inside our
    adapter modules would be saved under a confused key, so the name is refused before anything changes."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6))
    model = get_peft_model(base, SurmConfig(structure="ldr", target_modules=["0"]))
    before = [k for k, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=repr(name)):
        model.add_adapter(name, SurmConfig(structure="ldr", target_modules=["0"]))
    assert [k for k, _ in model.named_modules()] == before
    assert name not in model.peft_config
    with pytest.raises(ConfigError, match=repr(name)):
        get_peft_model(nn.Sequential(nn.Linear(6, 6)), SurmConfig(target_modules=["0"]), adapter_name=name)


class _AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_multihead_attention_out_proj_is_skipped_by_all_linear_and_refused_by_name():
    """nn.MultiheadAttention reads out_proj.weight itself (never its forward): an adapter there has no effect.
    'all-linear' leaves it out; naming it is an UnsupportedLayerError before the model changes."""
    torch.manual_seed(0)
    model = get_peft_model(_AttentionModel(), SurmConfig(structure="circulant", target_modules="all-linear"))
    assert sorted(model.peft_config["default"].layer_options) == ["fc"]
    base = _AttentionModel()
    _fails_without_change(
        base,
        lambda: get_peft_model(base, SurmConfig(structure="circulant", target_modules=["out_proj", "fc"])),
        UnsupportedLayerError,
        "'mha.out_proj'",
        "MultiheadAttention",
    )


@pytest.mark.parametrize(
    "filters,needle",
    [
        ({"layers_to_transform": [5], "layers_pattern": "layer"}, "layers_to_transform=[5]"),
        ({"exclude_modules": ["query"]}, "exclude_modules="),
    ],
)
def test_filters_that_remove_every_match_are_named(filters, needle):
    """target_modules matched, but layers_to_transform / exclude_modules removed every match: the message says so
    (it blamed target_modules and listed the very names it had matched)."""
    model = tiny_bert_cls(num_hidden_layers=2).eval()
    _fails_without_change(
        model,
        lambda: get_peft_model(model, SurmConfig(structure="circulant", target_modules=["query"], **filters)),
        TargetModulesError,
        "matched 2 module(s)",
        needle,
        "removed every one of them",
    )
