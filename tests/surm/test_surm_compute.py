"""compute="auto" | "fast" | "dense" | "hybrid": the per-layer choice of the structured product, a materialised ΔW
folded into the base weight, or that fold with the parameter gradients taken through the structure."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from structpeft import ConfigError, SurmConfig
from structpeft.operators import OPERATORS, dispatch


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 24), nn.Tanh(), nn.Linear(24, 7)).double().eval()


def _ops(model):
    return {k: m.surm_op["default"] for k, m in model.base_model.model.named_modules() if hasattr(m, "surm_op")}


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker", "ldr"])
def test_compute_paths_give_the_same_output_and_gradients(structure):
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    outs, grads = {}, {}
    for mode in dispatch.PATHS:
        cfg = SurmConfig(structure=structure, target_modules=["0", "2"], init_weights=False, compute=mode)
        torch.manual_seed(1)
        model = get_peft_model(_mlp(), cfg)
        assert {op.compute_mode for op in _ops(model).values()} == {mode}
        assert all(rec["compute"] == {"delta": mode} for rec in cfg.layer_options.values())
        outs[mode] = model(x)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        values = torch.autograd.grad(outs[mode].square().sum(), [x, *(model.get_parameter(n) for n in names)])
        grads[mode] = dict(zip(["x", *names], values, strict=True))
    for mode in ("dense", "hybrid"):
        torch.testing.assert_close(outs[mode], outs["fast"], atol=1e-10, rtol=0)
        assert grads[mode].keys() == grads["fast"].keys() and len(grads["fast"]) > 1
        for name, g in grads["fast"].items():
            torch.testing.assert_close(grads[mode][name], g, atol=1e-10, rtol=1e-10)


def test_dense_path_does_not_call_the_fast_product(monkeypatch):
    cfg = SurmConfig(target_modules=["0"], init_weights=False, compute="dense")
    model = get_peft_model(_mlp(), cfg)
    op = _ops(model)["0"]
    monkeypatch.setattr(op, "fast_forward", lambda x: (_ for _ in ()).throw(AssertionError("fast path used")))
    x = torch.randn(2, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model(x)
    # the output is the base MLP with W0 + alpha·ΔW in layer 0, computed without PEFT
    reference = _mlp()
    delta = cfg.alpha * op.to_dense().detach()
    assert torch.count_nonzero(delta) > 0
    with torch.no_grad():
        reference[0].weight += delta
        expected = reference(x)
        assert (expected - _mlp()(x)).abs().max() > 1e-3 * expected.abs().max()  # the adapter changes the output
    torch.testing.assert_close(out.detach(), expected, atol=1e-12, rtol=0)


def test_auto_measures_once_records_the_choice_and_loading_reuses_it(tmp_path, monkeypatch):
    calls = []
    real = dispatch.choose_compute

    def spy(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "choose_compute", spy)
    cfg = SurmConfig(structure="circulant", block_size=4, target_modules=["0", "2"], init_weights=False)
    model = get_peft_model(_mlp(), cfg)
    assert sorted(calls) == [(7, 24), (24, 13)]
    chosen = {k: rec["compute"]["delta"] for k, rec in cfg.layer_options.items()}
    assert set(chosen.values()) <= set(dispatch.PATHS)
    model.save_pretrained(tmp_path)
    # force the opposite answer for any new measurement: the loaded adapter must still use the recorded path
    monkeypatch.setattr(dispatch, "choose_compute", lambda *a, **k: pytest.fail("measured again on load"))
    loaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    assert {k: op.compute_mode for k, op in _ops(loaded).items()} == chosen


def test_choose_compute_is_cached_and_answers_one_of_the_paths():
    cls = OPERATORS["ldr"]
    dispatch._CACHE.clear()
    first = dispatch.choose_compute(cls, 20, 20, {"block_size": 4, "displacement_rank": 1}, tokens=64)
    assert first in dispatch.PATHS
    assert len(dispatch._CACHE) == 1
    assert dispatch.choose_compute(cls, 20, 20, {"block_size": 4, "displacement_rank": 1}, tokens=64) == first
    assert dispatch.choose_compute(OPERATORS["dense"], 20, 20, {}) == "fast"


def test_bad_compute_value_names_the_choices():
    with pytest.raises(ConfigError, match=r"compute='gpu'.*auto, fast, dense, hybrid"):
        SurmConfig(target_modules=["0"], compute="gpu")


def test_copy_of_config_keeps_compute():
    cfg = SurmConfig(target_modules=["0"], compute="dense")
    assert copy.deepcopy(cfg).compute == "dense"


def test_auto_timing_leaves_the_global_rng_untouched():
    """Adapter initialisation after get_peft_model must not depend on whether a shape was timed before."""
    dispatch._CACHE.pop(("circulant", 40, 24, '{"block_size": 8}', "cpu", 2048, dispatch.PATHS), None)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    choice = dispatch.choose_compute(OPERATORS["circulant"], 40, 24, {"block_size": 8})
    assert choice in dispatch.PATHS
    assert torch.equal(torch.random.get_rng_state(), before)


def test_compute_tokens_is_the_timed_row_count_and_part_of_the_cache_key(monkeypatch):
    """compute="auto" times each layer on ``compute_tokens`` rows; another row count is timed again, not reused."""
    timed = []

    def fake_time_paths(op, out_features, in_features, device, tokens, reps, paths, keep=False):
        timed.append(tokens)
        return "fast" if tokens < 100 else "dense"

    monkeypatch.setattr(dispatch, "_time_paths", fake_time_paths)
    monkeypatch.setattr(dispatch, "_CACHE", {})
    cfg = SurmConfig(structure="circulant", block_size=4, target_modules=["0"], compute_tokens=96)
    get_peft_model(_mlp(), cfg)
    assert timed == [96] and {r["compute"]["delta"] for r in cfg.layer_options.values()} == {"fast"}
    cfg = SurmConfig(structure="circulant", block_size=4, target_modules=["0"], compute_tokens=4096)
    get_peft_model(_mlp(), cfg)
    assert timed == [96, 4096] and {r["compute"]["delta"] for r in cfg.layer_options.values()} == {"dense"}
    get_peft_model(_mlp(), SurmConfig(structure="circulant", block_size=4, target_modules=["0"], compute_tokens=96))
    assert timed == [96, 4096]  # cached per token count


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "2048", None])
def test_bad_compute_tokens_names_the_value(bad):
    with pytest.raises(ConfigError, match=rf"compute_tokens={bad!r} is invalid: expected an integer >= 1"):
        SurmConfig(target_modules=["0"], compute_tokens=bad)


def test_auto_offers_hybrid_only_to_folding_operators_with_their_own_parameter_gradient():
    from structpeft.operators.skeleton import SkeletonOperator

    for cls in (OPERATORS["circulant"], OPERATORS["kronecker"], SkeletonOperator):
        assert dispatch.auto_paths(cls) == ("fast", "dense", "hybrid")
        assert dispatch.auto_paths(cls, folds=False) == ("fast", "dense")
    for name in ("toeplitz", "ldr", "dense"):  # the generic param_grads: the fast product's cost on top of the fold
        assert dispatch.auto_paths(OPERATORS[name]) == ("fast", "dense")


def test_auto_times_the_offered_paths(monkeypatch):
    timed = {}

    def fake_time_paths(op, out_features, in_features, device, tokens, reps, paths, keep=False):
        timed[op.structure] = paths
        return paths[-1]

    monkeypatch.setattr(dispatch, "_time_paths", fake_time_paths)
    monkeypatch.setattr(dispatch, "_CACHE", {})
    for structure in ("circulant", "toeplitz"):
        cfg = SurmConfig(structure=structure, block_size=4, target_modules=["0"])
        get_peft_model(_mlp(), cfg)
        assert {r["compute"]["delta"] for r in cfg.layer_options.values()} == {timed[structure][-1]}
    assert timed == {"circulant": ("fast", "dense", "hybrid"), "toeplitz": ("fast", "dense")}
    cfg = SurmConfig(structure="circulant", placement="adapter", target_modules=["0"], block_size=4)
    get_peft_model(_mlp(), cfg)
    assert timed["circulant"] == ("fast", "dense")  # an adapter block does not fold


def test_auto_times_each_path_with_a_dense_output_gradient(monkeypatch):
    """The rule's backward gets a dense random output gradient, as in training, not ``sum()``'s expanded ones,
    on which reshapes and matmuls in a backward cost differently."""
    seen = []
    real_backward = torch.Tensor.backward

    def backward(self, gradient=None, *args, **kwargs):
        seen.append(gradient)
        return real_backward(self, gradient, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    op = OPERATORS["circulant"](24, 40, block_size=8)
    dispatch._time_paths(op, 24, 40, torch.device("cpu"), 32, 1, dispatch.PATHS)
    assert len(seen) >= 2 * (1 + len(dispatch.PATHS))  # warm-up and timed, the frozen layer and every path
    for grad in seen:
        assert grad is not None and grad.shape == (32, 24) and 0 not in grad.stride()
        assert grad.std() > 0.5  # random, not a constant


def test_auto_times_the_fast_path_with_the_layers_scale_multiply():
    """The PEFT layer adds ``op(x) * scale`` to the base output; the rule's fast path pays that multiply too
    (forward and backward), or it would look cheaper than the path the layer runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.muls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.mul and isinstance(out, torch.Tensor):
                self.muls.append(tuple(out.shape))
            return out

    op = OPERATORS["kronecker"](24, 40)  # no scale inside its forward
    with Record() as rec:
        dispatch._time_paths(op, 24, 40, torch.device("cpu"), 32, 1, ("fast",))
    assert rec.muls.count((32, 24)) >= 4  # warm-up and timed run, each the forward's multiply and its backward


@pytest.mark.parametrize("placement", ["lora", "adapter"])
@pytest.mark.parametrize("compute", ["fast", "dense", "hybrid"])
@pytest.mark.parametrize(("structure", "size"), [("circulant", 4), ("circulant", 128), ("toeplitz", 4), ("ldr", 4)])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(structure, size, compute, placement):
    """Zero rows, as nn.Linear accepts them: the FFT-based structures used to fail inside MKL ("Inconsistent
    configuration parameters") in the structured product and in the hybrid path's parameter gradient (circulant
    blocks > 96 take the rfft there)."""
    features = 128 if size == 128 else 8
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(features, features)).double()
    options = {"block_size": size} if structure != "circulant" or size != 128 else {}
    config = SurmConfig(
        structure=structure, target_modules=["0"], compute=compute, placement=placement, init_weights=False, **options
    )
    model = get_peft_model(base, config)
    x = torch.zeros(2, 0, features, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 0, features)
    y.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)


def _timed_as(monkeypatch, path):
    """compute="auto" answers ``path`` for every layer (a stand-in for a process whose timings came out so)."""
    monkeypatch.setattr(dispatch, "choose_compute", lambda *a, **k: path)


def test_for_resume_keeps_the_checkpoints_timed_paths(tmp_path, monkeypatch):
    """A resumed run (Trainer: load_adapter into the model the script built) times "auto" again; built from
    ``config.for_resume(ckpt)`` it uses the paths the checkpoint recorded instead."""
    cfg = SurmConfig(structure="circulant", block_size=4, target_modules=["0", "2"], init_weights=False)
    _timed_as(monkeypatch, "dense")
    get_peft_model(_mlp(), copy.deepcopy(cfg)).save_pretrained(tmp_path)
    _timed_as(monkeypatch, "hybrid")  # the new process would pick another path
    assert {op.compute_mode for op in _ops(get_peft_model(_mlp(), copy.deepcopy(cfg))).values()} == {"hybrid"}
    resumed = cfg.for_resume(tmp_path)
    assert cfg.layer_options == {}  # the caller's config is not modified
    model = get_peft_model(_mlp(), resumed)
    assert {k: op.compute_mode for k, op in _ops(model).items()} == {"0": "dense", "2": "dense"}
    # a forced path still applies to every layer
    forced = copy.deepcopy(cfg)
    forced.compute = "fast"
    assert {op.compute_mode for op in _ops(get_peft_model(_mlp(), forced.for_resume(tmp_path))).values()} == {"fast"}


def test_for_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    cfg = SurmConfig(structure="circulant", block_size=4, target_modules=["0", "2"], compute="fast")
    get_peft_model(_mlp(), copy.deepcopy(cfg)).save_pretrained(tmp_path)
    other = SurmConfig(structure="circulant", block_size=8, target_modules=["0", "2"], compute="fast")
    with pytest.raises(ConfigError, match=r"block_size=8 here, 4 in the checkpoint"):
        other.for_resume(tmp_path)
    toeplitz = SurmConfig(structure="toeplitz", block_size=4, target_modules=["0", "2"], compute="fast")
    with pytest.raises(ConfigError, match=r"structure='toeplitz' here, 'circulant' in the checkpoint"):
        toeplitz.for_resume(tmp_path)
    with pytest.raises(ConfigError, match=r"holds no adapter_config.json"):
        cfg.for_resume(tmp_path / "missing")
    # fields a resumed run may change: the compute settings and the initial values
    relaxed = SurmConfig(structure="circulant", block_size=4, target_modules=["2", "0"], compute="dense")
    relaxed.init_weights = False
    assert set(relaxed.for_resume(tmp_path).layer_options) == {"0", "2"}
