"""The rest of PEFT's test checklist for the SURM-Adapter (placement="adapter"), as the LoRA-placement tests in
tests/surm do it: safe merge (the merge itself, and the NaN refusal that changes nothing), half-precision base
models with float32 adapters (forward, safe merge, unmerge), deleting a merged adapter, training (the loss goes
down, only adapter parameters get gradients and change), ``unload()`` and ``merge_and_unload(adapter_names=...)``.

Each test runs on a few (structure, form, layer case) combinations that together cover every structure, both forms
and every layer type; merges on the Conv2d net target its ungrouped conv0 only (a grouped Conv2d refuses an
output-side merge, see test_adapter_merge.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from adapter_cases import CASES_BY_ID
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

from structpeft import MergeError

ALPHA, ALPHA2 = 0.5, -0.4
F64 = torch.float64


def _case(case_id: str, merging: bool):
    case = CASES_BY_ID[case_id]
    if merging and case.kind == "conv2d":
        return dataclasses.replace(case, target_modules=("conv0",))
    return case


# (structure, form, layer case, activation of the training test): every structure, form and layer type
COMBOS = [
    ("circulant", "square", "bert-like", "identity"),
    ("toeplitz", "bottleneck", "gpt2-conv1d", "gelu"),
    ("kronecker", "square", "llama-like", "gelu"),
    ("ldr", "bottleneck", "conv2d", "identity"),
    ("dense", "square", "gpt2-conv1d", "identity"),
]
COMBO_IDS = [f"{s}-{f}-{c}" for s, f, c, _ in COMBOS]


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


# ------------------------------------------------------------------------------------------------ safe merge
@pytest.mark.parametrize(("structure", "form", "case_id"), [c[:3] for c in COMBOS], ids=COMBO_IDS)
def test_safe_merge_merges_and_unmerge_restores(structure, form, case_id):
    """safe_merge=True: every layer merged, W = (I + M)·W0 = W0 + get_delta_weight, b = (I + M)·b0 + bias, the same
    weights as a plain merge, the unmerged output; unmerge restores W0 and b0."""
    case = _case(case_id, merging=True)
    model = get_peft_model(case.model(F64), case.config(structure, form, init_weights=False, alpha=ALPHA))
    inputs = case.inputs(F64)
    out = _run(case, model, inputs)
    originals = base_params(model)

    model.merge_adapter(safe_merge=True)
    safe = base_params(model)
    for path, layer in surm_layers(model).items():
        assert layer.merged_adapters == ["default"], path
        w0, b0 = originals[path]
        base = layer.get_base_layer()
        expected_w, expected_b, _ = expected_merge(layer, w0, b0, ALPHA)
        assert rel_err(expected_w, weight_2d(base, w0)) > 1e-3, path  # the merge changes the weight
        torch.testing.assert_close(weight_2d(base), expected_w, atol=1e-12 * float(expected_w.abs().max()), rtol=0)
        torch.testing.assert_close(base.weight.detach(), w0 + layer.get_delta_weight("default"), atol=1e-12, rtol=0)
        if b0 is None:
            assert base.bias is None
        else:
            torch.testing.assert_close(base.bias.detach(), expected_b, atol=1e-12, rtol=0)
    assert_close64(_run(case, model, inputs), out, atol=1e-9)

    model.unmerge_adapter()
    assert not any(layer.merged for layer in surm_layers(model).values())
    assert_base_params(model, originals, atol=1e-12)

    model.merge_adapter()  # a plain merge writes the same weights (from the W0 the unmerge recomputed)
    assert_base_params(model, safe, atol=1e-12)


NAN_CASES = [
    pytest.param(*c[:3], where, id=f"{i}-{where}")
    for c, i in zip(COMBOS, COMBO_IDS, strict=True)
    for where in ("operator", "bias")
    if where == "operator" or CASES_BY_ID[c[2]].has_bias
]


@pytest.mark.parametrize(("structure", "form", "case_id", "where"), NAN_CASES)
def test_safe_merge_refuses_a_nan_adapter_and_changes_nothing(structure, form, case_id, where):
    """A NaN in the last layer's adapter (an operator's parameter, or the adapter bias, which only the merged bias
    sees): safe merge and merge_and_unload(safe_merge=True) raise MergeError naming that layer; no layer is
    merged, nothing is unloaded, every weight, bias and adapter parameter is unchanged."""
    case = _case(case_id, merging=True)
    model = get_peft_model(case.model(), case.config(structure, form, init_weights=False, alpha=ALPHA))
    layers = surm_layers(model)
    path, layer = list(layers.items())[-1]
    block = layer.surm_op["default"]
    with torch.no_grad():
        if where == "bias":
            block.bias[0] = float("nan")
        else:
            next(block.ops["op" if form == "square" else "down"].parameters()).view(-1)[0] = float("nan")
    before = snapshot(model)
    message = rf"into {re.escape(path)} would give non-finite weights \(NaN/inf in the adapter\)"
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeError, match=message):
            call(safe_merge=True)
        assert not any(x.merged for x in layers.values())
        assert list(surm_layers(model)) == list(layers)
        after = snapshot(model)
        assert before[0] == after[0] and before[1].keys() == after[1].keys()
        for k, v in before[1].items():  # the NaN we put in compares equal to itself here
            torch.testing.assert_close(after[1][k], v, atol=0, rtol=0, equal_nan=True, msg=k)


# ------------------------------------------------------------------------------------------- half precision
# the conv0 adapter moves the Conv2d net's output by ~3 %, less than twice bf16's 2 % tolerance: a dropped adapter
# could pass there, so the Conv2d net runs in fp16 only (its tolerance ~1 %)
HALF_CASES = [
    pytest.param(*c[:3], dtype, rel, id=f"{i}-{name}")
    for c, i in zip(COMBOS, COMBO_IDS, strict=True)
    for dtype, rel, name in ((torch.bfloat16, 2e-2, "bf16"), (torch.float16, 5e-3, "fp16"))
    if not (c[2] == "conv2d" and dtype == torch.bfloat16)
]


@pytest.mark.parametrize(("structure", "form", "case_id", "dtype", "rel"), HALF_CASES)
def test_half_precision_base_with_float32_adapters_forward_and_merge(structure, form, case_id, dtype, rel):
    """get_peft_model on a bf16 / fp16 base (autocast_adapter_dtype): adapter parameters in float32, output in the
    base dtype and close to the float32 reference (the float32 base with the same adapter, written without PEFT);
    safe merge writes (I + M)·W0 rounded to the base dtype, unmerge restores W0 to the rounding the solve
    amplifies, and the merged and unmerged outputs stay close to the reference.

    The tolerance is ``rel`` or, if larger, twice the error the cast causes in the base model alone."""
    case = _case(case_id, merging=True)
    inputs = case.inputs(dtype)
    with torch.no_grad():
        base32 = case.run(case.model(), case.inputs())
        rel = max(rel, 2 * rel_err(case.run(case.model(dtype), inputs), base32))
    model = get_peft_model(case.model(dtype), case.config(structure, form, init_weights=False, alpha=ALPHA))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "surm_" in name else dtype), name
    reference = reference_output(case, model, {"default": (ALPHA, "identity")}, case.inputs(), torch.float32)
    assert rel_err(reference, base32) > 2 * rel  # an adapter left out would fail the comparisons below
    out = _run(case, model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, reference) <= rel, rel_err(out, reference)

    originals = base_params(model)
    eps = torch.finfo(dtype).eps
    model.merge_adapter(safe_merge=True)
    inverse_norms, merged_scales = {}, {}  # per layer: ‖(I + M)⁻¹‖∞; max |merged W|, max |merged b|
    for path, layer in surm_layers(model).items():
        assert layer.merged_adapters == ["default"], path
        base = layer.get_base_layer()
        assert base.weight.dtype == dtype and (base.bias is None or base.bias.dtype == dtype), path
        w0, b0 = originals[path]
        expected_w, expected_b, i_plus_m = expected_merge(layer, w0, b0, ALPHA)
        # one rounding of (I + M)·W0 to the base dtype
        tol = eps * float(expected_w.abs().max())
        assert float((expected_w - weight_2d(base, w0).double()).abs().max()) > 2 * tol, path
        torch.testing.assert_close(weight_2d(base).double(), expected_w, atol=tol, rtol=0)
        merged_scales[path] = (float(expected_w.abs().max()), None if b0 is None else float(expected_b.abs().max()))
        if b0 is not None:
            torch.testing.assert_close(base.bias.double(), expected_b, atol=eps * merged_scales[path][1], rtol=0)
        inverse_norms[path] = float(torch.linalg.matrix_norm(torch.linalg.inv(i_plus_m), ord=float("inf")))
    merged = _run(case, model, inputs)

    model.unmerge_adapter()
    for path, layer in surm_layers(model).items():
        assert not layer.merged, path
        base = layer.get_base_layer()
        w0, b0 = originals[path]
        w_scale, b_scale = merged_scales[path]
        # W0 = (I + M)⁻¹·W, W rounded (eps/2 · its scale, amplified by ‖(I + M)⁻¹‖∞), then rounded itself
        tol = eps * (inverse_norms[path] * w_scale + float(w0.double().abs().max()))
        torch.testing.assert_close(base.weight.double(), w0.double(), atol=tol, rtol=0)
        if b0 is not None:
            tol_b = eps * (inverse_norms[path] * b_scale + float(b0.double().abs().max()))
            torch.testing.assert_close(base.bias.double(), b0.double(), atol=tol_b, rtol=0)
    unmerged = _run(case, model, inputs)
    # merging rounds (I + M)·W0 to the half dtype, unmerging rounds again: twice the forward tolerance
    for o in (merged, unmerged):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, reference) <= 2 * rel, rel_err(o, reference)


# ------------------------------------------------------------------------------------- managing adapters
@pytest.mark.parametrize("form", ["square", "bottleneck"])
def test_deleting_a_merged_adapter_is_refused_and_changes_nothing(form):
    case = CASES_BY_ID["bert-like"]
    model = get_peft_model(case.model(F64), case.config("circulant", form, init_weights=False, alpha=ALPHA))
    model.add_adapter("other", case.config("toeplitz", form, init_weights=False, alpha=ALPHA2))
    model.set_adapter("other")
    inputs = case.inputs(F64)
    out_other = _run(case, model, inputs)
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot delete adapter.*'other'.*merged"):
        model.delete_adapter("other")
    assert_same_snapshot(before, snapshot(model))
    assert list(model.peft_config) == ["default", "other"]
    assert all(layer.merged_adapters == ["other"] for layer in surm_layers(model).values())
    assert_close64(_run(case, model, inputs), out_other, atol=1e-9)
    # once unmerged it can be deleted
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="was active"):
        model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.surm_op) == ["default"] for layer in surm_layers(model).values())


@pytest.mark.parametrize(("structure", "form", "case_id"), [c[:3] for c in COMBOS], ids=COMBO_IDS)
def test_unload_returns_the_base_model(structure, form, case_id):
    case = CASES_BY_ID[case_id]
    model = get_peft_model(case.model(F64), case.config(structure, form, init_weights=False, alpha=ALPHA))
    inputs = case.inputs(F64)
    base_out = _run(case, case.model(F64), inputs)
    assert rel_err(_run(case, model, inputs), base_out) > 1e-3
    unloaded = model.unload()
    assert_original_types(case, unloaded)
    assert torch.equal(_run(case, unloaded, inputs), base_out)
    for k, v in case.model(F64).state_dict().items():
        assert torch.equal(unloaded.state_dict()[k], v), k


@pytest.mark.parametrize(("structure", "form", "case_id"), [c[:3] for c in COMBOS], ids=COMBO_IDS)
def test_merge_and_unload_named_inactive_adapter(structure, form, case_id):
    """merge_and_unload(adapter_names=["other"]) merges that (inactive) adapter only: the unloaded model computes
    h + A_other(h) at every targeted module, and "default" leaves no trace."""
    case = _case(case_id, merging=True)
    model = get_peft_model(case.model(F64), case.config(structure, form, init_weights=False, alpha=ALPHA))
    model.add_adapter("other", case.config("circulant", "bottleneck", init_weights=False, alpha=ALPHA2))
    assert model.active_adapters == ["default"]
    inputs = case.inputs(F64)
    expected = reference_output(case, model, {"other": (ALPHA2, "identity")}, inputs, F64)
    with_default = reference_output(case, model, {"default": (ALPHA, "identity")}, inputs, F64)
    assert rel_err(expected, with_default) > 1e-3
    unloaded = model.merge_and_unload(adapter_names=["other"])
    assert_original_types(case, unloaded)
    assert_close64(_run(case, unloaded, inputs), expected, atol=1e-9)


# -------------------------------------------------------------------------------------------------- training
def _loss(out: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to a fixed random target of the output's shape."""
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return ((out - target.to(out.dtype)) ** 2).mean()


@pytest.mark.parametrize(("structure", "form", "case_id", "activation"), COMBOS, ids=COMBO_IDS)
def test_training_reduces_the_loss_and_changes_only_adapter_parameters(structure, form, case_id, activation):
    """From the zero-output init: only the adapter parameters are trainable and get gradients, five AdamW steps
    lower the loss, the base model is bit-identical afterwards and every layer's adapter has left zero."""
    case = CASES_BY_ID[case_id]
    model = get_peft_model(case.model(), case.config(structure, form, activation=activation))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and trainable == {n for n in params if "surm_" in n}
    frozen = {n: p.detach().clone() for n, p in params.items() if n not in trainable}
    adapters = {n: params[n].detach().clone() for n in trainable}
    inputs = case.inputs()
    opt = torch.optim.AdamW([params[n] for n in sorted(trainable)], lr=1e-2)
    losses = []
    for step in range(5):
        loss = _loss(case.run(model, inputs))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(params[n].grad is not None for n in trainable)
            assert all(p.grad is None for n, p in params.items() if n not in trainable)
        opt.step()
    with torch.no_grad():
        final = _loss(case.run(model, inputs)).item()
    assert final < losses[0], (losses, final)
    for n, v in frozen.items():
        assert torch.equal(params[n], v), f"base parameter {n} changed"
    for path in surm_layers(model):
        assert any(not torch.equal(params[n], v) for n, v in adapters.items() if f".{path}.surm_op." in n), path
    # the model's output left the base model's
    assert rel_err(_run(case, model, inputs), _run(case, case.model(), inputs)) > 1e-4
