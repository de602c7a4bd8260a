"""SURM-Adapter forward over structures × {square, bottleneck} × layer types: identity at init, the dense
reference h + alpha·act(S h) + bias (float64, 1e-10), and gradcheck."""

from __future__ import annotations

import pytest
import torch
from adapter_cases import ACTIVATIONS, BOTTLENECK, CASES_BY_ID, FORMS, STRUCTURES
from adapter_helpers import assert_close64, reference_output, rel_err, surm_layers
from peft import get_peft_model
from torch import nn

ALPHA = 0.6


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def test_identity_at_init(structure, form, layer_case):
    inputs = layer_case.inputs()
    expected = _run(layer_case, layer_case.model(), inputs)
    cfg = layer_case.config(structure, form, activation="gelu")
    model = get_peft_model(layer_case.model(), cfg)
    layers = surm_layers(model)
    assert layers and set(layers) == set(cfg.layer_options)
    for layer in layers.values():
        block = layer.surm_op["default"]
        n = layer.out_features
        assert set(block.ops) == ({"op"} if form == "square" else {"down", "up"})
        if form == "square":
            assert tuple(block.ops["op"].to_dense().shape) == (n, n)
        else:
            assert tuple(block.ops["down"].to_dense().shape) == (BOTTLENECK, n)
            assert tuple(block.ops["up"].to_dense().shape) == (n, BOTTLENECK)
            assert block.ops["down"].to_dense().abs().max() > 0  # random S_down: zero output through S_up = 0
        assert (block.bias is not None) == layer_case.has_bias
        if block.bias is not None:
            assert tuple(block.bias.shape) == (n,) and not block.bias.any()
    assert torch.equal(_run(layer_case, model, inputs), expected)


@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_forward_matches_dense_reference_float64(structure, form, layer_case, activation):
    dtype = torch.float64
    cfg = layer_case.config(structure, form, activation=activation, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(dtype), cfg)
    inputs = layer_case.inputs(dtype)
    actual = _run(layer_case, model, inputs)
    expected = reference_output(layer_case, model, {"default": (ALPHA, activation)}, inputs, dtype)
    assert_close64(actual, expected)
    assert rel_err(actual, _run(layer_case, layer_case.model(dtype), inputs)) > 1e-4  # not vacuous


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("form", FORMS)
def test_every_activation_matches_reference(activation, form):
    case = CASES_BY_ID["bert-like"]
    dtype = torch.float64
    cfg = case.config("toeplitz", form, activation=activation, init_weights=False, alpha=ALPHA)
    model = get_peft_model(case.model(dtype), cfg)
    inputs = case.inputs(dtype)
    expected = reference_output(case, model, {"default": (ALPHA, activation)}, inputs, dtype)
    assert_close64(_run(case, model, inputs), expected)


def test_dropout_is_applied_to_the_adapter_input_only_in_training():
    case = CASES_BY_ID["bert-like"]
    dtype = torch.float64
    cfg = case.config("circulant", dropout=0.5, init_weights=False, alpha=ALPHA)
    model = get_peft_model(case.model(dtype), cfg)
    layer = next(iter(surm_layers(model).values()))
    x = torch.randn(3, layer.in_features, dtype=dtype)
    with torch.no_grad():
        layer.eval()
        h = layer.get_base_layer()(x)
        block = layer.surm_op["default"]
        s = block.ops["op"].to_dense()
        assert_close64(layer(x), h + ALPHA * h @ s.T + block.bias)
        layer.train()
        torch.manual_seed(1)
        y1 = layer(x)
        torch.manual_seed(1)
        mask_h = nn.functional.dropout(h, 0.5, training=True)
        assert_close64(y1, h + ALPHA * mask_h @ s.T + block.bias)


# -------------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("activation", ["identity", "gelu"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gradcheck_input_and_adapter_parameters(structure, form, activation):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(7, 6)).double()
    kwargs = {"bottleneck": 2} if form == "bottleneck" else {}
    from structpeft import SurmConfig

    cfg = SurmConfig(
        structure=structure,
        placement="adapter",
        adapter_form=form,
        activation=activation,
        target_modules=["0"],
        init_weights=False,
        alpha=0.8,
        **kwargs,
    )
    inner = get_peft_model(base, cfg).base_model.model
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    assert names and all("surm_op" in n for n in names)
    params = tuple(dict(inner.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(inner, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)
