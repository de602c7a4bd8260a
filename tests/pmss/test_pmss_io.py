"""PMSS adapter files: fresh-process save / load, what the file holds (U only) and what the config records,
loading onto another base model (refused by the checksum) and onto the same model cast to bf16 (accepted)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from pmss_cases import CASES_BY_ID, LAYER_CASES, SELECTIONS
from pmss_helpers import assert_same_snapshot, pmss_layers, recorded, rel_err, run_python, snapshot
from safetensors import safe_open

from structpeft import BaseModelMismatchError

WEIGHTS = "adapter_model.safetensors"


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _trained_like(case, selection, **kwargs):
    """A PMSS model with a non-zero U (as after training)."""
    return get_peft_model(case.model(), case.config(selection=selection, init_weights=False, **kwargs))


def test_save_load_in_fresh_process_is_bit_exact(tmp_path):
    """Every layer type, each with another selection strategy: outputs after loading in a new interpreter
    (which imports structpeft to register PMSS) equal the saved model's outputs bit for bit. Before that import
    the same interpreter cannot load a PMSS adapter: PEFT refuses it (naming PMSS) and the model is untouched."""
    expected = {}
    for i, case in enumerate(LAYER_CASES):
        model = _trained_like(case, SELECTIONS[i % len(SELECTIONS)], alpha=0.7)
        model.save_pretrained(str(tmp_path / case.id))
        expected[case.id] = _run(case, model, case.inputs())
    torch.save(expected, tmp_path / "expected.pt")
    proc = run_python(
        """
        import json
        import sys
        import torch
        from peft import PeftModel
        from pmss_cases import LAYER_CASES

        root = sys.argv[1]
        expected = torch.load(root + "/expected.pt")
        for case in LAYER_CASES:  # without `import structpeft`, PEFT does not know PMSS
            base = case.model()
            before = {k: v.clone() for k, v in base.state_dict().items()}
            try:
                PeftModel.from_pretrained(base, root + "/" + case.id)
            except Exception as err:
                print("REFUSED", case.id, json.dumps(f"{type(err).__name__}: {err}"))
            assert before.keys() == base.state_dict().keys()
            assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
        assert "structpeft" not in sys.modules
        import structpeft  # registers PMSS with PEFT

        for case in LAYER_CASES:
            model = PeftModel.from_pretrained(case.model(), root + "/" + case.id)
            with torch.no_grad():
                out = case.run(model, case.inputs())
            assert torch.equal(out, expected[case.id]), (case.id, (out - expected[case.id]).abs().max())
            print("OK", case.id)
        """,
        str(tmp_path),
    )
    lines, n = proc.stdout.splitlines(), len(LAYER_CASES)
    refused = [line.split(" ", 2) for line in lines[:n]]
    assert [r[:2] for r in refused] == [["REFUSED", c.id] for c in LAYER_CASES], proc.stdout  # else PEFT loaded it
    assert all("PMSS" in json.loads(r[2]) for r in refused), refused
    assert lines[n:] == [f"OK {c.id}" for c in LAYER_CASES]


@pytest.mark.parametrize("case", [c for c in LAYER_CASES if not c.modules_to_save], ids=lambda c: c.id)
def test_adapter_file_holds_u_and_the_indices_and_config_holds_indices(tmp_path, case):
    """The file holds U and the int64 indices I, J (not C and R); the config the indices and their checksum."""
    model = _trained_like(case, "deim")
    layers = pmss_layers(model)
    model.save_pretrained(str(tmp_path))
    path = tmp_path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    expected_keys = {f"base_model.model.{p}.pmss_op.{n}" for p in layers for n in ("core", "col_idx", "row_idx")}
    assert set(tensors) == expected_keys
    for p, layer in layers.items():
        op = layer.pmss_op["default"]
        t = tensors[f"base_model.model.{p}.pmss_op.core"]
        assert t.dtype == torch.float32 and torch.equal(t, op.core.detach())
        for n in ("col_idx", "row_idx"):
            t = tensors[f"base_model.model.{p}.pmss_op.{n}"]
            assert t.dtype == torch.int64 and torch.equal(t, getattr(op, n))
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    header = os.path.getsize(path) - payload
    assert 0 < header <= 100 + 120 * len(tensors), (os.path.getsize(path), payload)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PMSS"
    assert set(saved["layer_options"]) == set(layers)
    for p, layer in layers.items():
        opts = saved["layer_options"][p]["options"]
        op = layer.pmss_op["default"]
        assert opts["col_idx"] == op.col_idx.tolist() and opts["row_idx"] == op.row_idx.tolist()
        assert (opts["k_in"], opts["k_out"]) == tuple(op.core.shape)
        assert isinstance(opts["checksum"], str) and opts["checksum"]


def test_modules_to_save_are_saved_next_to_u(tmp_path):
    case = CASES_BY_ID["linear-bert"]
    model = _trained_like(case, "norm")
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    core_keys = {k for k in keys if k.endswith((".pmss_op.core", ".pmss_op.col_idx", ".pmss_op.row_idx"))}
    assert len(core_keys) == 3 * len(pmss_layers(model))
    assert all("classifier" in k for k in keys - core_keys) and keys - core_keys


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_loading_onto_a_different_base_model_raises(tmp_path, case):
    model = _trained_like(case, "qdeim")
    model.save_pretrained(str(tmp_path))
    other = case.model(seed=case.seed + 1)  # same architecture and shapes, other weights
    before = snapshot(other)
    with pytest.raises(BaseModelMismatchError, match="checksum") as info:
        PeftModel.from_pretrained(other, str(tmp_path))
    assert any(repr(p) in str(info.value) for p in pmss_layers(model))  # names the offending module
    assert_same_snapshot(before, snapshot(other))


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
HALF_LIMIT = {"bf16": 0.03, "fp16": 0.005}  # max |y - y32| / max |y32| of a half-precision load


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_loading_onto_the_same_base_model_cast_to_half_works(tmp_path, case, half):
    """fp16 too: fp32 -> fp16 -> bf16 rounds some entries differently from fp32 -> bf16 (ties at fp16's extra
    bits), so the exact checksum differs and the sketch decides (it was refused as another base model). At the
    case's visible alpha the adapter moves the output far beyond half-precision rounding: an adapter lost on
    loading fails the limit."""
    model = _trained_like(case, "leverage", alpha=case.visible_alpha)
    model.save_pretrained(str(tmp_path))
    inputs = case.inputs()
    expected = _run(case, model, inputs)
    loaded = PeftModel.from_pretrained(case.model(HALF[half]), str(tmp_path))
    for p, layer in pmss_layers(loaded).items():
        op = layer.pmss_op["default"]
        assert torch.equal(op.core.detach().float(), pmss_layers(model)[p].pmss_op["default"].core.detach())
        opts = recorded(loaded.peft_config["default"], p)
        assert op.col_idx.tolist() == opts["col_idx"] and op.row_idx.tolist() == opts["row_idx"]
    out = _run(case, loaded, case.inputs(HALF[half]))
    assert out.dtype == HALF[half] and torch.isfinite(out).all()
    with loaded.disable_adapter():
        no_adapter = _run(case, loaded, case.inputs(HALF[half]))
    # measured: with the adapter 0.004-0.02 (bf16), 0.0004-0.0024 (fp16); without it 0.4-0.8
    assert rel_err(no_adapter, expected) > 0.2
    assert rel_err(out, expected) < HALF_LIMIT[half]


def test_an_adapter_created_on_an_fp16_copy_loads_onto_the_fp32_model(tmp_path):
    case = CASES_BY_ID["linear-mlp"]
    get_peft_model(case.model(torch.float16), case.config(selection="deim")).save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(case.model(), str(tmp_path))
    assert pmss_layers(loaded)


@pytest.mark.parametrize("noise", [0.05, 1.0])
def test_a_perturbed_base_model_is_refused_by_the_sketch(tmp_path, noise):
    """Weights that differ beyond rounding (5 % noise, as a fine-tuned copy might; or 100 %) are another base model:
    the message gives the relative difference of the factors."""
    case = CASES_BY_ID["linear-mlp"]
    model = _trained_like(case, "deim")
    model.save_pretrained(str(tmp_path))
    other = case.model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    before = snapshot(other)
    with pytest.raises(BaseModelMismatchError, match=r"checksum .* the factors differ by [0-9.e-]+ of their norm"):
        PeftModel.from_pretrained(other, str(tmp_path))
    assert_same_snapshot(before, snapshot(other))


def test_an_adapter_without_a_sketch_is_checked_by_the_exact_checksum(tmp_path):
    """Files written before the sketch was recorded: the exact checksum alone decides (fp32 and bf16 copies load;
    an fp16 copy may not, as before)."""
    case = CASES_BY_ID["linear-mlp"]
    model = _trained_like(case, "deim")
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for rec in config["layer_options"].values():
        assert len(rec["options"].pop("sketch")) == 9
    path.write_text(json.dumps(config))
    for dtype in (torch.float32, torch.bfloat16):
        assert pmss_layers(PeftModel.from_pretrained(case.model(dtype), str(tmp_path)))
    with pytest.raises(BaseModelMismatchError, match=r"checksum \w+ here, \w+ recorded\)"):
        PeftModel.from_pretrained(case.model(seed=case.seed + 1), str(tmp_path))


# ------------------------------------------------------------------------------ the indices in the state dict
def _two_selections(tmp_path, case):
    """An adapter saved with one selection (random, seed 0) and a model of the same config whose selection came
    out differently (seed 1): what a resumed Trainer or another machine's BLAS can meet."""
    saved = _trained_like(case, "random", seed=0)
    saved.save_pretrained(str(tmp_path / "saved"))
    other = get_peft_model(case.model(), case.config(selection="random", seed=1, init_weights=False))
    a, b = pmss_layers(saved), pmss_layers(other)
    assert any(not torch.equal(a[p].pmss_op["default"].col_idx, b[p].pmss_op["default"].col_idx) for p in a)
    return saved, other


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_load_adapter_into_an_existing_adapter_uses_the_saved_selection(tmp_path, case):
    """transformers' Trainer resumes (and loads the best checkpoint) with ``load_adapter`` under the existing name,
    which reads the weights only: U was applied to the other model's own rows and columns (wrong ΔW, no error)."""
    saved, other = _two_selections(tmp_path, case)
    expected = _run(case, saved, case.inputs())
    other.eval()
    _run(case, other, case.inputs())  # fills the inference caches with the old selection
    other.load_adapter(str(tmp_path / "saved"), adapter_name="default", is_trainable=True)
    assert torch.allclose(_run(case, other, case.inputs()), expected, rtol=1e-5, atol=1e-6)
    for p, layer in pmss_layers(other).items():
        op, ref = layer.pmss_op["default"], pmss_layers(saved)[p].pmss_op["default"]
        assert torch.equal(op.col_idx, ref.col_idx) and torch.equal(op.cols, ref.cols) and op.core.requires_grad
    # saved again, the config records the selection the weights use, and it loads like the original
    other.save_pretrained(str(tmp_path / "again"))
    again = PeftModel.from_pretrained(case.model(), str(tmp_path / "again"))
    assert torch.allclose(_run(case, again, case.inputs()), expected, rtol=1e-5, atol=1e-6)


def test_load_state_dict_brings_the_selection(tmp_path):
    case = CASES_BY_ID["linear-mlp"]
    saved, other = _two_selections(tmp_path, case)
    other.load_state_dict(saved.state_dict())
    torch.testing.assert_close(_run(case, other, case.inputs()), _run(case, saved, case.inputs()))


def test_a_file_saved_without_indices_loads_as_before(tmp_path):
    """Files written before the indices were saved hold U only: the config's indices are used, with no
    missing-key warning."""
    import warnings

    from safetensors.torch import load_file, save_file

    case = CASES_BY_ID["linear-mlp"]
    model = _trained_like(case, "deim")
    model.save_pretrained(str(tmp_path))
    path = tmp_path / WEIGHTS
    save_file({k: v for k, v in load_file(str(path)).items() if k.endswith(".core")}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(case.model(), str(tmp_path))
    torch.testing.assert_close(_run(case, loaded, case.inputs()), _run(case, model, case.inputs()))


def test_a_file_whose_indices_differ_from_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from structpeft import AdapterFileError

    case = CASES_BY_ID["linear-mlp"]
    _trained_like(case, "deim").save_pretrained(str(tmp_path))
    path = tmp_path / WEIGHTS
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".col_idx"))
    tensors[key] = tensors[key].flip(0)
    save_file(tensors, str(path))
    model = case.model()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="other indices"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("bad", ["out of range", "float", "length"])
def test_bad_indices_in_a_state_dict_are_refused(bad):
    from structpeft import StateDictError

    case = CASES_BY_ID["linear-mlp"]
    model = _trained_like(case, "deim")
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith(".col_idx"))
    sd[key] = {"out of range": sd[key] + 10_000, "float": sd[key].float(), "length": sd[key][:-1]}[bad]
    n, got = len(sd[key]) + (bad == "length"), len(sd[key])  # col_idx: I, the columns of lin0 (24 inputs)
    message = rf"^{re.escape(key)}: expected {n} integer indices in \[0, 24\) .*got \({got},\)$"
    with pytest.raises(StateDictError, match=message):
        model.load_state_dict(sd)
