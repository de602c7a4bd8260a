"""Forward semantics over structures × layer types: identity at init, the dense reference, merging."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import get_peft_model
from surm_testing import (
    adapter_deltas,
    add_delta_,
    assert_close64,
    assert_original_types,
    assert_rel_close,
    assert_same_snapshot,
    dense_reference,
    recorded_operator_options,
    snapshot,
    surm_layers,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from structpeft import ConfigError, MergeError
from structpeft.peft.surm_layer import SurmWrapper

ALPHA = 0.7
DTYPE_TOL = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
]


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _assert_matches(actual, expected, dtype):
    if dtype == torch.float64:
        assert_close64(actual, expected)
    else:
        assert actual.dtype == expected.dtype == dtype
        assert_rel_close(actual, expected)


def _expected_delta_shape(module: nn.Module) -> list[int]:
    """(out, in') of ΔW, written from the layer types' weight layouts."""
    w = module.weight
    if isinstance(module, Conv1D):
        return [w.shape[1], w.shape[0]]
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels // module.groups * w.shape[2] * w.shape[3]]
    return [module.out_features, module.in_features]


# ------------------------------------------------------------------------------------------- wrapping
def test_every_target_wrapped_once_with_recorded_options(structure, layer_case):
    base = layer_case.model()
    originals = {k: copy.deepcopy(m) for k, m in base.named_modules()}
    cfg = structure.config(layer_case)
    model = get_peft_model(base, cfg)
    layers = surm_layers(model)
    expected_paths = {k for k in originals if any(k == t or k.endswith("." + t) for t in layer_case.target_modules)}
    assert set(layers) == expected_paths
    assert set(cfg.layer_options) == expected_paths
    for path, layer in layers.items():
        assert type(layer) is SurmWrapper  # one wrapper class for every structure and layer type
        assert list(layer.surm_op) == ["default"]
        assert layer.surm_scaling["default"] == cfg.alpha
        shape = _expected_delta_shape(originals[path])
        assert cfg.layer_options[path]["shape"] == shape
        op = layer.surm_op["default"]
        assert list(op.to_dense().shape) == shape
        assert recorded_operator_options(cfg.layer_options[path]) == op.options
        # the options the user set are the ones used (resolved as the operator resolves them on its own)
        assert type(op)(*shape, **structure.options).options == op.options
        # the parameter count is the structure's closed formula
        assert sum(p.numel() for p in op.parameters()) == type(op).num_parameters(*shape, **op.options)
    n_save = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    n_surm = sum(p.numel() for n, p in model.named_parameters() if "surm_" in n)
    assert model.get_nb_trainable_parameters()[0] == n_surm + n_save


# --------------------------------------------------------------------------------------- 1. identity
def test_identity_at_init_is_bit_exact(structure, layer_case):
    inputs = layer_case.inputs()
    expected = _run(layer_case, layer_case.model(), inputs)
    model = get_peft_model(layer_case.model(), structure.config(layer_case, init_weights=True))
    actual = _run(layer_case, model, inputs)
    assert torch.equal(actual, expected)
    for layer in surm_layers(model).values():
        assert torch.count_nonzero(layer.surm_op["default"].to_dense()) == 0


# ------------------------------------------------------------------------------- 2. dense reference
@pytest.mark.parametrize("dtype", DTYPE_TOL)
def test_output_equals_dense_reference(structure, layer_case, dtype):
    """forward = the base model with W + alpha·ΔW (ΔW = op.to_dense()), computed without PEFT."""
    cfg = structure.config(layer_case, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(dtype), cfg)
    inputs = layer_case.inputs(dtype)
    actual = _run(layer_case, model, inputs)
    deltas = adapter_deltas(model, {"default": ALPHA})
    for delta in deltas.values():
        assert delta.dtype == dtype and torch.count_nonzero(delta) > 0
    expected = dense_reference(layer_case, deltas, inputs, dtype)
    _assert_matches(actual, expected, dtype)
    # the adapter does something
    base_out = _run(layer_case, layer_case.model(dtype), inputs)
    assert (actual - base_out).abs().max() > 1e-4 * base_out.abs().max()


def test_get_delta_weight_is_alpha_delta_in_base_layout(structure, layer_case):
    cfg = structure.config(layer_case, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(torch.float64), cfg)
    for path, delta in adapter_deltas(model, {"default": ALPHA}).items():
        layer = surm_layers(model)[path]
        zero = copy.deepcopy(layer.get_base_layer())
        with torch.no_grad():
            zero.weight.zero_()
        add_delta_(zero, delta)
        actual = layer.get_delta_weight("default")
        assert actual.shape == zero.weight.shape
        assert_close64(actual, zero.weight.detach())


def test_adapter_dropout(structure, layer_case):
    """dropout > 0: inactive in eval mode (output = dense reference), on the adapter input in training."""
    cfg = structure.config(layer_case, init_weights=False, alpha=ALPHA, dropout=0.5)
    model = get_peft_model(layer_case.model(torch.float64), cfg)
    inputs = layer_case.inputs(torch.float64)
    out = _run(layer_case, model, inputs)
    deltas = adapter_deltas(model, {"default": ALPHA})
    assert_close64(out, dense_reference(layer_case, deltas, inputs, torch.float64))
    layers = surm_layers(model).values()
    for layer in layers:
        assert isinstance(layer.surm_dropout["default"], nn.Dropout) and layer.surm_dropout["default"].p == 0.5
        layer.surm_dropout["default"].train()  # only the adapter dropout: the base model stays in eval mode
    dropped = _run(layer_case, model, inputs)
    assert torch.isfinite(dropped).all() and (dropped - out).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------- 3. merge
def _base_weights(model) -> dict[str, torch.Tensor]:
    return {p: layer.get_base_layer().weight.detach().clone() for p, layer in surm_layers(model).items()}


@pytest.mark.parametrize("dtype", DTYPE_TOL)
def test_merge_unmerge_and_unload(structure, layer_case, dtype):
    cfg = structure.config(layer_case, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(dtype), cfg)
    inputs = layer_case.inputs(dtype)
    out = _run(layer_case, model, inputs)
    base_out = _run(layer_case, layer_case.model(dtype), inputs)
    weights = _base_weights(model)

    model.merge_adapter()
    assert all(layer.merged for layer in surm_layers(model).values())
    merged_out = _run(layer_case, model, inputs)
    _assert_matches(merged_out, out, dtype)
    assert (merged_out - base_out).abs().max() > 1e-4 * base_out.abs().max()
    assert any(not torch.equal(w, weights[p]) for p, w in _base_weights(model).items())

    model.unmerge_adapter()
    assert not any(layer.merged for layer in surm_layers(model).values())
    _assert_matches(_run(layer_case, model, inputs), out, dtype)
    for path, w in _base_weights(model).items():
        torch.testing.assert_close(w, weights[path], atol=1e-6, rtol=0)

    # safe merge: every layer merged, W = W0 + get_delta_weight (a few roundings at the scale of W0 + ΔW),
    # unmerge restores W0 (to the same tolerance)
    model.merge_adapter(safe_merge=True)
    _assert_matches(_run(layer_case, model, inputs), out, dtype)
    tols = {}
    for path, layer in surm_layers(model).items():
        assert layer.merged and layer.merged_adapters == ["default"], path
        delta = layer.get_delta_weight("default").detach()
        expected = weights[path] + delta
        tols[path] = 4 * torch.finfo(dtype).eps * float(expected.abs().max())
        assert float(delta.abs().max()) > tols[path], path  # a merge that did nothing would fail below
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected, atol=tols[path], rtol=0)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in surm_layers(model).values())
    for path, w in _base_weights(model).items():
        torch.testing.assert_close(w, weights[path], atol=tols[path], rtol=0)

    unloaded = model.merge_and_unload()
    assert_original_types(layer_case, unloaded)
    _assert_matches(_run(layer_case, unloaded, inputs), out, dtype)


def test_merging_twice_warns_and_changes_nothing(structure, layer_case):
    model = get_peft_model(layer_case.model(torch.float64), structure.config(layer_case, init_weights=False))
    inputs = layer_case.inputs(torch.float64)
    model.merge_adapter()
    weights = _base_weights(model)
    out = _run(layer_case, model, inputs)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    for path, w in _base_weights(model).items():
        assert torch.equal(w, weights[path]), path
    assert all(layer.merged_adapters == ["default"] for layer in surm_layers(model).values())
    assert torch.equal(_run(layer_case, model, inputs), out)


@pytest.mark.parametrize("which", ["first", "last"])
def test_safe_merge_refuses_nan_adapter(structure, layer_case, which):
    model = get_peft_model(layer_case.model(), structure.config(layer_case, init_weights=False))
    layers = surm_layers(model)
    path = list(layers)[0 if which == "first" else -1]
    layer = layers[path]
    with torch.no_grad():
        next(layer.surm_op["default"].parameters()).fill_(float("nan"))
    weights = _base_weights(model)

    with pytest.raises(MergeError) as info:
        model.merge_adapter(safe_merge=True)
    assert isinstance(info.value, ValueError)
    assert path in str(info.value)
    assert torch.equal(layer.get_base_layer().weight, weights[path])
    # every layer is checked before any is merged: a NaN in the last layer leaves the earlier ones unmerged too
    assert not any(x.merged for x in layers.values())
    for p, w in _base_weights(model).items():
        assert torch.equal(w, weights[p]), p
    with pytest.raises(MergeError, match=rf"into {re.escape(path)} would give non-finite weights \(NaN/inf in the"):
        model.merge_and_unload(safe_merge=True)
    assert list(surm_layers(model)) == list(layers)  # nothing was unloaded either
    for p, w in _base_weights(model).items():
        assert torch.equal(w, weights[p]), p


def test_safe_merge_names_a_non_finite_base_weight_as_the_cause(structure, layer_case):
    model = get_peft_model(layer_case.model(), structure.config(layer_case, init_weights=False))
    layer = next(iter(surm_layers(model).values()))
    with torch.no_grad():
        layer.get_base_layer().weight.view(-1)[0] = float("inf")
    with pytest.raises(MergeError, match="base layer's weights already hold NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged


CONV_VARIANTS = {
    "stride2-dilation2-circular-nobias": (
        (3, 6, 3),
        {"stride": 2, "dilation": 2, "padding": 2, "padding_mode": "circular", "bias": False},
    ),
    "kernel1x3-same-groups3": ((3, 6, (1, 3)), {"padding": "same", "groups": 3}),
}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS), ids=list(CONV_VARIANTS))
def test_conv2d_variants_match_dense_reference(structure, variant):
    """Conv2d settings beyond the convnet's (stride, dilation, padding modes, no bias, 1 x 3 kernels)."""
    args, kwargs = CONV_VARIANTS[variant]

    def build():
        torch.manual_seed(7)
        return nn.Sequential(nn.Conv2d(*args, **kwargs)).to(torch.float64).eval()

    cfg = structure.config_for(["0"], init_weights=False, alpha=ALPHA)
    model = get_peft_model(build(), cfg)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = build()
    add_delta_(reference[0], adapter_deltas(model, {"default": ALPHA})["0"])
    with torch.no_grad():
        expected = reference(x)
        assert_close64(model(x), expected)
        model.merge_adapter()
        assert_close64(model(x), expected)


@pytest.mark.parametrize("budget", ["lora-8", 400], ids=["lora-8", "int-400"])
def test_budget(one_structure, layer_case, budget):
    """budget: every layer gets at most that many parameters ('lora-8': 8·(in + out)); the resolved options are
    recorded, the adapter starts as the identity and its forward matches the dense reference."""
    cfg = one_structure.config(layer_case, budget=budget)
    if layer_case.id in one_structure.budget_too_small:  # refused, naming the budget, before the model changes
        base = layer_case.model(torch.float64)
        before = snapshot(base)
        first = next(m for name, m in base.named_modules() if name.endswith(tuple(layer_case.target_modules)))
        limit = 8 * sum(first.weight.shape) if budget == "lora-8" else budget  # Conv1D's weight is (in, out)
        with pytest.raises(ConfigError, match=rf"target module '.*': budget of {limit} parameters is too small"):
            get_peft_model(base, cfg)
        assert_same_snapshot(before, snapshot(base))
        return
    model = get_peft_model(layer_case.model(torch.float64), cfg)
    for path, layer in surm_layers(model).items():
        op = layer.surm_op["default"]
        limit = 8 * (op.in_features + op.out_features) if budget == "lora-8" else budget
        assert 0 < sum(p.numel() for p in op.parameters()) <= limit, path
        assert recorded_operator_options(cfg.layer_options[path]) == op.options
    inputs = layer_case.inputs(torch.float64)
    assert torch.equal(_run(layer_case, model, inputs), _run(layer_case, layer_case.model(torch.float64), inputs))
    with torch.no_grad():
        for layer in surm_layers(model).values():
            layer.surm_op["default"].reset_parameters(False)
    deltas = adapter_deltas(model, {"default": cfg.alpha})
    assert_close64(_run(layer_case, model, inputs), dense_reference(layer_case, deltas, inputs, torch.float64))
