"""save_pretrained / from_pretrained: files, keys, state dicts; bit-exact reload in a fresh process."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from surm_cases import FRESH_PROCESS_CASES
from surm_testing import assert_state_dicts_equal, save_trained_like, surm_layers

ALPHA = 0.7


def _assert_adapter_folder(folder, model):
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert cfg["peft_type"] == "SURM"
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    layer_paths = set(surm_layers(model))
    assert set(cfg["layer_options"]) == layer_paths
    surm_keys = {k for k in saved if ".surm_" in k}
    # keys: base_model.model.<module path>.surm_op.<param>, the adapter name stripped
    for key in surm_keys:
        assert ".default." not in key, key
        path = key[len("base_model.model.") :].split(".surm_op.")[0]
        assert key.startswith("base_model.model.") and path in layer_paths, key
    n_adapter_params = sum(1 for n, _ in model.named_parameters() if ".surm_" in n)
    assert len(surm_keys) == n_adapter_params
    assert all(".surm_" in k or "classifier" in k for k in saved), sorted(saved)


def test_save_load_round_trip(structure, layer_case, tmp_path):
    inputs = layer_case.inputs()
    model = save_trained_like(structure, layer_case, tmp_path, alpha=ALPHA)
    with torch.no_grad():
        out = layer_case.run(model, inputs)
    _assert_adapter_folder(tmp_path, model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(layer_case.model(), str(tmp_path))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    loaded.eval()
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference mode
    assert_state_dicts_equal(model.state_dict(), loaded.state_dict())
    assert loaded.peft_config["default"].layer_options == model.peft_config["default"].layer_options
    with torch.no_grad():
        assert torch.equal(layer_case.run(loaded, inputs), out)

    trainable = PeftModel.from_pretrained(layer_case.model(), str(tmp_path), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("surm_" in n or "modules_to_save" in n for n in names)
    assert {n for n in names if "surm_" in n} == {n for n, _ in trainable.named_parameters() if "surm_" in n}


@pytest.mark.parametrize("key", [f"{s}-{c}" for s, c in FRESH_PROCESS_CASES])
def test_reload_in_fresh_process_is_bit_exact(fresh_process, key):
    """Saved here, reloaded by PeftModel.from_pretrained in a fresh interpreter onto a base model rebuilt from
    the same seed (see the ``fresh_process`` fixture): the outputs are bit-identical."""
    actual, expected = fresh_process["actual"][key], fresh_process["expected"][key]
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
