"""``fold_inference=True``: layers that train with the structured product (``compute="fast"``) run, in inference
only, one matmul with the cached W + s·ΔW; in training, in half precision, with dropout, for adapter placement and
with another active adapter that does not fold, they keep the structured product. Every ΔW-placed method is covered
(the four SURM structures and PMSS), in float64 so that folded and unfolded outputs agree to rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from eco_models import MLP, MLP_DELTA_METHODS, seeded, surm_adapter
from peft import PeftModel, get_peft_model

import structpeft.peft.layer as layer_module
from structpeft import ConfigError, PmssConfig, SurmConfig
from structpeft.operators import fused

METHODS = MLP_DELTA_METHODS
ATOL = 1e-12  # float64: the fold changes only the order of the additions


@pytest.fixture
def folds(monkeypatch):
    """The number of forwards of adapted layers that went through the folded matmul."""
    calls = []
    real = layer_module.folded_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "folded_linear", spy)
    return calls


def _model(method: str, fold: bool, **kw):
    torch.manual_seed(3)
    return get_peft_model(seeded(MLP).double(), METHODS[method](compute="fast", fold_inference=fold, **kw))


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", METHODS)
def test_inference_folds_and_matches_the_structured_product(method, folds):
    reference, model = _model(method, False), _model(method, True)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad():
            expected = reference(_x())
            assert folds == []  # fold_inference=False: the structured product
            out = model(_x())
        assert len(folds) == 2  # both adapted layers
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        folds.clear()


@pytest.mark.parametrize("method", METHODS)
def test_training_keeps_the_structured_product_and_its_gradients(method, folds):
    reference, model = _model(method, False), _model(method, True)
    grads = []
    for m in (reference, model):
        m(_x()).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert folds == []
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_the_cached_weight_follows_a_training_step(method):
    """Inference, a training step, inference: the second forward uses the updated adapter (the cache keys on
    the parameters' versions), exactly as the unfolded model does."""
    models = [_model(method, False), _model(method, True)]
    outs = []
    for m in models:
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        with torch.no_grad():
            first = m(_x())
        m(_x()).square().sum().backward()
        opt.step()
        with torch.no_grad():
            outs.append((first, m(_x())))
    assert not torch.equal(outs[1][0], outs[1][1])  # the step changed the output
    for unfolded, folded in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(folded, unfolded, atol=ATOL, rtol=0)
    holders = [mod for mod in models[1].modules() if hasattr(mod, "pmss_op") or hasattr(mod, "surm_op")]
    assert holders and all(mod in fused._CACHES for mod in holders)


@pytest.mark.parametrize("method", ["surm-circulant", "pmss"])
def test_an_active_adapter_without_the_flag_keeps_the_layer_unfolded(method, folds):
    """Several active adapters are summed; the layer folds only when every active one may be folded."""
    model = _model(method, True)
    model.add_adapter("other", METHODS[method](compute="fast", fold_inference=False))
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(_x())
    assert folds == []
    reference = _model(method, False)
    reference.add_adapter("other", METHODS[method](compute="fast", fold_inference=False))
    reference.load_state_dict(model.state_dict())
    reference.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(both, reference(_x()), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["bfloat16", "dropout", "adapter-placement"],
)
def test_cases_that_cannot_fold_keep_the_structured_product(case, folds):
    """In inference (eval mode) the flag changes nothing where the fold does not apply: no folded matmul, and the
    output equals, bit for bit, that of the same model built without the flag."""

    def build(fold: bool):
        if case == "adapter-placement":
            model = get_peft_model(seeded(MLP).double(), surm_adapter(["fc1", "fc2"], fold_inference=fold))
        elif case == "dropout":
            model = get_peft_model(seeded(MLP).double(), METHODS["pmss"](dropout=0.1, fold_inference=fold))
        else:
            config = METHODS["surm-circulant"](compute="fast", fold_inference=fold)
            model = get_peft_model(seeded(MLP), config).to(torch.bfloat16)
        return model.eval()

    reference, model = build(False), build(True)
    x = _x().to(next(model.parameters()).dtype)
    with torch.no_grad():
        expected, out = reference(x), model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert folds == []


@pytest.mark.parametrize("method", ["surm-kronecker", "pmss"])
def test_the_flag_is_saved_and_loaded(method, tmp_path, folds):
    model = _model(method, True)
    with torch.no_grad():
        expected = model(_x())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fold_inference"] is True
    folds.clear()
    loaded = PeftModel.from_pretrained(seeded(MLP).double(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), expected, atol=0, rtol=0)
    assert len(folds) == 2


@pytest.mark.parametrize("config", [SurmConfig, PmssConfig])
@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_value_names_it(config, bad):
    with pytest.raises(ConfigError, match=rf"fold_inference={bad!r} is invalid: expected True or False"):
        config(target_modules=["fc1"], fold_inference=bad)
