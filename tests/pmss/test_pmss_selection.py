"""PMSS sizes and skeletons through PEFT: the parameter budget, explicit k, the indices equal
``structpeft.selection.select_skeleton`` on the layer's W_t, and determinism."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from peft import get_peft_model
from pmss_cases import CASES_BY_ID
from pmss_helpers import pmss_layers, recorded, weight_t

from structpeft.selection import select_skeleton


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("budget,rank", [(None, 8), ("lora-8", 8), ("LoRA-2", 2)])
def test_lora_budget(layer_case, budget, rank):
    """k_in·k_out <= r·(in + out) per layer; k = min(floor(sqrt(r·(in + out))), min(out, in) - 1) is recorded."""
    kwargs = {} if budget is None else {"budget": budget}  # None: the default budget, "lora-8"
    cfg = layer_case.config(**kwargs)
    model = get_peft_model(layer_case.model(), cfg)
    base = layer_case.model()
    layers = pmss_layers(model)
    assert set(cfg.layer_options) == set(layers)
    total = 0
    for path, layer in layers.items():
        out_f, in_f = weight_t(base.get_submodule(path)).shape
        opts = recorded(cfg, path)
        k_in, k_out = opts["k_in"], opts["k_out"]
        assert cfg.layer_options[path]["shape"] == [out_f, in_f]
        assert k_in * k_out <= rank * (in_f + out_f)
        k = min(math.isqrt(rank * (in_f + out_f)), min(out_f, in_f) - 1)
        assert (k_in, k_out) == (k, k)
        assert tuple(layer.pmss_op["default"].core.shape) == (k_in, k_out)
        assert (len(opts["col_idx"]), len(opts["row_idx"])) == (k_in, k_out)
        total += k_in * k_out
    cores = {n: c for n, c in _trainable(model).items() if "pmss_op" in n}
    assert sum(cores.values()) == total


def test_budget_rule_is_clipped_on_small_layers_and_not_on_large_ones():
    cfg = CASES_BY_ID["linear-mlp"].config()
    get_peft_model(CASES_BY_ID["linear-mlp"].model(), cfg)
    assert recorded(cfg, "lin0")["k_in"] == 22  # 24 -> 40: isqrt(8 * 64) = 22 < 23
    assert recorded(cfg, "lin2")["k_in"] == 10  # 13 -> 11: isqrt(8 * 24) = 13, clipped to min(11, 13) - 1


def test_integer_budget():
    case = CASES_BY_ID["linear-mlp"]
    cfg = case.config(budget=50)
    model = get_peft_model(case.model(), cfg)
    for path, layer in pmss_layers(model).items():
        assert tuple(layer.pmss_op["default"].core.shape) == (7, 7)  # isqrt(50) = 7
        assert recorded(cfg, path)["k_in"] * recorded(cfg, path)["k_out"] <= 50


def test_explicit_k_is_honoured(layer_case):
    cfg = layer_case.config(k_in=3, k_out=5, budget="lora-1")  # explicit k wins over the budget
    model = get_peft_model(layer_case.model(), cfg)
    for path, layer in pmss_layers(model).items():
        opts = recorded(cfg, path)
        assert (opts["k_in"], opts["k_out"]) == (3, 5)
        assert (len(opts["col_idx"]), len(opts["row_idx"])) == (3, 5)
        assert tuple(layer.pmss_op["default"].core.shape) == (3, 5)


@pytest.mark.parametrize("seed", [0, 3])
def test_indices_equal_select_skeleton(selection, layer_case, seed):
    cfg = layer_case.config(selection=selection, seed=seed)
    model = get_peft_model(layer_case.model(), cfg)
    base = layer_case.model()
    for path, layer in pmss_layers(model).items():
        opts = recorded(cfg, path)
        cols, rows = select_skeleton(
            weight_t(base.get_submodule(path)), opts["k_in"], opts["k_out"], selection, seed=seed
        )
        assert opts["col_idx"] == cols.tolist() and opts["row_idx"] == rows.tolist()
        op = layer.pmss_op["default"]
        assert torch.equal(op.col_idx.cpu(), cols) and torch.equal(op.row_idx.cpu(), rows)


def test_selection_is_deterministic_across_get_peft_model_calls(selection, layer_case):
    options = []
    for _ in range(2):
        cfg = layer_case.config(selection=selection)
        get_peft_model(layer_case.model(), cfg)
        options.append(cfg.layer_options)
    assert options[0] == options[1]


def test_random_selection_depends_on_the_seed():
    case = CASES_BY_ID["linear-mlp"]
    picks = []
    for seed in (0, 1):
        cfg = case.config(selection="random", seed=seed)
        get_peft_model(case.model(), cfg)
        picks.append(recorded(cfg, "lin0")["col_idx"])
    assert picks[0] != picks[1]


def test_strategies_differ_somewhere():
    """The five strategies are not all the same selection on these weights (the matrix tests are not vacuous)."""
    case = CASES_BY_ID["linear-mlp"]
    seen = set()
    for strategy in ("deim", "qdeim", "leverage", "norm", "random"):
        cfg = case.config(selection=strategy, k_in=5, k_out=5)
        get_peft_model(case.model(), cfg)
        seen.add(tuple(recorded(cfg, "lin0")["col_idx"]))
    assert len(seen) >= 4


def _expected_options(model, cfg, path):
    w_t = weight_t(pmss_layers(model)[path].get_base_layer())
    cols, rows = select_skeleton(w_t, cfg.k_in, cfg.k_out, cfg.selection, seed=cfg.seed)
    return cfg.k_in, cfg.k_out, cols.tolist(), rows.tolist()


def test_new_adapter_after_delete_gets_its_own_selection(monkeypatch):
    """add_adapter / delete_adapter in a loop, each config with its own seed and k, until CPython has handed a new
    config the id of a deleted one (asserted: no skip): every adapter's recorded options are those of its own
    config, selected afresh for every targeted layer (nothing is served from a cache that outlives an injection,
    so a cache keyed by the config's id could not hand out a deleted config's skeleton)."""
    from structpeft.peft import pmss as pmss_module

    case = CASES_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(), case.config(k_in=3, k_out=3, compute="dense"))
    selected = []
    real = pmss_module.select_skeleton

    def spy(w2d, k_in, k_out, strategy, seed=0):
        selected.append((tuple(w2d.shape), k_in, k_out, seed))
        return real(w2d, k_in, k_out, strategy, seed=seed)

    monkeypatch.setattr(pmss_module, "select_skeleton", spy)
    shapes = [tuple(weight_t(layer.get_base_layer()).shape) for layer in pmss_layers(model).values()]
    seen_ids, reused, tries = set(), False, 300  # measured: CPython reuses an id within ~5-12 tries here
    for i in range(tries):
        cfg = case.config(selection="random", seed=100 + i, k_in=2 + i % 3, k_out=2 + i % 3, compute="dense")
        reused = reused or id(cfg) in seen_ids
        seen_ids.add(id(cfg))
        selected.clear()
        model.add_adapter(f"a{i}", cfg)
        assert selected == [(shape, cfg.k_in, cfg.k_out, cfg.seed) for shape in shapes], f"adapter a{i}"
        opts = recorded(cfg, "lin0")
        assert (opts["k_in"], opts["k_out"], opts["col_idx"], opts["row_idx"]) == _expected_options(
            model, cfg, "lin0"
        ), f"adapter a{i} (seed {cfg.seed}) got another config's skeleton"
        del cfg, opts
        model.delete_adapter(f"a{i}")
        gc.collect()
        if reused:
            break
    assert reused, f"CPython never reused a deleted config's id in {tries} tries: the stale-id case was not reached"


def test_reused_config_object_gets_a_fresh_selection():
    case = CASES_BY_ID["linear-mlp"]
    model = get_peft_model(case.model(), case.config(k_in=3, k_out=3))
    cfg = case.config(selection="random", seed=1, k_in=2, k_out=2)
    model.add_adapter("a", cfg)
    model.delete_adapter("a")
    cfg.seed, cfg.k_in, cfg.k_out, cfg.layer_options = 2, 4, 4, {}
    model.add_adapter("b", cfg)
    assert tuple(pmss_layers(model)["lin0"].pmss_op["b"].core.shape) == (4, 4)
    opts = recorded(cfg, "lin0")  # the skeleton of seed 2, not adapter a's (seed 1) reused
    assert (opts["k_in"], opts["k_out"], opts["col_idx"], opts["row_idx"]) == _expected_options(model, cfg, "lin0")
