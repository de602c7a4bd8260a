"""PMSS adapter files: fresh-process save / load, what the file holds (U only) and what the config records,
loading onto another base model (refused by the checksum) and onto the same model cast to bf16 (accepted)."""

from __future__ import annotations

import json
import os

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
    (which imports structpeft to register PMSS) equal the saved model's outputs bit for bit."""
    expected = {}
    for i, case in enumerate(LAYER_CASES):
        model = _trained_like(case, SELECTIONS[i % len(SELECTIONS)], alpha=0.7)
        model.save_pretrained(str(tmp_path / case.id))
        expected[case.id] = _run(case, model, case.inputs())
    torch.save(expected, tmp_path / "expected.pt")
    proc = run_python(
        """
        import sys
        import torch
        import structpeft  # registers PMSS with PEFT
        from peft import PeftModel
        from pmss_cases import LAYER_CASES

        root = sys.argv[1]
        expected = torch.load(root + "/expected.pt")
        for case in LAYER_CASES:
            model = PeftModel.from_pretrained(case.model(), root + "/" + case.id)
            with torch.no_grad():
                out = case.run(model, case.inputs())
            assert torch.equal(out, expected[case.id]), (case.id, (out - expected[case.id]).abs().max())
            print("OK", case.id)
        """,
        str(tmp_path),
    )
    assert proc.stdout.split() == [w for c in LAYER_CASES for w in ("OK", c.id)]


@pytest.mark.parametrize("case", [c for c in LAYER_CASES if not c.modules_to_save], ids=lambda c: c.id)
def test_adapter_file_holds_only_u_and_config_holds_indices(tmp_path, case):
    model = _trained_like(case, "deim")
    layers = pmss_layers(model)
    model.save_pretrained(str(tmp_path))
    path = tmp_path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    expected_keys = {f"base_model.model.{p}.pmss_op.core" for p in layers}
    assert set(tensors) == expected_keys
    for p, layer in layers.items():
        t = tensors[f"base_model.model.{p}.pmss_op.core"]
        assert t.dtype == torch.float32 and torch.equal(t, layer.pmss_op["default"].core.detach())
    payload = 4 * sum(t.numel() for t in tensors.values())
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
    core_keys = {k for k in keys if k.endswith(".pmss_op.core")}
    assert len(core_keys) == len(pmss_layers(model))
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


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_loading_onto_the_same_base_model_cast_to_half_works(tmp_path, case, half):
    """fp16 too: fp32 -> fp16 -> bf16 rounds some entries differently from fp32 -> bf16 (ties at fp16's extra
    bits), so the exact checksum differs and the sketch decides (it was refused as another base model)."""
    model = _trained_like(case, "leverage")
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
    assert rel_err(out, expected) < 0.1


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
