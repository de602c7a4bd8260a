"""Folding dense ΔWs into the base layer's matmul: y = x·(W + Σ_a s_a·ΔW_a)ᵀ + b, one matmul instead of 1 + 3.

Math. For a frozen linear layer y = x Wᵀ + b with adapters y += s_a·x ΔW_aᵀ, the unfolded dense path costs the
base matmul plus, per adapter, three matmuls of the same size (forward x ΔWᵀ, ∂x = g ΔW, ∂ΔW = gᵀ x). Folded,

    W_eff = W + Σ_a s_a·ΔW_a,      y = x W_effᵀ + b,      ∂x = g W_eff,      ∂ΔW_a = s_a·gᵀ x,

so the forward and the input gradient cost exactly what the frozen base layer costs, and the adapters add one
matmul (gᵀ x, shared by all of them; autograd then maps it to the structured parameters through ``to_dense``,
O(out·in)) plus building ΔW (O(out·in) for every structure). Nothing beyond x (which the base matmul keeps
anyway) and W_eff (out × in) is saved for the backward: less memory than LoRA, which also keeps x·Aᵀ.
In inference (no autograd graph through the parameters) W_eff is cached per layer while W and every adapter
parameter keep their version counters, so repeated forwards run at exactly the base layer's speed. The cache holds
one (out × in) weight per layer; a config's ``fold_inference=True`` extends this inference fold to the layers that
train with the structured product (``compute_mode="fast"``).

Precision: W_eff is formed in the base weight's dtype, so folding is used only for float32 / float64 base
weights (in half precision the rounding of W + s·ΔW to W's 8 / 11 mantissa bits would swallow small ΔW). Under
``torch.autocast`` the matmul runs in the autocast dtype, as the base layer's would.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .base import _compiling

FOLDABLE_DTYPES = (torch.float32, torch.float64)
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def folded_weight(
    weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], owner: object | None = None
) -> torch.Tensor:
    """W + Σ s·ΔW in W's dtype (each ΔW built by ``op.delta_weight``), cached per ``owner`` outside autograd."""
    params = [p for op, _ in terms for p in op.parameters()]
    if owner is None or records_grad(weight, [op for op, _ in terms]) or _compiling():
        return _fold(weight, terms, cache=False)
    key = (
        torch.is_inference_mode_enabled(),
        weight.data_ptr(),
        weight.dtype,
        weight._version,
        tuple(scale for _, scale in terms),
        tuple((p.data_ptr(), p.dtype, p._version) for p in params),
    )
    hit = _CACHES.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = _fold(weight, terms, cache=False)
    _CACHES[owner] = (key, w)
    return w


def records_grad(weight: torch.Tensor, ops: Sequence[nn.Module]) -> bool:
    """True if autograd records a graph through ``weight`` or a parameter of ``ops`` (training), False in
    inference (``torch.no_grad`` / ``torch.inference_mode``, or everything frozen)."""
    if not torch.is_grad_enabled():
        return False
    return weight.requires_grad or any(p.requires_grad for op in ops for p in op.parameters())


def _fold(weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], cache: bool) -> torch.Tensor:
    w = weight
    for op, scale in terms:
        w = w + (op.delta_weight(cache=cache) * scale).to(weight.dtype)
    return w


def folded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    terms: Sequence[tuple[nn.Module, float]],
    owner: object | None = None,
) -> torch.Tensor:
    """x·(W + Σ s·ΔW)ᵀ + b for ``weight`` W in the (out × in) layout (see the module docstring)."""
    return nn.functional.linear(x, folded_weight(weight, terms, owner), bias)


def clear_cache(owner: object) -> None:
    """Drop the cached W_eff of ``owner`` (it is also dropped when W or an adapter parameter changes)."""
    _CACHES.pop(owner, None)
