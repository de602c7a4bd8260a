"""compute="hybrid": forward and input gradient through W + s·ΔW, the adapter's gradient through the structure.

What makes it worth having is what it does *not* compute: the (out × in) weight gradient gᵀx that autograd through
the folded weight forms. The probe below records the shape and the contracted length of every matmul in the
backward (gᵀx contracts over the N rows; rebuilding a PMSS ΔW = C·U·R in the backward is also (out × in), but
contracts over k), and is checked to see that matrix on the "dense" path, so that it can fail.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from structpeft import PmssConfig, SurmConfig
from structpeft.operators import fused

MATMULS = {"mm", "addmm", "bmm", "matmul"}


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product dispatched inside the context (``shapes``), and with it
    the length of the contracted dimension (``contractions``: (shape, length))."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.contractions: list[tuple[tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.shapes.append(tuple(out.shape))
            left = args[1] if name == "addmm" else args[0]  # addmm(bias, a, b)
            self.contractions.append((tuple(out.shape), left.shape[-1]))
        return out


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 24), nn.Tanh(), nn.Linear(24, 7)).to(dtype)


def _config(method: str, compute: str, **kw):
    if method == "pmss":
        return PmssConfig(target_modules=["0", "2"], k_in=3, k_out=4, init_weights=False, compute=compute, **kw)
    return SurmConfig(structure=method, target_modules=["0", "2"], init_weights=False, compute=compute, **kw)


def _adapter_grads(model, x):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = model(x)
    values = torch.autograd.grad(out.square().sum(), [x, *(model.get_parameter(n) for n in names)])
    return out, dict(zip(["x", *names], values, strict=True))


@pytest.mark.parametrize("method", ["circulant", "toeplitz", "kronecker", "ldr", "pmss"])
def test_hybrid_backward_never_forms_the_weight_gradient(method):
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    shapes = {}
    for compute in ("dense", "hybrid"):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), _config(method, compute))
        loss = model(x).square().sum()
        with MatmulShapes() as probe:
            loss.backward()
        shapes[compute] = set(probe.contractions)
    # the probe sees gᵀx of both layers (contracted over the 5 rows) on the dense fold (so it can fail) and neither
    # on the hybrid path
    weight_grads = {((24, 13), 5), ((7, 24), 5)}
    assert weight_grads <= shapes["dense"]
    transposed = {((13, 24), 5), ((24, 7), 5)}
    assert not (weight_grads | transposed) & shapes["hybrid"], shapes["hybrid"]


@pytest.mark.parametrize("method", ["circulant", "kronecker", "pmss"])
def test_hybrid_calls_param_grads_once_per_layer_and_step(method, monkeypatch):
    calls = []
    real = fused._HybridLinear.backward

    def spy(ctx, grad):
        calls.append(tuple(grad.reshape(-1, grad.shape[-1]).shape))  # rows × out
        return real(ctx, grad)

    monkeypatch.setattr(fused._HybridLinear, "backward", staticmethod(spy))
    model = get_peft_model(_mlp(), _config(method, "hybrid"))
    model(torch.randn(2, 5, 13, dtype=torch.float64)).sum().backward()
    assert sorted(calls) == [(10, 7), (10, 24)]
    with torch.no_grad():  # inference: the cached fold, no custom backward
        model(torch.randn(2, 13, dtype=torch.float64))
    assert len(calls) == 2


def test_several_active_hybrid_adapters_add_up():
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    results = {}
    for compute in ("fast", "hybrid"):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), _config("circulant", compute, block_size=4))
        model.add_adapter("other", _config("kronecker", compute, alpha=-0.7))
        model.base_model.set_adapter(["default", "other"])
        results[compute] = _adapter_grads(model, x)
    out_fast, grads_fast = results["fast"]
    out_hybrid, grads_hybrid = results["hybrid"]
    torch.testing.assert_close(out_hybrid, out_fast, atol=1e-12, rtol=0)
    assert grads_hybrid.keys() == grads_fast.keys()
    assert any(".other." in n for n in grads_fast) and any(".default." in n for n in grads_fast)
    for name, g in grads_fast.items():
        torch.testing.assert_close(grads_hybrid[name], g, atol=1e-10, rtol=1e-10)


def test_trainable_base_weight_falls_back_to_autograd_through_the_fold():
    """A trainable base weight needs gᵀx: the layer then folds with autograd, and W's gradient is exact."""
    x = torch.randn(4, 13, dtype=torch.float64)
    grads = {}
    for compute in ("fast", "hybrid"):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), _config("circulant", compute))
        base = model.base_model.model[0].base_layer
        base.weight.requires_grad_(True)
        base.bias.requires_grad_(True)
        model(x).square().sum().backward()
        grads[compute] = (base.weight.grad, base.bias.grad, model.base_model.model[0].surm_op["default"].weight.grad)
    for got, want in zip(grads["hybrid"], grads["fast"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_hybrid_trains_a_trainable_bias_and_allows_in_place_ops_on_its_output():
    torch.manual_seed(1)
    model = get_peft_model(_mlp(), _config("circulant", "hybrid"))
    layer = model.base_model.model[0]
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 13, dtype=torch.float64)
    y = layer(x)
    y.mul_(2.0)  # the output is a plain tensor, not a view of a custom Function's output
    y.sum().backward()
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((24,), 6.0, dtype=torch.float64))


def test_hybrid_under_bf16_autocast_matches_float32():
    x = torch.randn(6, 13)
    grads = {}
    for autocast in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(torch.float32), _config("circulant", "hybrid"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().sum().backward()
        op = model.base_model.model[0].surm_op["default"]
        assert op.weight.grad.dtype == torch.float32
        grads[autocast] = op.weight.grad
    assert (grads[True] - grads[False]).abs().max() <= 3e-2 * grads[False].abs().max()


def _conv1d_model():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return nn.Sequential(Conv1D(24, 13), nn.Tanh(), Conv1D(7, 24)).double()


@pytest.mark.parametrize("method", ["circulant", "kronecker", "pmss"])
def test_hybrid_on_conv1d_layers_matches_the_fast_path(method):
    """GPT-2's Conv1D keeps its weight transposed (in × out): the fold and the gradients must not care."""
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    results = {}
    for compute in ("fast", "hybrid"):
        torch.manual_seed(1)
        results[compute] = _adapter_grads(get_peft_model(_conv1d_model(), _config(method, compute)), x)
    torch.testing.assert_close(results["hybrid"][0], results["fast"][0], atol=1e-12, rtol=0)
    for name, g in results["fast"][1].items():
        torch.testing.assert_close(results["hybrid"][1][name], g, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["circulant", "pmss"])
def test_hybrid_with_adapter_dropout_runs_the_structured_product(method):
    """Dropout on the adapter input cannot fold: "hybrid" then trains like "fast", with the same random mask."""
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    results = {}
    for compute in ("fast", "hybrid"):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), _config(method, compute, dropout=0.3)).train()
        torch.manual_seed(5)
        results[compute] = _adapter_grads(model, x)
    torch.testing.assert_close(results["hybrid"][0], results["fast"][0], atol=0, rtol=0)
    for name, g in results["fast"][1].items():
        torch.testing.assert_close(results["hybrid"][1][name], g, atol=0, rtol=0)


def test_dense_and_hybrid_adapters_of_one_layer_train_together():
    """A "dense" adapter (gradient through the rebuilt ΔW) and a "hybrid" one (through the structure) on the same
    folded layer: output and every gradient equal the structured products' ("fast")."""
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    results = {}
    for computes in (("fast", "fast"), ("dense", "hybrid"), ("hybrid", "dense")):
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), _config("toeplitz", computes[0]))
        model.add_adapter("other", _config("circulant", computes[1], alpha=-0.7, block_size=4))
        model.base_model.set_adapter(["default", "other"])
        results[computes] = _adapter_grads(model, x)
    out_fast, grads_fast = results[("fast", "fast")]
    for computes in (("dense", "hybrid"), ("hybrid", "dense")):
        out, grads = results[computes]
        torch.testing.assert_close(out, out_fast, atol=1e-12, rtol=0)
        assert grads.keys() == grads_fast.keys()
        for name, g in grads_fast.items():
            torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=1e-10, msg=f"{computes} {name}")


@pytest.mark.parametrize("compute", ["dense", "hybrid"])
def test_changing_an_adapter_between_forward_and_backward_is_an_error(compute):
    """W_eff is rebuilt in the backward from the adapter's parameters; autograd's version check refuses parameters
    changed in place since the forward (as it would have refused the saved W_eff's inputs)."""
    torch.manual_seed(1)
    model = get_peft_model(_mlp(), _config("circulant", compute))
    y = model(torch.randn(3, 13, dtype=torch.float64)).sum()
    with torch.no_grad():
        model.base_model.model[0].surm_op["default"].weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
