"""Several PMSS adapters: two active adapters (different selection strategies) are summed, and set_adapter /
disable_adapter / delete_adapter behave as in PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from pmss_helpers import assert_close64, dense_reference, pmss_layers, recorded, reference_deltas

PAIRS = {  # layer case -> (strategy of "default", strategy of "other"): every strategy appears
    "linear-mlp": ("deim", "random"),
    "conv1d-gpt2": ("qdeim", "norm"),
    "conv2d-convnet": ("leverage", "deim"),
    "linear-bert": ("norm", "qdeim"),
}
ALPHAS = {"default": 0.7, "other": -0.4}


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _two_adapter_model(case, dtype=torch.float64):
    sel_a, sel_b = PAIRS[case.id]
    model = get_peft_model(case.model(dtype), case.config(selection=sel_a, init_weights=False, alpha=ALPHAS["default"]))
    # PEFT allows one active modules_to_save copy at a time, so only "default" holds one (BERT's classifier)
    other = case.config(
        selection=sel_b, init_weights=False, alpha=ALPHAS["other"], k_in=3, k_out=4, modules_to_save=None
    )
    model.add_adapter("other", other)
    return model


def test_two_active_adapters_are_summed(layer_case):
    dtype = torch.float64
    model = _two_adapter_model(layer_case, dtype)
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    for path, layer in pmss_layers(model).items():
        assert tuple(layer.pmss_op["other"].core.shape) == (3, 4)
        a, b = recorded(model.peft_config["default"], path), recorded(model.peft_config["other"], path)
        assert (a["col_idx"], a["row_idx"]) != (b["col_idx"], b["row_idx"])
    inputs = layer_case.inputs(dtype)
    deltas = reference_deltas(layer_case, model, ALPHAS, dtype)
    expected = dense_reference(layer_case, deltas, inputs, dtype)
    assert_close64(_run(layer_case, model, inputs), expected)
    # merged together: same output
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(_run(layer_case, model, inputs), expected, atol=1e-9, rtol=0)
    model.unmerge_adapter()
    assert_close64(_run(layer_case, model, inputs), expected)


def test_set_disable_delete_adapter(layer_case):
    dtype = torch.float64
    model = _two_adapter_model(layer_case, dtype)
    inputs = layer_case.inputs(dtype)
    base_out = _run(layer_case, layer_case.model(dtype), inputs)

    def expected(*names):
        deltas = reference_deltas(layer_case, model, {n: ALPHAS[n] for n in names}, dtype)
        return dense_reference(layer_case, deltas, inputs, dtype)

    only_default, only_other = expected("default"), expected("other")
    assert model.active_adapter == "default"
    assert_close64(_run(layer_case, model, inputs), only_default)
    model.set_adapter("other")
    assert_close64(_run(layer_case, model, inputs), only_other)
    with model.disable_adapter():
        assert torch.equal(_run(layer_case, model, inputs), base_out)
    assert_close64(_run(layer_case, model, inputs), only_other)  # restored on exit
    model.set_adapter("default")
    assert_close64(_run(layer_case, model, inputs), only_default)
    # disabling a merged adapter unmerges it and gives the base output
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_run(layer_case, model, inputs), base_out, atol=1e-9, rtol=0)

    with pytest.raises(ValueError, match="no_such_adapter"):
        model.delete_adapter("no_such_adapter")
    with pytest.warns(UserWarning, match="was active"):
        model.delete_adapter("default")  # the active one
    assert list(model.peft_config) == ["other"]
    for layer in pmss_layers(model).values():
        assert list(layer.pmss_op) == ["other"]
    model.set_adapter("other")
    assert_close64(_run(layer_case, model, inputs), only_other)
