"""PMSS forward semantics over selection strategies × layer types: identity at init, the dense reference on
both forward paths, rank / subspace properties of ΔW, merging."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import get_peft_model
from pmss_cases import CASES_BY_ID
from pmss_helpers import (
    assert_close64,
    assert_in_span,
    assert_original_types,
    dense_reference,
    from_module_layout,
    pmss_layers,
    recorded,
    reference_deltas,
    rel_err,
    skeleton_delta,
    weight_t,
)
from torch import nn

from structpeft import MergeError
from structpeft.operators.skeleton import SkeletonOperator

ALPHA = 0.7


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


# ------------------------------------------------------------------------------------------ identity at init
@pytest.mark.parametrize("init", [True, "zero"])
def test_identity_at_init_bit_for_bit(selection, layer_case, init):
    inputs = layer_case.inputs()
    expected = _run(layer_case, layer_case.model(), inputs)
    model = get_peft_model(layer_case.model(), layer_case.config(selection=selection, init_weights=init))
    layers = pmss_layers(model)
    assert layers and all(layer_case.is_target(p) for p in layers)
    for layer in layers.values():
        assert not layer.pmss_op["default"].core.any()
    assert torch.equal(_run(layer_case, model, inputs), expected)


@pytest.mark.parametrize("init", ["gaussian", "random", False])
def test_non_zero_init_changes_the_output(init):
    case = CASES_BY_ID["linear-mlp"]
    inputs = case.inputs()
    base_out = _run(case, case.model(), inputs)
    model = get_peft_model(case.model(), case.config(init_weights=init))
    for layer in pmss_layers(model).values():
        core = layer.pmss_op["default"].core
        assert core.abs().max() > 0
        if init == "gaussian":  # small, for ablations
            assert core.abs().max() < 0.1
    assert not torch.equal(_run(case, model, inputs), base_out)


# ------------------------------------------------------------------------------------------ dense reference
@pytest.mark.parametrize("path", ["gather", "fold", "direct"])
def test_forward_matches_dense_reference_float64(selection, layer_case, path):
    """Model output == base model with W_t + alpha·W_t[:, I]·U·W_t[J, :] (indices from the config), 1e-10.

    gather (compute="fast"): dropout=0, the layer reads W[J, :]x from the base output; fold (compute="dense"):
    ΔW folded into the base weight (Conv2d layers apply ΔW as a convolution either way); direct: dropout>0 in
    eval mode (the dropout is the identity, but the layer takes the path that computes W[J, :]x itself)."""
    dtype = torch.float64
    dropout = 0.25 if path == "direct" else 0.0
    compute = "dense" if path == "fold" else "fast"
    cfg = layer_case.config(selection=selection, init_weights=False, alpha=ALPHA, dropout=dropout, compute=compute)
    model = get_peft_model(layer_case.model(dtype), cfg).eval()
    for layer in pmss_layers(model).values():
        assert isinstance(layer.pmss_dropout["default"], nn.Dropout if path == "direct" else nn.Identity)
        assert layer.pmss_op["default"].compute_mode == compute
        folds = layer._folded_terms() is not None
        assert folds == (path == "fold" and layer_case.kind != "conv2d")
    inputs = layer_case.inputs(dtype)
    actual = _run(layer_case, model, inputs)
    deltas = reference_deltas(layer_case, model, {"default": ALPHA}, dtype)
    expected = dense_reference(layer_case, deltas, inputs, dtype)
    assert_close64(actual, expected)
    base_out = _run(layer_case, layer_case.model(dtype), inputs)
    assert rel_err(actual, base_out) > 1e-4  # the adapter does change the output


@pytest.mark.parametrize("scaling", ["none", "unit"])
def test_operator_paths_match_reference(selection, layer_case, scaling):
    """``op(x)`` (direct) and ``op.forward_from_base(x, x W_tᵀ + b)`` (fast) both equal x·ΔWᵀ, float64."""
    dtype = torch.float64
    atol = 1e-10
    cfg = layer_case.config(selection=selection, init_weights=False, skeleton_scaling=scaling)
    model = get_peft_model(layer_case.model(dtype), cfg)
    base = layer_case.model(dtype)
    g = torch.Generator().manual_seed(5)
    for path, layer in pmss_layers(model).items():
        module = base.get_submodule(path)
        w_t = weight_t(module)
        opts = recorded(cfg, path)
        op = layer.pmss_op["default"]
        assert op.col_idx.tolist() == opts["col_idx"] and op.row_idx.tolist() == opts["row_idx"]
        delta = skeleton_delta(w_t, opts["col_idx"], opts["row_idx"], op.core, 1.0, scaling)
        x = torch.randn(5, 3, w_t.shape[1], generator=g, dtype=dtype)
        expected = x @ delta.T
        with torch.no_grad():
            assert_close64(op(x), expected, atol)
            assert_close64(op.to_dense().to(dtype), delta, atol)
            if layer_case.kind != "conv2d":  # Conv2d layers apply ΔW as a convolution, never via the base output
                base_out = x @ w_t.T + module.bias.detach()
                assert_close64(op.forward_from_base(x, base_out), expected, atol)
                assert_close64(op.add_from_base(base_out, ALPHA), base_out + ALPHA * expected, atol)


@pytest.mark.parametrize("scaling", ["none", "unit"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "core-grad-only"])
def test_fused_add_from_base_gradients_match_the_dense_reference(scaling, with_bias, x_grad):
    """``add_from_base`` (custom backward: ∂base_out = g + scatter_J(s·g C U), ∂U) against autograd through
    base_out + s·x ΔWᵀ with ΔW = C·U·R formed densely; float64, a 3-D input, a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(9, 13, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64) if with_bias else None
    op = SkeletonOperator(w, [0, 5, 12, 7], [8, 1, 3], scaling, bias=bias)
    op.reset_parameters(False)
    x = torch.randn(2, 5, 13, generator=g, dtype=torch.float64, requires_grad=x_grad)
    upstream = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    fused = op.add_from_base(nn.functional.linear(x, w, bias), ALPHA)
    reference = nn.functional.linear(x, w, bias) + ALPHA * x @ op.to_dense().T
    assert_close64(fused, reference, 1e-12)
    wrt = [x, op.core] if x_grad else [op.core]
    got = torch.autograd.grad((fused * upstream).sum(), wrt)
    want = torch.autograd.grad((reference * upstream).sum(), wrt)
    for a, b in zip(got, want, strict=True):
        assert_close64(a, b, 1e-12)
    (gx,) = torch.autograd.grad(op.add_from_base(nn.functional.linear(x, w, bias), ALPHA).sum(), [op.core])
    (rx,) = torch.autograd.grad(
        (nn.functional.linear(x, w, bias) + ALPHA * x @ op.to_dense().T).sum(), [op.core]
    )  # .sum() hands backward an expanded (stride-0) gradient
    assert_close64(gx, rx, 1e-12)


def test_the_layer_adds_the_first_adapter_fused_and_further_ones_on_top():
    case = CASES_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(torch.float64), case.config(init_weights=False, compute="fast"))
    model.add_adapter("second", case.config(init_weights=False, compute="fast", k_in=3, k_out=2))
    layer = pmss_layers(model)["lin0"]
    layer.set_adapter(["default", "second"])
    calls = []
    for name in ("default", "second"):
        op = layer.pmss_op[name]
        real = op.add_from_base
        op.add_from_base = lambda base_out, s, _real=real, _name=name: calls.append(_name) or _real(base_out, s)
    x = torch.randn(4, 24, dtype=torch.float64)
    base = layer.get_base_layer()
    expected = base(x) + sum(layer.scalings[n] * x @ layer.pmss_op[n].to_dense().T for n in ("default", "second"))
    assert_close64(layer(x), expected, 1e-12)
    assert calls == ["default"]  # the second adapter is added to the running sum, not fused onto base_out


def test_unit_scaling_is_exact_in_float64():
    case = CASES_BY_ID["linear-mlp"]
    dtype = torch.float64
    cfg = case.config(init_weights=False, skeleton_scaling="unit")
    model = get_peft_model(case.model(dtype), cfg)
    base = case.model(dtype)
    x = torch.randn(6, 24, dtype=dtype)
    layer = pmss_layers(model)["lin0"]
    opts = recorded(cfg, "lin0")
    w_t = weight_t(base.lin0)
    delta = skeleton_delta(w_t, opts["col_idx"], opts["row_idx"], layer.pmss_op["default"].core, 1.0, "unit")
    with torch.no_grad():
        assert_close64(layer.pmss_op["default"](x), x @ delta.T)


def test_float64_weights_are_not_rounded_to_float32():
    """Same as the dense-reference test, but with weights that are not float32-representable."""
    case = CASES_BY_ID["linear-mlp"]
    dtype = torch.float64
    base = case.model(dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, case.config(init_weights=False, k_in=4, k_out=5))
    inputs = case.inputs(dtype)
    actual = _run(case, model, inputs)
    with torch.no_grad():
        for path, layer in pmss_layers(model).items():
            module = reference.get_submodule(path)
            opts = recorded(model.peft_config["default"], path)
            module.weight += skeleton_delta(
                module.weight.detach().clone(), opts["col_idx"], opts["row_idx"], layer.pmss_op["default"].core
            )
    assert_close64(actual, _run(case, reference, inputs))


# ---------------------------------------------------------------------------------------- rank and subspaces
def _other_indices(chosen: list[int], n: int) -> list[int]:
    """As many indices as ``chosen``, none of them in ``chosen`` (a different skeleton of the same size)."""
    rest = [i for i in range(n) if i not in set(chosen)]
    assert len(rest) >= len(chosen)
    return rest[: len(chosen)]


def test_delta_rank_and_subspaces(selection, layer_case):
    """rank(ΔW) <= min(k_in, k_out); col(ΔW) ⊆ span(W_t[:, I]); row(ΔW) ⊆ span(W_t[J, :]) — and the same
    checks against another index set of the same size fail (so they can detect a wrong skeleton)."""
    dtype = torch.float64
    k_in, k_out = 3, 2
    cfg = layer_case.config(selection=selection, init_weights=False, k_in=k_in, k_out=k_out, alpha=ALPHA)
    model = get_peft_model(layer_case.model(dtype), cfg)
    base = layer_case.model(dtype)
    for path, layer in pmss_layers(model).items():
        module = base.get_submodule(path)
        w_t = weight_t(module)
        opts = recorded(cfg, path)
        i_idx, j_idx = opts["col_idx"], opts["row_idx"]
        assert (len(i_idx), len(j_idx)) == (k_in, k_out)
        # ΔW as the layer adds it to the weight when merging (base layout -> out x in')
        delta = from_module_layout(module, layer.get_delta_weight("default").detach())
        assert delta.shape == w_t.shape and delta.abs().max() > 0
        assert int(torch.linalg.matrix_rank(delta)) <= min(k_in, k_out)
        assert_in_span(delta, w_t[:, i_idx])
        assert_in_span(delta.T, w_t[j_idx, :].T)
        with pytest.raises(AssertionError, match="not inside the span"):
            assert_in_span(delta, w_t[:, _other_indices(i_idx, w_t.shape[1])])
        with pytest.raises(AssertionError, match="not inside the span"):
            assert_in_span(delta.T, w_t[_other_indices(j_idx, w_t.shape[0]), :].T)


# --------------------------------------------------------------------------------------------------- merging
def test_merge_unmerge_and_unload(selection, layer_case):
    inputs = layer_case.inputs()
    cfg = layer_case.config(selection=selection, init_weights=False, alpha=ALPHA)
    model = get_peft_model(layer_case.model(), cfg)
    layers = pmss_layers(model)
    originals = {p: layer.get_base_layer().weight.detach().clone() for p, layer in layers.items()}
    unmerged = _run(layer_case, model, inputs)
    deltas = reference_deltas(layer_case, model, {"default": ALPHA}, torch.float32)

    model.merge_adapter()
    for path, layer in layers.items():
        assert layer.merged
        base = layer.get_base_layer()
        merged_t = from_module_layout(base, base.weight.detach())
        orig_t = from_module_layout(base, originals[path])
        torch.testing.assert_close(merged_t, orig_t + deltas[path], atol=1e-6, rtol=1e-5)
    merged = _run(layer_case, model, inputs)
    assert rel_err(merged, unmerged) < 1e-5

    model.unmerge_adapter()
    for path, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight, originals[path], atol=1e-6, rtol=0)
    assert rel_err(_run(layer_case, model, inputs), unmerged) < 1e-5

    unloaded = model.merge_and_unload()
    assert_original_types(layer_case, unloaded)
    assert rel_err(_run(layer_case, unloaded, inputs), unmerged) < 1e-5


def test_merge_twice_warns_and_changes_nothing():
    case = CASES_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(), case.config(init_weights=False))
    model.merge_adapter()
    weights = {p: layer.get_base_layer().weight.clone() for p, layer in pmss_layers(model).items()}
    with pytest.warns(UserWarning, match="[Aa]lready"):
        model.merge_adapter()
    for p, layer in pmss_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, weights[p])


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_with_non_finite_core_raises_and_leaves_weights(layer_case, bad, which):
    """Every layer is checked before any is merged: a bad core in the last layer leaves the first unmerged too."""
    model = get_peft_model(layer_case.model(), layer_case.config(init_weights=False))
    layers = pmss_layers(model)
    bad_path = list(layers)[0 if which == "first" else -1]
    with torch.no_grad():
        layers[bad_path].pmss_op["default"].core[0, 0] = bad
    weights = {p: layer.get_base_layer().weight.detach().clone() for p, layer in layers.items()}
    message = rf"merging adapter\(s\) \['default'\] into {re.escape(bad_path)} would give non-finite weights"
    with pytest.raises(MergeError, match=message):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(MergeError, match=message):
        model.merge_and_unload(safe_merge=True)
    assert list(pmss_layers(model)) == list(layers)  # nothing was unloaded
    for p, layer in layers.items():
        assert not layer.merged
        assert torch.equal(layer.get_base_layer().weight, weights[p])
