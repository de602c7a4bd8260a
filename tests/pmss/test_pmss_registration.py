"""Registration of PMSS with PEFT (fails loudly if a PEFT release moves the mappings); config round trips.
(That a fresh interpreter without ``import structpeft`` refuses a PMSS adapter is checked in the fresh-process
test of test_pmss_io.py.)"""

from __future__ import annotations

import copy
import json
import pickle

import peft.mapping
from peft import PeftConfig, get_peft_model
from pmss_cases import CASES_BY_ID

from structpeft import PmssConfig
from structpeft.peft.pmss import PmssModel

CASE = CASES_BY_ID["linear-mlp"]


def test_pmss_registered_in_peft_mappings():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["PMSS"] is PmssConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["PMSS"] is PmssModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["PMSS"] == "pmss_"
    assert PmssConfig().peft_type == "PMSS"
    model = get_peft_model(CASE.model(), CASE.config(k_in=3, k_out=2))
    assert type(model.base_model) is PmssModel
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("pmss_" in n for n in trainable)


def _configs():
    """A fresh config (non-default values) and one filled in by get_peft_model (layer_options recorded)."""
    fresh = CASE.config(selection="random", seed=4, k_in=3, k_out=2, alpha=0.5, dropout=0.1, init_weights=False)
    used = CASE.config(selection="qdeim", init_weights=False, compute="dense")
    get_peft_model(CASE.model(), used)
    assert used.layer_options and not fresh.layer_options
    return fresh, used


def test_config_to_dict_copy_pickle():
    for cfg in _configs():
        d = cfg.to_dict()
        assert d["peft_type"] == "PMSS" and d["selection"] == cfg.selection
        assert d["layer_options"] == cfg.layer_options
        assert PmssConfig(**copy.deepcopy(d)) == cfg
        assert copy.deepcopy(cfg) == cfg
        assert copy.copy(cfg) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg
        json.dumps(d, default=sorted)  # JSON-serialisable (sets are written as lists by save_pretrained)


def test_config_json_round_trip_via_peft_config(tmp_path):
    """``PeftConfig.from_pretrained`` of a saved PMSS config (alone, or in a saved adapter's folder) gives a
    PmssConfig equal to it, the per-layer skeleton records included."""
    for i, cfg in enumerate(_configs()):
        folder = tmp_path / str(i)
        cfg.save_pretrained(str(folder))
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PMSS"
        loaded = PeftConfig.from_pretrained(str(folder))
        assert type(loaded) is PmssConfig
        assert loaded == cfg
        assert PmssConfig.from_pretrained(str(folder)) == cfg
    model = get_peft_model(CASE.model(), CASE.config(init_weights=False, compute="dense"))
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert type(loaded) is PmssConfig
    # save_pretrained sets inference_mode and auto_mapping in the file
    expected = dict(model.peft_config["default"].to_dict(), inference_mode=True)
    assert {k: v for k, v in loaded.to_dict().items() if k != "auto_mapping"} == {
        k: v for k, v in expected.items() if k != "auto_mapping"
    }
    assert loaded.layer_options and loaded.layer_options == model.peft_config["default"].layer_options
