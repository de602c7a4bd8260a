"""Helpers of the SURM-Adapter tests: a dense reference written from the definition (forward hooks on a fresh
base model), snapshots, fresh-process runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from adapter_cases import AdapterLayerCase
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import testkit
from structpeft.peft.surm_layer import SurmLayer
from testkit import assert_same_snapshot as assert_same_snapshot
from testkit import rel_err as rel_err
from testkit import snapshot as snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
# child interpreters with this folder (and tests/) on sys.path
run_python = functools.partial(testkit.run_python, path=HERE)
PEFT_PREFIX = "base_model.model."
ATOL64 = 1e-10

# the activations, written independently of structpeft's table
ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def surm_layers(peft_model: nn.Module) -> dict[str, SurmLayer]:
    """{module path in the base model: SURM layer}."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, SurmLayer):
            assert name.startswith(PEFT_PREFIX), name
            out[name[len(PEFT_PREFIX) :]] = module
    return out


def weight_2d(module: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    """The (out x in') matrix of a Linear / Conv1D / Conv2d: of its weight, or of ``w``, a tensor in that weight's
    layout."""
    w = module.weight.detach() if w is None else w
    if isinstance(module, Conv1D):
        return w.T
    if isinstance(module, nn.Conv2d):
        return w.reshape(w.shape[0], -1)
    return w


def base_params(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{SURM layer path: copies of its base layer's (weight, bias or None)}."""
    out = {}
    for path, layer in surm_layers(model).items():
        base = layer.get_base_layer()
        out[path] = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
    return out


def assert_base_params(model: nn.Module, expected: dict, atol: float) -> None:
    """Every SURM layer's base weight and bias equal ``expected`` (:func:`base_params`) within ``atol``."""
    for path, layer in surm_layers(model).items():
        w, b = expected[path]
        base = layer.get_base_layer()
        torch.testing.assert_close(base.weight.detach(), w, atol=atol, rtol=0)
        if b is None:
            assert base.bias is None, path
        else:
            torch.testing.assert_close(base.bias.detach(), b, atol=atol, rtol=0)


def expected_merge(
    layer: SurmLayer, w0: torch.Tensor, b0: torch.Tensor | None, alpha: float, adapter: str = "default"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The merge of ``adapter`` into base weight ``w0`` and bias ``b0``, in float64 from the block's dense matrices:
    ((I + M)·W0 in the (out x in') layout, (I + M)·b0 + bias or None, I + M), M = alpha·S or alpha·S_up·S_down."""
    block = layer.surm_op[adapter]
    if "op" in block.ops:
        m = alpha * block.ops["op"].to_dense().detach().double()
    else:
        m = alpha * (block.ops["up"].to_dense() @ block.ops["down"].to_dense()).detach().double()
    i_plus_m = torch.eye(m.shape[0], dtype=torch.float64) + m
    w = i_plus_m @ weight_2d(layer.get_base_layer(), w0).double()
    b = None if b0 is None else i_plus_m @ b0.double() + block.bias.detach().double()
    return w, b, i_plus_m


def adapter_fn(block: nn.Module, alpha: float, activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (..., n) -> alpha·act(S h) + bias (square) or alpha·S_up act(S_down h) + bias, with dense matrices."""
    act = ACT[activation]
    bias = None if block.bias is None else block.bias.detach()
    if "op" in block.ops:
        s = block.ops["op"].to_dense().detach()
        assert s.shape[0] == s.shape[1], s.shape

        def f(h):
            return alpha * act(h @ s.T.to(h.dtype))
    else:
        down, up = block.ops["down"].to_dense().detach(), block.ops["up"].to_dense().detach()
        assert down.shape[1] == up.shape[0] and down.shape[0] == up.shape[1], (down.shape, up.shape)

        def f(h):
            return alpha * (act(h @ down.T.to(h.dtype)) @ up.T.to(h.dtype))

    if bias is None:
        return f
    return lambda h: f(h) + bias.to(h.dtype)


def lora_fn(module: nn.Module, delta_2d: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> alpha · ΔW x for a ΔW placed on the weight (as a convolution for Conv2d)."""
    delta = alpha * delta_2d.detach()
    if isinstance(module, nn.Conv2d):
        kernel = delta.reshape(module.weight.shape)
        return lambda x: module._conv_forward(x, kernel.to(x.dtype), None)
    return lambda x: x @ delta.T.to(x.dtype)


def reference_output(
    case: AdapterLayerCase,
    peft_model: nn.Module,
    adapters: dict[str, tuple[float, str]],
    inputs: dict[str, torch.Tensor],
    dtype: torch.dtype,
    lora: dict[str, float] | None = None,
) -> torch.Tensor:
    """The output of a fresh base model whose targeted modules output h + Σ_a A_a(h) (+ Σ_l s_l ΔW_l x), with
    h the module's own output; ``adapters``: {name: (alpha, activation)}, ``lora``: {name: alpha}."""
    base = case.model(dtype)
    layers = surm_layers(peft_model)
    assert set(layers) == {k for k, _ in base.named_modules() if case.is_target(k)}
    handles = []
    for path, layer in layers.items():
        module = base.get_submodule(path)
        fns = [adapter_fn(layer.surm_op[n], alpha, act) for n, (alpha, act) in adapters.items()]
        lfns = [lora_fn(module, layer.surm_op[n].to_dense(), a) for n, a in (lora or {}).items()]
        conv = isinstance(module, nn.Conv2d)  # channels are dim 1

        def hook(mod, args, out, fns=fns, lfns=lfns, conv=conv):
            h = out.movedim(1, -1) if conv else out
            y = h + sum(f(h) for f in fns)
            y = y.movedim(-1, 1) if conv else y
            return y + sum(f(args[0]) for f in lfns)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return case.run(base, inputs)
    finally:
        for h in handles:
            h.remove()


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL64) -> None:
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_original_types(case: AdapterLayerCase, model: nn.Module) -> None:
    assert not [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    expected = {"linear": nn.Linear, "conv1d": Conv1D, "conv2d": nn.Conv2d}[case.kind]
    targets = [m for k, m in model.named_modules() if case.is_target(k)]
    assert targets
    for m in targets:
        assert type(m) is expected, type(m)
