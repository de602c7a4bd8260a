"""Several PMSS adapters: two active adapters (different selection strategies) are summed, and set_adapter /
disable_adapter / delete_adapter behave as in PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from pmss_helpers import (
    assert_close64,
    assert_original_types,
    assert_same_snapshot,
    dense_reference,
    pmss_layers,
    recorded,
    reference_deltas,
    rel_err,
    snapshot,
)

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


def test_a_merged_adapter_cannot_be_deleted_and_the_failed_call_changes_nothing(layer_case):
    dtype = torch.float64
    model = _two_adapter_model(layer_case, dtype)
    inputs = layer_case.inputs(dtype)
    model.set_adapter("other")
    model.merge_adapter()
    merged_out = _run(layer_case, model, inputs)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['other'\] while they are merged"):
        model.delete_adapter("other")
    assert_same_snapshot(before, snapshot(model))  # module tree, state dict keys and values
    assert list(model.peft_config) == ["default", "other"] and model.active_adapters == ["other"]
    assert all(layer.merged_adapters == ["other"] for layer in pmss_layers(model).values())
    assert torch.equal(_run(layer_case, model, inputs), merged_out)
    model.unmerge_adapter()  # unmerged, it can be deleted
    with pytest.warns(UserWarning, match="was active"):
        model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_unload_returns_the_base_model(layer_case):
    dtype = torch.float64
    model = _two_adapter_model(layer_case, dtype)
    model.base_model.set_adapter(["default", "other"])
    inputs = layer_case.inputs(dtype)
    base_out = _run(layer_case, layer_case.model(dtype), inputs)
    assert rel_err(_run(layer_case, model, inputs), base_out) > 1e-4  # the adapters change the output
    unloaded = model.unload()
    assert_original_types(layer_case, unloaded)
    assert torch.equal(_run(layer_case, unloaded, inputs), base_out)


def test_merge_and_unload_named_adapter(layer_case):
    """merge_and_unload(adapter_names=["other"]) merges that adapter only ("default" is the active one)."""
    dtype = torch.float64
    model = _two_adapter_model(layer_case, dtype)
    inputs = layer_case.inputs(dtype)
    expected = {}
    for name, alpha in ALPHAS.items():
        deltas = reference_deltas(layer_case, model, {name: alpha}, dtype)
        expected[name] = dense_reference(layer_case, deltas, inputs, dtype)
    assert rel_err(expected["other"], expected["default"]) > 1e-4
    assert model.active_adapters == ["default"]
    unloaded = model.merge_and_unload(adapter_names=["other"])
    assert_original_types(layer_case, unloaded)
    torch.testing.assert_close(_run(layer_case, unloaded, inputs), expected["other"], atol=1e-9, rtol=0)


@pytest.mark.filterwarnings("ignore:Adapter cannot be set when the model is merged")
@pytest.mark.parametrize("compute", ["fast", "dense"])
def test_adapter_added_while_another_is_merged_takes_its_skeleton_from_the_unmerged_weight(
    layer_case, compute, tmp_path
):
    """PMSS gathers C = W₀[:, I], R = W₀[J, :] from the pretrained weight: adding (or loading) an adapter while
    another one is merged into W must give the adapter a clean base model would give it, exactly as LoRA does."""
    from peft import PeftModel

    dtype = torch.float64
    kw = {"init_weights": False, "compute": compute, "modules_to_save": None, "k_in": 3, "k_out": 4}
    clean = get_peft_model(layer_case.model(dtype), layer_case.config(selection="random", seed=5, **kw))
    model = get_peft_model(layer_case.model(dtype), layer_case.config(selection="random", seed=1, **kw), "a0")
    model.base_model.merge_adapter()  # W = W₀ + ΔW_a0
    torch.manual_seed(0)
    model.add_adapter("b", layer_case.config(selection="random", seed=5, **kw))
    for path, layer in pmss_layers(model).items():
        b, ref = layer.pmss_op["b"], pmss_layers(clean)[path].pmss_op["default"]
        assert b.col_idx.tolist() == ref.col_idx.tolist() and b.row_idx.tolist() == ref.row_idx.tolist()
        assert_close64(b.cols, ref.cols)
        assert_close64(b.rows, ref.rows)
        checksums = (recorded(model.peft_config["b"], path), recorded(clean.peft_config["default"], path))
        assert checksums[0]["checksum"] == checksums[1]["checksum"]
        with torch.no_grad():
            b.core.copy_(ref.core)
    model.base_model.set_adapter("b")  # unmerges a0
    inputs = layer_case.inputs(dtype)
    unmerged = _run(layer_case, model, inputs)
    assert_close64(unmerged, _run(layer_case, clean, inputs))
    model.base_model.merge_adapter(["b"])
    assert_close64(_run(layer_case, model, inputs), unmerged)  # merged equals unmerged
    model.base_model.unmerge_adapter()

    # the saved adapter loads onto a clean base model, and loading it while another adapter is merged works too
    model.save_pretrained(str(tmp_path), selected_adapters=["b"])
    loaded = PeftModel.from_pretrained(layer_case.model(dtype), str(tmp_path / "b"), adapter_name="b")
    assert_close64(_run(layer_case, loaded, inputs), unmerged)
    model.base_model.set_adapter("a0")
    model.base_model.merge_adapter()
    model.load_adapter(str(tmp_path / "b"), adapter_name="b2")
    model.base_model.set_adapter("b2")
    assert_close64(_run(layer_case, model, inputs), unmerged)
