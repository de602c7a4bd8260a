"""Merging SURM-Adapters: identity activation merges as W <- (I + M) W, b <- (I + M) b + bias (alone, two
active adapters together, next to a LoRA-placement SURM adapter); non-linear adapters refuse with MergeError."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adapter_cases import CASES_BY_ID, LAYER_CASES
from adapter_helpers import (
    assert_base_params,
    assert_close64,
    assert_original_types,
    assert_same_snapshot,
    base_params,
    expected_merge,
    reference_output,
    rel_err,
    snapshot,
    surm_layers,
    weight_2d,
)
from peft import get_peft_model

from structpeft import MergeError, SurmConfig

ALPHA = 0.5


def _merge_cases():
    """The layer cases; for the Conv2d net only its ungrouped conv0 (a grouped conv refuses output-side merges,
    see test_grouped_conv2d_refuses_adapter_merge)."""
    for case in LAYER_CASES:
        if case.kind != "conv2d":
            yield pytest.param(case, id=case.id)
            continue
        yield pytest.param(dataclasses.replace(case, target_modules=("conv0",)), id="conv2d-groups1")


def test_grouped_conv2d_refuses_adapter_merge():
    """(I + M)·W mixes output channels across the groups of a grouped Conv2d, which its kernel cannot hold:
    merging raises MergeError naming the groups, and nothing changes; the unmerged forward still works."""
    case = next(c for c in LAYER_CASES if c.kind == "conv2d")
    model = get_peft_model(case.model(), case.config("circulant", "square", init_weights=False, alpha=ALPHA))
    inputs = case.inputs()
    before = _run(case, model, inputs)
    originals = base_params(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeError, match="groups=2"):
            merge()
        assert_base_params(model, originals, atol=0)
        assert not any(layer.merged for layer in surm_layers(model).values())
    torch.testing.assert_close(_run(case, model, inputs), before, atol=0, rtol=0)


MERGE_CASES = list(_merge_cases())


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


@pytest.mark.parametrize("layer_case", MERGE_CASES)
def test_identity_adapter_merge_unmerge_unload(structure, form, layer_case):
    """float32: merged == unmerged output, merged W = (I + M) W0 and b = (I + M) b0 + bias, unmerge restores
    weight and bias (1e-6), merge_and_unload gives the base types and the same outputs."""
    cfg = layer_case.config(structure, form, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(), cfg)
    inputs = layer_case.inputs()
    unmerged = _run(layer_case, model, inputs)
    originals = base_params(model)

    model.merge_adapter()
    for p, layer in surm_layers(model).items():
        assert layer.merged
        assert ("op" in layer.surm_op["default"].ops) == (form == "square"), p
        w0, b0 = originals[p]
        base = layer.get_base_layer()
        expected_w, expected_b, _ = expected_merge(layer, w0, b0, ALPHA)
        torch.testing.assert_close(weight_2d(base).double(), expected_w, atol=1e-5, rtol=1e-5)
        if b0 is not None:
            torch.testing.assert_close(base.bias.double(), expected_b, atol=1e-5, rtol=1e-5)
    assert rel_err(_run(layer_case, model, inputs), unmerged) < 1e-5

    model.unmerge_adapter()
    assert_base_params(model, originals, atol=1e-6)
    assert rel_err(_run(layer_case, model, inputs), unmerged) < 1e-5

    unloaded = model.merge_and_unload()
    assert_original_types(layer_case, unloaded)
    assert rel_err(_run(layer_case, unloaded, inputs), unmerged) < 1e-5


@pytest.mark.parametrize("case", MERGE_CASES)
def test_two_active_adapters_sum_and_merge_together(case):
    dtype = torch.float64
    model = get_peft_model(case.model(dtype), case.config("circulant", init_weights=False, alpha=0.6))
    model.add_adapter("b", case.config("kronecker", "bottleneck", init_weights=False, alpha=-0.3))
    model.base_model.set_adapter(["default", "b"])
    inputs = case.inputs(dtype)
    expected = reference_output(
        case, model, {"default": (0.6, "identity"), "b": (-0.3, "identity")}, inputs, dtype
    )  # h + A1(h) + A2(h): both adapters see the module's own output h (summed, not chained)
    assert_close64(_run(case, model, inputs), expected)
    originals = base_params(model)
    model.merge_adapter(["default", "b"])
    assert_close64(_run(case, model, inputs), expected, atol=1e-9)
    model.unmerge_adapter()
    assert_base_params(model, originals, atol=1e-10)
    assert_close64(_run(case, model, inputs), expected)
    # merging one after the other gives the same
    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="[Aa]lready"):
        model.merge_adapter(["b"])
    assert_close64(_run(case, model, inputs), expected, atol=1e-9)
    model.unmerge_adapter()
    assert_base_params(model, originals, atol=1e-10)


def test_two_nonlinear_adapters_are_summed():
    case = CASES_BY_ID["llama-like"]
    dtype = torch.float64
    model = get_peft_model(case.model(dtype), case.config("ldr", activation="silu", init_weights=False, alpha=0.6))
    model.add_adapter("b", case.config("dense", "bottleneck", activation="tanh", init_weights=False, alpha=0.4))
    model.base_model.set_adapter(["default", "b"])
    inputs = case.inputs(dtype)
    expected = reference_output(case, model, {"default": (0.6, "silu"), "b": (0.4, "tanh")}, inputs, dtype)
    assert_close64(_run(case, model, inputs), expected)


@pytest.mark.parametrize("case", MERGE_CASES)
def test_lora_placement_and_adapter_placement_on_one_layer(case):
    """y = W x + b + s_l ΔW x + A(W x + b); merged: W <- W + s_l ΔW + M W, b <- b + M b + bias."""
    dtype = torch.float64
    lora = SurmConfig(structure="circulant", target_modules=list(case.target_modules), init_weights=False, alpha=0.4)
    model = get_peft_model(case.model(dtype), lora)
    model.add_adapter("ad", case.config("toeplitz", init_weights=False, alpha=0.7))
    model.base_model.set_adapter(["default", "ad"])
    inputs = case.inputs(dtype)
    expected = reference_output(case, model, {"ad": (0.7, "identity")}, inputs, dtype, lora={"default": 0.4})
    assert_close64(_run(case, model, inputs), expected)
    originals = base_params(model)
    model.merge_adapter(["default", "ad"])
    assert_close64(_run(case, model, inputs), expected, atol=1e-9)
    model.unmerge_adapter()
    assert_base_params(model, originals, atol=1e-10)
    unloaded = model.merge_and_unload()
    assert_original_types(case, unloaded)
    assert_close64(_run(case, unloaded, inputs), expected, atol=1e-9)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "tanh"])
def test_nonlinear_adapter_refuses_to_merge_and_changes_nothing(activation, layer_case):
    model = get_peft_model(
        layer_case.model(), layer_case.config("circulant", activation=activation, init_weights=False)
    )
    inputs = layer_case.inputs()
    before_out = _run(layer_case, model, inputs)
    before = snapshot(model)
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(MergeError, match=f"activation='{activation}'.*non-linear") as info:
            call()
        assert isinstance(info.value, ValueError)
        assert_same_snapshot(before, snapshot(model))
    with pytest.raises(MergeError, match="non-linear"):  # the layer-level merge refuses as well
        next(iter(surm_layers(model).values())).merge()
    assert_same_snapshot(before, snapshot(model))
    assert not any(layer.merged for layer in surm_layers(model).values())
    assert torch.equal(_run(layer_case, model, inputs), before_out)


def test_linear_adapter_merges_while_an_inactive_nonlinear_adapter_exists():
    case = CASES_BY_ID["bert-like"]
    dtype = torch.float64
    model = get_peft_model(case.model(dtype), case.config("circulant", init_weights=False, alpha=ALPHA))
    model.add_adapter("nl", case.config("toeplitz", activation="gelu", init_weights=False))
    assert model.active_adapters == ["default"]
    inputs = case.inputs(dtype)
    expected = _run(case, model, inputs)
    model.merge_adapter(["default"])
    assert_close64(_run(case, model, inputs), expected, atol=1e-9)
