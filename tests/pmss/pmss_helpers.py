"""Helpers of the PMSS tests: the dense reference (written from the definition), snapshots, fresh processes."""

from __future__ import annotations

import functools
import os

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from pmss_cases import PmssLayerCase
from torch import nn
from transformers.pytorch_utils import Conv1D

import testkit
from structpeft.peft.pmss import PmssLayer
from testkit import assert_same_snapshot as assert_same_snapshot
from testkit import rel_err as rel_err
from testkit import snapshot as snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
# child interpreters with this folder (and tests/) on sys.path
run_python = functools.partial(testkit.run_python, path=HERE)

PEFT_PREFIX = "base_model.model."
ATOL64 = 1e-10


# ------------------------------------------------------------------------------------------------ layouts
def weight_t(module: nn.Module) -> torch.Tensor:
    """W_t, the (out x in') matrix of the definition: Linear weight, Conv1D weight.T, flattened Conv2d kernel."""
    w = module.weight.detach()
    if isinstance(module, Conv1D):
        return w.T
    if isinstance(module, nn.Conv2d):
        return w.reshape(w.shape[0], -1)
    assert isinstance(module, nn.Linear), type(module)
    return w


def to_module_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An (out x in') matrix in ``module.weight``'s own layout."""
    if isinstance(module, Conv1D):
        return delta.T
    if isinstance(module, nn.Conv2d):
        return delta.reshape(module.weight.shape)
    return delta


def from_module_layout(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Conv1D):
        return w.T
    if isinstance(module, nn.Conv2d):
        return w.reshape(w.shape[0], -1)
    return w


def skeleton_delta(
    w_t: torch.Tensor, cols, rows, core: torch.Tensor, alpha: float = 1.0, scaling: str = "none"
) -> torch.Tensor:
    """alpha · W_t[:, I] · U · W_t[J, :] (with "unit": selected columns / rows scaled to norm 1)."""
    i_idx = torch.as_tensor(cols, dtype=torch.long)
    j_idx = torch.as_tensor(rows, dtype=torch.long)
    c = w_t[:, i_idx]
    r = w_t[j_idx, :]
    if scaling == "unit":
        c = c / c.norm(dim=0, keepdim=True)
        r = r / r.norm(dim=1, keepdim=True)
    else:
        assert scaling == "none", scaling
    u = core.detach().to(w_t.dtype)
    return alpha * (c @ u @ r)


# ------------------------------------------------------------------------------------------------ layers
def pmss_layers(peft_model: nn.Module) -> dict[str, PmssLayer]:
    """{module path in the base model: PMSS layer}."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, PmssLayer):
            assert name.startswith(PEFT_PREFIX), name
            out[name[len(PEFT_PREFIX) :]] = module
    return out


def recorded(config, path: str) -> dict:
    return config.layer_options[path]["options"]


def reference_deltas(
    case: PmssLayerCase,
    peft_model: nn.Module,
    adapters: dict[str, float],
    dtype: torch.dtype,
    scaling: str = "none",
) -> dict[str, torch.Tensor]:
    """{path: Σ_a alpha_a · W_t[:, I_a] U_a W_t[J_a, :]} from a *fresh* base model's weights and the indices
    recorded in each adapter's config (not from the operator's buffers, not via ``to_dense``)."""
    base = case.model(dtype)
    layers = pmss_layers(peft_model)
    deltas: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        w_t = weight_t(base.get_submodule(path))
        for name, alpha in adapters.items():
            opts = recorded(peft_model.peft_config[name], path)
            d = skeleton_delta(w_t, opts["col_idx"], opts["row_idx"], layer.pmss_op[name].core, alpha, scaling)
            deltas[path] = deltas[path] + d if path in deltas else d
    return deltas


def dense_reference(
    case: PmssLayerCase, deltas: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Output of a fresh base model with W_t + ΔW in every targeted layer, without PEFT / structpeft."""
    base = case.model(dtype)
    expected = {k for k, _ in base.named_modules() if case.is_target(k)}
    assert set(deltas) == expected, (sorted(deltas), sorted(expected))
    with torch.no_grad():
        for path, delta in deltas.items():
            module = base.get_submodule(path)
            module.weight += to_module_layout(module, delta.to(dtype))
        return case.run(base, inputs)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL64) -> None:
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_original_types(case: PmssLayerCase, model: nn.Module) -> None:
    assert not [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    expected = {"linear": nn.Linear, "conv1d": Conv1D, "conv2d": nn.Conv2d}[case.kind]
    targets = [m for k, m in model.named_modules() if case.is_target(k)]
    assert targets
    for m in targets:
        assert type(m) is expected, type(m)


# ---------------------------------------------------------------------------------------------- subspaces
def span_residual(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    """||matrix - P matrix|| / ||matrix|| with P the orthogonal projector onto span(columns of ``basis``)."""
    q = torch.linalg.qr(basis.double()).Q
    m = matrix.double()
    return float(torch.linalg.norm(m - q @ (q.T @ m)) / torch.linalg.norm(m))


def assert_in_span(matrix: torch.Tensor, basis: torch.Tensor, tol: float = 1e-9) -> None:
    """The columns of ``matrix`` lie in span(columns of ``basis``)."""
    res = span_residual(matrix, basis)
    assert res <= tol, f"projection residual {res:.3e} > {tol:.0e}: not inside the span"


# --------------------------------------------------------------------------------------------- subprocess
