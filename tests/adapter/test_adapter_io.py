"""SURM-Adapter files and adapter management: several adapters saved and loaded in a fresh process (bit
exact), what the file holds, disable_adapter, set_adapter, delete_adapter."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_cases import CASES_BY_ID, LAYER_CASES
from adapter_helpers import assert_close64, reference_output, run_python, surm_layers
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from structpeft import SurmConfig

# per layer case: adapter name -> (structure, form, activation, alpha); "default" first
ADAPTERS = {
    "bert-like": {
        "default": ("circulant", "square", "gelu", 0.6),
        "houlsby": ("dense", "bottleneck", "relu", 1.0),
        "kron": ("kronecker", "square", "identity", -0.4),
    },
    "gpt2-conv1d": {"default": ("toeplitz", "bottleneck", "tanh", 0.5), "ldr": ("ldr", "square", "silu", 0.8)},
    "llama-like": {
        "default": ("ldr", "bottleneck", "identity", 0.7),
        "circ_gelu": ("circulant", "square", "gelu", 0.3),  # not "circ": PEFT's name filter would drop LDR's .circ
    },
    "conv2d": {"default": ("kronecker", "bottleneck", "gelu", 0.9), "dense": ("dense", "square", "identity", 0.2)},
}


def _run(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _config(case, structure, form, activation, alpha):
    return case.config(structure, form, activation=activation, alpha=alpha, init_weights=False)


def _multi_adapter_model(case, dtype=torch.float32):
    specs = ADAPTERS[case.id]
    names = list(specs)
    model = get_peft_model(case.model(dtype), _config(case, *specs[names[0]]))
    for name in names[1:]:
        model.add_adapter(name, _config(case, *specs[name]))
    return model


def test_several_adapters_save_load_in_fresh_process_bit_exact(tmp_path):
    expected = {}
    for case in LAYER_CASES:
        model = _multi_adapter_model(case)
        model.save_pretrained(str(tmp_path / case.id))
        inputs = case.inputs()
        for name in ADAPTERS[case.id]:
            model.set_adapter(name)
            expected[(case.id, name)] = _run(case, model, inputs)
        with model.disable_adapter():
            expected[(case.id, "disabled")] = _run(case, model, inputs)
    torch.save(expected, tmp_path / "expected.pt")
    proc = run_python(
        """
        import sys
        import torch
        import structpeft  # registers SURM with PEFT
        from peft import PeftModel
        from adapter_cases import LAYER_CASES

        root = sys.argv[1]
        expected = torch.load(root + "/expected.pt")
        for case in LAYER_CASES:
            folder = root + "/" + case.id
            names = [n for (c, n) in expected if c == case.id and n != "disabled"]
            model = PeftModel.from_pretrained(case.model(), folder)
            for name in names[1:]:
                model.load_adapter(folder + "/" + name, adapter_name=name)
            inputs = case.inputs()
            for name in names:
                model.set_adapter(name)
                with torch.no_grad():
                    out = case.run(model, inputs)
                assert torch.equal(out, expected[(case.id, name)]), (case.id, name)
            with model.disable_adapter(), torch.no_grad():
                assert torch.equal(case.run(model, inputs), expected[(case.id, "disabled")])
            print("OK", case.id, len(names))
        """,
        str(tmp_path),
    )
    assert proc.stdout.split() == [w for c in LAYER_CASES for w in ("OK", c.id, str(len(ADAPTERS[c.id])))]


def test_adapter_file_and_config(tmp_path):
    case = CASES_BY_ID["bert-like"]
    model = _multi_adapter_model(case)
    model.save_pretrained(str(tmp_path))
    layers = surm_layers(model)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    expected = {}
    for path, layer in layers.items():
        for name, t in layer.surm_op["default"].named_parameters():
            expected[f"base_model.model.{path}.surm_op.{name}"] = t  # PEFT's convention: no adapter name
    assert set(tensors) == set(expected)  # only the adapter's parameters, no base weights
    for key, t in expected.items():
        assert torch.equal(tensors[key], t.detach()), key
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SURM" and saved["placement"] == "adapter"
    assert saved["activation"] == "gelu" and saved["structure"] == "circulant"
    assert set(saved["layer_options"]) == set(layers)
    houlsby = json.loads((tmp_path / "houlsby" / "adapter_config.json").read_text())
    assert (houlsby["adapter_form"], houlsby["bottleneck"], houlsby["structure"]) == ("bottleneck", 4, "dense")


@pytest.mark.parametrize(
    "placement,form",
    [
        pytest.param("lora", "square", id="lora-placement"),
        pytest.param("adapter", "square", id="adapter-square"),
        pytest.param("adapter", "bottleneck", id="adapter-bottleneck"),
    ],
)
def test_saved_keys_have_no_adapter_name_and_load_under_another_name(tmp_path, placement, form):
    """PEFT's convention: keys without the adapter name, so a file loads under any adapter name."""
    case = CASES_BY_ID["bert-like"]
    if placement == "lora":
        cfg = SurmConfig(structure="kronecker", target_modules=list(case.target_modules), init_weights=False)
    else:
        cfg = case.config("kronecker", form, init_weights=False)
    model = get_peft_model(case.model(), cfg)
    with torch.no_grad():  # move away from the (seed-reproducible) init, as training would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    inputs = case.inputs()
    expected = _run(case, model, inputs)
    loaded = PeftModel.from_pretrained(case.model(), str(tmp_path), adapter_name="task2")
    assert torch.equal(_run(case, loaded, inputs), expected)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if ".default." in k or k.endswith(".default")], keys


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_set_disable_delete_adapter(case):
    dtype = torch.float64
    model = _multi_adapter_model(case, dtype)
    specs = ADAPTERS[case.id]
    names = list(specs)
    inputs = case.inputs(dtype)
    base_out = _run(case, case.model(dtype), inputs)

    def expected(*active):
        adapters = {n: (specs[n][3], specs[n][2]) for n in active}
        return reference_output(case, model, adapters, inputs, dtype)

    for name in names:
        model.set_adapter(name)
        assert_close64(_run(case, model, inputs), expected(name))
        with model.disable_adapter():
            assert torch.equal(_run(case, model, inputs), base_out)
        assert_close64(_run(case, model, inputs), expected(name))  # restored on exit
    model.base_model.set_adapter(names[:2])
    assert_close64(_run(case, model, inputs), expected(*names[:2]))

    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")
    model.set_adapter(names[0])
    with pytest.warns(UserWarning, match="was active"):
        model.delete_adapter(names[0])
    remaining = names[1:]
    assert list(model.peft_config) == remaining
    for layer in surm_layers(model).values():
        assert list(layer.surm_op) == remaining
    model.set_adapter(remaining[0])
    assert_close64(_run(case, model, inputs), expected(remaining[0]))


def test_load_onto_a_base_model_with_other_shapes_raises(tmp_path):
    from adapter_cases import bert_like

    from structpeft import BaseModelMismatchError

    case = CASES_BY_ID["bert-like"]
    _multi_adapter_model(case).save_pretrained(str(tmp_path))
    other = bert_like(intermediate=40)  # output.dense is 40 -> 24 instead of 36 -> 24
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseModelMismatchError, match="output.dense"):
        PeftModel.from_pretrained(other, str(tmp_path))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
