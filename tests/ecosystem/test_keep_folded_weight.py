"""``keep_folded_weight=True``: a folded layer (compute "dense" / "hybrid") builds W + s·ΔW once per training step,
in the forward, and holds it (and a dense adapter's ΔW graph) for the backward instead of building it again there.

The switch trades memory for time only: outputs and every gradient are equal to the default's bit for bit, for
every ΔW-placed method (the four SURM structures and PMSS) on both folded paths; W_eff is what the backward holds
in addition; the flag is validated, saved and loaded, asks the compute="auto" timing to time the paths as they will
run, and keeps W_eff only where every folded adapter of the layer asks for it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from eco_models import MLP, MLP_DELTA_METHODS, seeded
from peft import PeftModel, get_peft_model

import structpeft.peft.layer as layer_module
from structpeft import ConfigError, PmssConfig, SurmConfig
from structpeft.operators import dispatch
from structpeft.operators.fused import hybrid_linear
from testkit import saved_non_parameter_tensors

METHODS = MLP_DELTA_METHODS
CASES = [(m, c) for m in METHODS for c in ("dense", "hybrid")]
IDS = [f"{m}-{c}" for m, c in CASES]


@pytest.fixture
def keeps(monkeypatch):
    """The ``keep`` argument of every hybrid_linear call of an adapted layer."""
    calls: list[bool] = []
    real = layer_module.hybrid_linear

    def spy(*args, keep=False, **kwargs):
        calls.append(keep)
        return real(*args, keep=keep, **kwargs)

    monkeypatch.setattr(layer_module, "hybrid_linear", spy)
    return calls


def _model(method: str, compute: str, keep: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(3)
    return get_peft_model(seeded(MLP).to(dtype), METHODS[method](compute=compute, keep_folded_weight=keep))


def _x(n: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 10, dtype=dtype, generator=torch.Generator().manual_seed(7))


def _step(model, x):
    """Output, input gradient and the adapter parameters' gradients of one backward of a random cotangent."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(11)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize(("method", "compute"), CASES, ids=IDS)
def test_training_is_bit_for_bit_the_default(method, compute, keeps):
    """float32 (not float64), where a different order of operations would show in the last bits."""
    expected = _step(_model(method, compute, keep=False), _x())
    assert keeps and not any(keeps)  # the default rebuilds
    keeps.clear()
    y, gx, grads = _step(_model(method, compute, keep=True), _x())
    assert keeps and all(keeps)  # both folded layers held their W_eff
    assert torch.equal(y, expected[0]) and torch.equal(gx, expected[1])
    assert grads.keys() == expected[2].keys() and len(grads) >= 2
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{name}: a zero gradient cannot show a difference"
        assert torch.equal(g, expected[2][name]), name


@pytest.mark.parametrize("compute", ["dense", "hybrid"])
@pytest.mark.parametrize("structure", ["circulant", "toeplitz"])
def test_the_folded_weight_is_what_the_backward_holds_in_addition(structure, compute):
    """One Linear(64 -> 48) and 3 input rows: the default keeps x (3 × 64) only; keep adds W_eff (48 × 64)."""

    def model(keep: bool):
        torch.manual_seed(0)
        config = SurmConfig(
            structure=structure, target_modules=["0"], init_weights=False, compute=compute, keep_folded_weight=keep
        )
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 48)).double(), config)

    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    default, kept = saved_non_parameter_tensors(model(False), x), saved_non_parameter_tensors(model(True), x)
    assert sum(math.prod(s) for s in default) <= x.numel(), default
    assert (48, 64) in kept, kept
    assert sum(math.prod(s) for s in kept) >= x.numel() + 48 * 64


def test_keep_holds_the_folded_weight_only_where_every_folded_adapter_asks(keeps):
    torch.manual_seed(3)
    model = get_peft_model(seeded(MLP), METHODS["surm-kronecker"](compute="dense", keep_folded_weight=True))
    model.add_adapter("other", METHODS["surm-circulant"](compute="hybrid", keep_folded_weight=False))
    model.base_model.set_adapter(["default", "other"])
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".default" in name or ".other" in name:
            p.requires_grad_(True)
    _, _, grads = _step(model, _x())
    assert keeps == [False, False]  # fc1 and fc2: "other" does not ask
    assert any(".other" in n for n in grads) and any(".default" in n for n in grads)


def test_a_retained_graph_runs_its_backward_twice_with_keep():
    """The held ΔW graph is retained with the outer graph: a second backward adds the same gradients again."""
    from structpeft.operators import OPERATORS

    torch.manual_seed(0)
    op = OPERATORS["toeplitz"](12, 10)
    op.reset_parameters(False)
    w, x = torch.randn(12, 10), torch.randn(5, 10)
    y = hybrid_linear(x, w, None, [(op, 0.5)], structured=[False], keep=True)
    g = torch.randn(5, 12)
    y.backward(g, retain_graph=True)
    first = op.weight.grad.clone()
    y.backward(g)
    torch.testing.assert_close(op.weight.grad, 2 * first, rtol=1e-6, atol=0)


def test_auto_times_the_folded_paths_as_they_will_run(monkeypatch):
    """compute="auto" with keep_folded_weight times the folds with keep (and caches that answer apart)."""
    seen = []

    def fake_time_paths(op, out_features, in_features, device, tokens, reps, paths, keep=False):
        seen.append(keep)
        return "dense"

    monkeypatch.setattr(dispatch, "_time_paths", fake_time_paths)
    monkeypatch.setattr(dispatch, "_CACHE", {})
    for method in ("surm-circulant", "pmss"):
        seen.clear()
        for keep in (True, False, True):
            get_peft_model(seeded(MLP), METHODS[method](compute="auto", keep_folded_weight=keep))
        assert seen == [True, True, False, False], (method, seen)  # fc1 and fc2; the second True from the cache


@pytest.mark.parametrize("method", ["surm-ldr", "pmss"])
def test_the_flag_is_saved_and_loaded(method, tmp_path, keeps):
    model = _model(method, "dense", keep=True)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["keep_folded_weight"] is True
    loaded = PeftModel.from_pretrained(seeded(MLP), tmp_path, is_trainable=True)
    keeps.clear()
    _step(loaded, _x())
    assert keeps == [True, True]


@pytest.mark.parametrize("config", [SurmConfig, PmssConfig])
@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_value_names_it(config, bad):
    with pytest.raises(ConfigError, match=rf"keep_folded_weight={bad!r} is invalid: expected True or False"):
        config(target_modules=["fc1"], keep_folded_weight=bad)
