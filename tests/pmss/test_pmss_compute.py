"""PMSS compute="auto" | "fast" | "dense": W[J, :]x gathered from the base output, or ΔW = C·U·R folded into the
base weight; the same numbers either way, the choice measured once per shape and recorded for loading."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from pmss_cases import CASES_BY_ID
from pmss_helpers import assert_close64, dense_reference, pmss_layers, reference_deltas

from structpeft import ConfigError, PmssConfig
from structpeft.operators import dispatch
from structpeft.operators.skeleton import SkeletonOperator
from structpeft.peft import layer as layer_module
from testkit import cotangent_loss

CASE = CASES_BY_ID["linear-mlp"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_and_gather_give_the_same_outputs_and_gradients(dtype):
    inputs = CASE.inputs(dtype)
    outs, grads = {}, {}
    for mode in ("fast", "dense", "hybrid"):
        cfg = CASE.config(init_weights=False, alpha=0.7, compute=mode, k_in=5, k_out=4)
        torch.manual_seed(3)
        model = get_peft_model(CASE.model(dtype), cfg)
        assert {layer.pmss_op["default"].compute_mode for layer in pmss_layers(model).values()} == {mode}
        assert all(rec["compute"] == {"delta": mode} for rec in cfg.layer_options.values())
        out = CASE.run(model, inputs)
        cotangent_loss(out).backward()
        outs[mode], grads[mode] = out.detach(), _grads(model)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for mode in ("dense", "hybrid"):
        torch.testing.assert_close(outs["fast"], outs[mode], atol=tol, rtol=tol)
        assert grads["fast"].keys() == grads[mode].keys() and grads["fast"]
        for name, g in grads["fast"].items():
            torch.testing.assert_close(grads[mode][name], g, atol=tol * max(1.0, g.abs().max().item()), rtol=tol)


class _GatherUsed(Exception):
    """Raised by a guarded operator: the layer read W[J, :]x from the base output or ran the skeleton product."""


def _guard_and_count_folds(monkeypatch, model) -> dict[str, int]:
    """Make every PMSS operator of ``model`` refuse the gather path (``add_from_base``, ``forward_from_base``, its
    own forward) and count the layer's calls of the two fold kernels."""

    def refuse(*args, **kwargs):
        raise _GatherUsed

    for layer in pmss_layers(model).values():
        op = layer.pmss_op["default"]
        for name in ("add_from_base", "forward_from_base", "forward"):
            monkeypatch.setattr(op, name, refuse)
    calls = {"folded_linear": 0, "hybrid_linear": 0}
    for name in calls:
        real = getattr(layer_module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(layer_module, name, counting)
    return calls


def test_dense_path_folds_and_never_reads_the_base_output(monkeypatch):
    """compute="dense": one fold per layer (the re-folding kernel while autograd records, the plain one under
    no_grad), the gather path never entered, and the output the dense reference's."""
    dtype = torch.float64
    cfg = CASE.config(init_weights=False, compute="dense", alpha=0.7)
    model = get_peft_model(CASE.model(dtype), cfg)
    inputs = CASE.inputs(dtype)
    expected = dense_reference(CASE, reference_deltas(CASE, model, {"default": 0.7}, dtype), inputs, dtype)
    calls = _guard_and_count_folds(monkeypatch, model)
    n_layers = len(pmss_layers(model))
    out = CASE.run(model, inputs)  # training: the core records a gradient
    assert calls == {"folded_linear": 0, "hybrid_linear": n_layers}
    assert_close64(out.detach(), expected)
    with torch.no_grad():
        out = CASE.run(model, inputs)
    assert calls == {"folded_linear": n_layers, "hybrid_linear": n_layers}
    assert_close64(out, expected)


def test_fast_path_trips_the_gather_guard(monkeypatch):
    """The control of the test above: compute="fast" reads the base output, which the guard refuses."""
    model = get_peft_model(CASE.model(torch.float64), CASE.config(init_weights=False, compute="fast"))
    calls = _guard_and_count_folds(monkeypatch, model)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(_GatherUsed):
            CASE.run(model, CASE.inputs(torch.float64))
    assert calls == {"folded_linear": 0, "hybrid_linear": 0}


def test_inference_reuses_the_folded_weight_until_the_core_changes():
    model = get_peft_model(CASE.model(), CASE.config(init_weights=False, compute="dense")).eval()
    inputs = CASE.inputs()
    layer = next(iter(pmss_layers(model).values()))
    op = layer.pmss_op["default"]
    calls = []
    real = SkeletonOperator.to_dense

    def counting(self):
        calls.append(1)
        return real(self)

    with torch.no_grad():
        SkeletonOperator.to_dense = counting
        try:
            first = CASE.run(model, inputs)
            n_first = len(calls)
            assert torch.equal(CASE.run(model, inputs), first) and len(calls) == n_first  # cached
            op.core.add_(0.1)  # an optimizer step bumps the version: rebuilt
            assert not torch.equal(CASE.run(model, inputs), first) and len(calls) > n_first
        finally:
            SkeletonOperator.to_dense = real


def test_auto_measures_once_per_shape_records_the_choice_and_loading_reuses_it(tmp_path, monkeypatch):
    keys = []
    real = dispatch.choose_compute_for

    def spy(key, *args, **kwargs):
        keys.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(dispatch, "choose_compute_for", spy)
    cfg = CASE.config(init_weights=False, k_in=5, k_out=4)
    model = get_peft_model(CASE.model(), cfg)
    assert keys and all(k[0] == "skeleton" and k[3:] == (5, 4) for k in keys)
    chosen = {k: rec["compute"]["delta"] for k, rec in cfg.layer_options.items()}
    assert set(chosen.values()) <= set(dispatch.PATHS)
    assert {k: layer.pmss_op["default"].compute_mode for k, layer in pmss_layers(model).items()} == chosen
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(dispatch, "choose_compute_for", lambda *a, **k: pytest.fail("measured again on load"))
    loaded = PeftModel.from_pretrained(CASE.model(), tmp_path)
    assert {k: layer.pmss_op["default"].compute_mode for k, layer in pmss_layers(loaded).items()} == chosen


def test_adapter_saved_without_a_compute_record_loads_on_the_gather_path(tmp_path):
    """Adapters saved before PMSS had ``compute`` (no "compute" in layer_options) keep their old path."""
    import json

    cfg = CASE.config(init_weights=False, compute="dense")
    model = get_peft_model(CASE.model(), cfg)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    for rec in saved["layer_options"].values():
        del rec["compute"]
    del saved["compute"]
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(CASE.model(), tmp_path)
    assert {layer.pmss_op["default"].compute_mode for layer in pmss_layers(loaded).values()} == {"fast"}
    torch.testing.assert_close(CASE.run(loaded, CASE.inputs()), CASE.run(model, CASE.inputs()))


def test_bad_compute_value_names_the_choices():
    with pytest.raises(ConfigError, match=r"compute='gpu'.*auto, fast, dense"):
        PmssConfig(target_modules=["lin0"], compute="gpu")
    with pytest.raises(ConfigError, match=r"compute_tokens=0 is invalid: expected an integer >= 1"):
        PmssConfig(target_modules=["lin0"], compute_tokens=0)


def test_auto_times_on_compute_tokens_rows(monkeypatch):
    timed = []
    monkeypatch.setattr(dispatch, "_CACHE", {})
    monkeypatch.setattr(dispatch, "_time_paths", lambda op, o, i, dev, tokens, *_: timed.append(tokens) or "fast")
    get_peft_model(CASE.model(), CASE.config(k_in=5, k_out=4, compute_tokens=77))
    assert timed and set(timed) == {77}


def test_auto_measures_under_low_cpu_mem_usage(monkeypatch):
    """PEFT's low_cpu_mem_usage creates new parameters on meta; the timing must still run on real tensors (the
    shape is not in the process cache, so it is really timed here)."""
    monkeypatch.setattr(dispatch, "_CACHE", {})
    cfg = CASE.config(k_in=5, k_out=4)
    model = get_peft_model(CASE.model(), cfg, low_cpu_mem_usage=True)
    assert dispatch._CACHE and {k[0] for k in dispatch._CACHE} == {"skeleton"}
    chosen = {k: rec["compute"]["delta"] for k, rec in cfg.layer_options.items()}
    assert chosen and set(chosen.values()) <= set(dispatch.PATHS)
    assert {k: layer.pmss_op["default"].compute_mode for k, layer in pmss_layers(model).items()} == chosen


@pytest.mark.parametrize("case_id", ["linear-mlp", "conv1d-gpt2"])
def test_a_trainable_base_layer_gets_the_same_gradients_on_every_path(case_id):
    """With the base weight and bias trainable, "fast" (which reads W[J, :]x from the base output when the base is
    frozen) must equal "dense": the adapter's R = W₀[J, :] is a frozen snapshot, so no adapter gradient may reach W
    or b through that read, and after the base moves the adapter still uses the snapshot."""
    case = CASES_BY_ID[case_id]
    results = {}
    for compute in ("fast", "dense", "hybrid"):
        model = get_peft_model(case.model(torch.float64), case.config(compute=compute, init_weights=False, alpha=-0.4))
        for layer in pmss_layers(model).values():
            layer.get_base_layer().requires_grad_(True)
        inputs = case.inputs(torch.float64)
        out = case.run(model, inputs)
        cotangent_loss(out).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for layer in pmss_layers(model).values():
                layer.get_base_layer().bias.add_(1.0)  # the base moved (an optimizer step on it)
            moved = case.run(model, inputs)
        results[compute] = (out.detach(), grads, moved)
    ref_out, ref_grads, ref_moved = results["dense"]
    for compute in ("fast", "hybrid"):
        out, grads, moved = results[compute]
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
        assert sorted(grads) == sorted(ref_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(moved, ref_moved, atol=1e-12, rtol=0)


def test_for_resume_keeps_the_checkpoints_timed_paths_and_skeleton(tmp_path, monkeypatch):
    """PMSS: ``config.for_resume(ckpt)`` rebuilds with the recorded compute paths (and the recorded, verified
    skeleton); a PMSS config with another selection, or a SURM checkpoint, is refused."""
    from peft import LoraConfig

    from structpeft import AdapterFileError

    monkeypatch.setattr(dispatch, "choose_compute_for", lambda *a, **k: "dense")
    get_peft_model(CASE.model(), CASE.config(init_weights=False, k_in=5, k_out=4)).save_pretrained(tmp_path / "a")
    monkeypatch.setattr(dispatch, "choose_compute_for", lambda *a, **k: "fast")
    cfg = CASE.config(k_in=5, k_out=4)
    model = get_peft_model(CASE.model(), cfg.for_resume(tmp_path / "a"))
    assert {layer.pmss_op["default"].compute_mode for layer in pmss_layers(model).values()} == {"dense"}
    assert cfg.layer_options == {}
    with pytest.raises(ConfigError, match=r"k_in=6 here, 5 in the checkpoint"):
        CASE.config(k_in=6, k_out=4).for_resume(tmp_path / "a")
    lora = LoraConfig(target_modules=list(CASE.target_modules), r=2)
    get_peft_model(CASE.model(), lora).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterFileError, match=r"holds a LORA adapter"):
        cfg.for_resume(tmp_path / "lora")
