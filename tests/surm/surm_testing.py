"""Helpers of the SURM-through-PEFT tests: dense references, snapshots, tolerances, fresh-process runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from surm_cases import LayerCase
from torch import nn
from transformers.pytorch_utils import Conv1D

import testkit
from structpeft.peft.surm_layer import SurmLayer
from testkit import assert_same_snapshot as assert_same_snapshot
from testkit import rel_err as rel_err
from testkit import snapshot as snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
# child interpreters with this folder (and tests/) on sys.path
run_python = functools.partial(testkit.run_python, path=HERE, timeout=180)
PEFT_PREFIX = "base_model.model."
ATOL64 = 1e-10
REL32 = 1e-5


# ---------------------------------------------------------------------------------------------- tolerances
def assert_close64(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL64) -> None:
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL32) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_err(actual, expected)
    assert err <= rel, f"relative error {err:.3e} > {rel:.1e}"


# ------------------------------------------------------------------------------------------------- layers
def surm_layers(peft_model: nn.Module) -> dict[str, SurmLayer]:
    """{module path in the base model: SURM layer} of a PeftModel (path without PEFT's prefix)."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, SurmLayer):
            assert name.startswith(PEFT_PREFIX), name
            out[name[len(PEFT_PREFIX) :]] = module
    return out


def recorded_operator_options(record: dict) -> dict:
    """The options recorded for a layer's ΔW operator in ``config.layer_options[path]``.

    Recorded as ``{"options": {<operator role>: options}}`` with role "delta" for the default ΔW placement
    (older layout: ``{"options": options}``).
    """
    options = record["options"]
    return options["delta"] if isinstance(options.get("delta"), dict) else options


def adapter_deltas(peft_model: nn.Module, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """{module path: Σ_a alpha_a · op_a.to_dense()} over the adapters in ``alphas`` ((out, in') matrices)."""
    deltas: dict[str, torch.Tensor] = {}
    for path, layer in surm_layers(peft_model).items():
        for name, alpha in alphas.items():
            d = layer.surm_op[name].to_dense().detach() * alpha
            deltas[path] = deltas[path] + d if path in deltas else d
    return deltas


def add_delta_(module: nn.Module, delta: torch.Tensor) -> None:
    """Add the (out, in') matrix ``delta`` to ``module``'s weight in that weight's own layout."""
    with torch.no_grad():
        if isinstance(module, Conv1D):  # weight (in, out)
            module.weight += delta.T
        elif isinstance(module, nn.Conv2d):  # weight (out, in/groups, kh, kw), ΔW acts on its flattening
            module.weight += delta.reshape(module.weight.shape)
        elif isinstance(module, nn.Linear):  # weight (out, in)
            module.weight += delta
        else:  # pragma: no cover - the cases only target these types
            raise AssertionError(f"unexpected targeted module {type(module)}")


def dense_reference(
    case: LayerCase, deltas: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The base model's output with W + ΔW in every targeted layer, computed without PEFT / structpeft."""
    base = case.model(dtype)
    assert set(deltas) == {k for k, m in base.named_modules() if _is_target(case, k)}, sorted(deltas)
    if case.functional is not None:
        params = {}
        for name, module in base.named_children():
            w = module.weight.detach() + deltas.get(name, torch.zeros_like(module.weight))
            params[name] = (w, module.bias.detach())
        (x,) = inputs.values()
        return case.functional(params, x)
    for path, delta in deltas.items():
        add_delta_(base.get_submodule(path), delta.to(dtype))
    with torch.no_grad():
        return case.run(base, inputs)


def _is_target(case: LayerCase, key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in case.target_modules)


def assert_original_types(case: LayerCase, model: nn.Module) -> None:
    """No tuner layer left, and every targeted module is of the original type again."""
    assert not [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    expected = {"linear": nn.Linear, "conv1d": Conv1D, "conv2d": nn.Conv2d}[case.base_layer_type]
    targets = [m for k, m in model.named_modules() if _is_target(case, k)]
    assert targets
    for m in targets:
        assert type(m) is expected, type(m)


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def params_by_name(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if names is None or k in names}


FRESH_PROCESS_SCRIPT = """
import json
import torch
torch.set_num_threads(1)
from peft import PeftModel
from surm_cases import LAYERS_BY_ID

root = sys.argv[1]
jobs = json.load(open(root + "/jobs.json"))
assert "structpeft" not in sys.modules
refused = {}
for job in jobs:  # without `import structpeft`, PEFT does not know SURM
    try:
        PeftModel.from_pretrained(LAYERS_BY_ID[job["case"]].model(), job["adapter"])
    except Exception as err:
        refused[job["key"]] = f"{type(err).__name__}: {err}"
assert "structpeft" not in sys.modules
import structpeft  # registers SURM with PEFT
outputs = {}
for job in jobs:
    case = LAYERS_BY_ID[job["case"]]
    model = PeftModel.from_pretrained(case.model(), job["adapter"]).eval()
    with torch.no_grad():
        outputs[job["key"]] = case.run(model, torch.load(job["inputs"]))
torch.save(outputs, root + "/outputs.pt")
json.dump(refused, open(root + "/refused.json", "w"))
"""


def save_trained_like(structure, case, folder, alpha: float = 0.7):
    """A PEFT model with random ΔW (and perturbed modules_to_save copies), saved to ``folder``; returned."""
    from peft import get_peft_model

    model = get_peft_model(case.model(), structure.config(case, init_weights=False, alpha=alpha)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    model.save_pretrained(str(folder))
    return model


def fresh_process_results(root, cases: list[tuple[str, str]]) -> dict:
    """See the ``fresh_process`` fixture in conftest.py."""
    import json

    from surm_cases import LAYERS_BY_ID, STRUCTURES_BY_ID

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jobs, expected = [], {}
        for structure_id, case_id in cases:
            key = f"{structure_id}-{case_id}"
            case = LAYERS_BY_ID[case_id]
            torch.manual_seed(0)
            model = save_trained_like(STRUCTURES_BY_ID[structure_id], case, root / key)
            inputs = case.inputs()
            torch.save(inputs, root / f"{key}-inputs.pt")
            with torch.no_grad():
                expected[key] = case.run(model, inputs)
            jobs.append(
                {
                    "key": key,
                    "case": case_id,
                    "adapter": str(root / key),
                    "inputs": str(root / f"{key}-inputs.pt"),
                }
            )
        (root / "jobs.json").write_text(json.dumps(jobs))
        run_python(FRESH_PROCESS_SCRIPT, str(root), timeout=300)
    finally:
        torch.set_num_threads(threads)
    return {
        "refused": json.loads((root / "refused.json").read_text()),
        "actual": torch.load(root / "outputs.pt"),
        "expected": expected,
    }
