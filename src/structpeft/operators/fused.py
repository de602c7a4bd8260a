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

Hybrid (compute mode "hybrid", :func:`hybrid_linear`): the same forward and ∂x, but W_eff is built outside
autograd and each adapter's parameter gradient comes from ``op.param_grads(x, g)`` through the structure, so gᵀx
(N·out·in multiply-adds) is replaced by the structure's own cost (e.g. the block DFTs of x and g for circulant).

Precision: W_eff is formed in the base weight's dtype, so folding is used only for float32 / float64 base
weights (in half precision the rounding of W + s·ΔW to W's 8 / 11 mantissa bits would swallow small ΔW). Under
``torch.autocast`` the matmul runs in the autocast dtype, as the base layer's would.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .base import _compiling, memoised

FOLDABLE_DTYPES = (torch.float32, torch.float64)
# compute modes whose adapters a layer folds into its base matmul (see structpeft.operators.dispatch)
FOLDED_MODES = ("dense", "hybrid")
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def folded_weight(
    weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], owner: object | None = None
) -> torch.Tensor:
    """W + Σ s·ΔW in W's dtype (each ΔW built by ``op.delta_weight``), cached per ``owner`` outside autograd."""
    params = [p for op, _ in terms for p in op.parameters()]
    if owner is None or records_grad(weight, [op for op, _ in terms]) or _compiling():
        return _fold(weight, terms, cache=False)
    return memoised(
        _CACHES.setdefault(owner, {}),
        "folded",
        [weight, *params],
        lambda: _fold(weight, terms, cache=False),
        extra=(tuple(scale for _, scale in terms),),
    )


def records_grad(weight: torch.Tensor, ops: Sequence[nn.Module]) -> bool:
    """True if autograd records a graph through ``weight`` or a parameter of ``ops`` (training), False in
    inference (``torch.no_grad`` / ``torch.inference_mode``, or everything frozen)."""
    if not torch.is_grad_enabled():
        return False
    return weight.requires_grad or any(p.requires_grad for op in ops for p in op.parameters())


def _fold(weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], cache: bool) -> torch.Tensor:
    w = weight
    for op, scale in terms:
        delta = op.delta_weight(cache=cache)  # type: ignore[operator]  # nn.Module's __getattr__ hides the method
        w = w + (delta * scale).to(weight.dtype)
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


def hybrid_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    terms: Sequence[tuple[nn.Module, float]],
) -> torch.Tensor:
    """x·(W + Σ s·ΔW)ᵀ + b with the adapter parameters' gradients from ``op.param_grads`` (compute "hybrid").

    The folded weight W_eff is built outside autograd; the backward computes ∂x = g·W_eff (what the frozen base
    layer's backward costs) and, per adapter, s·``op.param_grads(x, g)`` through the structure, so the (out × in)
    matrix gᵀx is never formed. Saved for the backward: x and W_eff, as in :func:`folded_linear`. For a frozen
    base weight only (a trainable W needs gᵀx anyway: use :func:`folded_linear`).
    """
    with torch.no_grad():
        w = _fold(weight, terms, cache=False)
    params = [p for op, _ in terms for p in op.parameters()]
    # the Function works on 2-D rows (its output is then a fresh tensor, not a view, so in-place ops on the
    # layer output stay legal)
    y = _HybridLinear.apply(x.reshape(-1, x.shape[-1]), w, bias, tuple(terms), *params)
    return y.view(*x.shape[:-1], y.shape[-1])


class _HybridLinear(torch.autograd.Function):
    """y = x·W_effᵀ + b for x (N × in); backward: ∂x = g·W_eff, ∂b = Σ g, ∂θ_a = s_a·``op_a.param_grads(x, g)``."""

    @staticmethod
    def forward(ctx, x, w, bias, terms, *params):
        ctx.save_for_backward(x, w)
        ctx.terms = terms
        return nn.functional.linear(x, w, bias)  # under autocast: in the autocast dtype, as the base layer's

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        grads: list[torch.Tensor | None] = []
        for op, scale in ctx.terms:
            if x.shape[0] == 0:  # no rows: zero gradients (the FFT-based structured gradients refuse empty batches)
                grads.extend(torch.zeros_like(p) if p.requires_grad else None for p in op.parameters())
                continue
            grads.extend(None if d is None else d * scale for d in op.param_grads(x, grad))
        return (grad_x, None, grad_bias, None, *grads)


def clear_cache(owner: object) -> None:
    """Drop the cached W_eff of ``owner`` (it is also dropped when W or an adapter parameter changes)."""
    _CACHES.pop(owner, None)
