"""Registration of SURM with PEFT (fails loudly if a PEFT release moves the mappings); config round trips."""

from __future__ import annotations

import copy
import json
import os
import pickle

import peft
import peft.mapping
import pytest
import torch
from peft import PeftConfig, get_peft_model
from surm_cases import LAYERS_BY_ID, ONE_PER_STRUCTURE, STRUCTURE_CASES

import structpeft
from structpeft import SurmConfig
from structpeft.peft.model import SurmModel


def test_surm_registered_in_peft_mappings():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SURM"] is SurmConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["SURM"] is SurmModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SURM"] == "surm_"
    assert SurmConfig().peft_type == "SURM"


def test_every_registered_structure_is_in_the_matrix():
    """A structure added to the registry without a case in surm_cases.STRUCTURE_CASES would go untested here."""
    missing = set(structpeft.OPERATORS) - {case.structure for case in STRUCTURE_CASES}
    assert not missing, f"add a StructureCase for {sorted(missing)} to tests/surm/surm_cases.py"


def test_loading_needs_import_structpeft(one_structure, fresh_process):
    """A fresh interpreter without ``import structpeft`` cannot load a SURM adapter (PEFT raises); after the
    import it can, and reproduces the output (see the ``fresh_process`` fixture)."""
    key = f"{one_structure.id}-linear-bert"
    assert key in fresh_process["refused"], "PEFT loaded a SURM adapter without structpeft imported"
    assert "SURM" in fresh_process["refused"][key]
    assert torch.equal(fresh_process["actual"][key], fresh_process["expected"][key])


# ---------------------------------------------------------------------------------------- config round trip
def _configs(structure):
    """A fresh config and one filled in by get_peft_model (layer_options recorded)."""
    case = LAYERS_BY_ID["linear-mlp"]
    fresh = structure.config(case, alpha=0.5, dropout=0.1, init_weights=False)
    used = structure.config(case, init_weights=False)
    get_peft_model(case.model(), used)
    assert used.layer_options and not fresh.layer_options
    return fresh, used


def _fields(cfg):
    return {k: v for k, v in cfg.to_dict().items()}


def test_config_to_dict_copy_pickle(structure):
    for cfg in _configs(structure):
        d = cfg.to_dict()
        assert d["structure"] == structure.structure and d["peft_type"] == "SURM"
        assert SurmConfig(**copy.deepcopy(d)) == cfg
        assert copy.deepcopy(cfg) == cfg
        assert copy.copy(cfg) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg
        json.dumps(d, default=sorted)  # JSON-serialisable (sets are written as lists by save_pretrained)


def test_config_json_round_trip_via_peft_config(structure, tmp_path):
    for i, cfg in enumerate(_configs(structure)):
        folder = tmp_path / str(i)
        cfg.save_pretrained(str(folder))
        on_disk = json.load(open(folder / "adapter_config.json"))
        assert on_disk["structure"] == structure.structure
        loaded = PeftConfig.from_pretrained(str(folder))
        assert type(loaded) is SurmConfig
        assert loaded == cfg


def test_config_json_round_trip_via_surm_config(tmp_path):
    """PEFT's config contract: ``cfg.save_pretrained(d); type(cfg).from_pretrained(d) == cfg``. The folder
    holds only adapter_config.json, and SurmConfig.from_pretrained raises AdapterFileError ('has no
    adapter_model.safetensors'). Expected: the weights file is validated only when it is there (or only on the
    PeftModel.from_pretrained path)."""
    for i, cfg in enumerate(_configs(ONE_PER_STRUCTURE[0])):  # the same for every structure
        folder = tmp_path / str(i)
        cfg.save_pretrained(str(folder))
        assert SurmConfig.from_pretrained(str(folder)) == cfg


def test_config_from_saved_adapter_folder(structure, tmp_path):
    _, used = _configs(structure)
    case = LAYERS_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(), structure.config(case, init_weights=False))
    model.save_pretrained(str(tmp_path))
    loaded = SurmConfig.from_pretrained(str(tmp_path))
    # save_pretrained sets inference_mode and auto_mapping in the file
    expected = dict(_fields(model.peft_config["default"]), inference_mode=True)
    assert {k: v for k, v in _fields(loaded).items() if k != "auto_mapping"} == {
        k: v for k, v in expected.items() if k != "auto_mapping"
    }
    assert loaded.layer_options == used.layer_options
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    assert structpeft.__version__


def test_peft_code_that_formats_peft_type_value_works():
    """PEFT formats ``peft_type.value`` in some messages (PeftType is an enum there): our method names answer it,
    so e.g. a mixed model gets PEFT's own "not compatible with PeftMixedModel" error, not an AttributeError."""
    from structpeft import PmssConfig

    configs = (
        SurmConfig(structure="circulant", target_modules=["fc1"]),
        PmssConfig(target_modules=["fc1"], k_in=2, k_out=2),
    )
    for config in configs:
        assert config.peft_type.value == config.peft_type and config.peft_type in ("SURM", "PMSS")
        with pytest.raises(ValueError, match=f"'{config.peft_type}' is not compatible with the `PeftMixedModel`"):
            get_peft_model(LAYERS_BY_ID["linear-mlp"].model(), config, mixed=True)
