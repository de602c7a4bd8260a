"""Folding dense ΔWs into the base layer's matmul: y = x·(W + Σ_a s_a·ΔW_a)ᵀ + b, one matmul instead of 1 + 3.

Math. For a frozen linear layer y = x Wᵀ + b with adapters y += s_a·x ΔW_aᵀ, the unfolded dense path costs the
base matmul plus, per adapter, three matmuls of the same size (forward x ΔWᵀ, ∂x = g ΔW, ∂ΔW = gᵀ x). Folded,

    W_eff = W + Σ_a s_a·ΔW_a,      y = x W_effᵀ + b,      ∂x = g W_eff,      ∂ΔW_a = s_a·gᵀ x,

so the forward and the input gradient cost exactly what the frozen base layer costs, and the adapters add one
matmul (gᵀ x, shared by all of them, mapped to the structured parameters through ``to_dense``'s backward,
O(out·in)) plus building ΔW (O(out·in) for every structure). In training with a frozen base weight
(:func:`hybrid_linear`) only x is saved for the backward, as LoRA keeps it too; W_eff and the intermediates of
building ΔW are built again in the backward (one more O(out·in) build per step) instead of being kept, so a
folded layer holds no (out × in) matrix between forward and backward; ``keep=True`` (a config's
``keep_folded_weight=True``) holds them instead, for one build less per step. With a trainable base weight, or under
``torch.compile``, :func:`folded_linear` lets autograd differentiate W + Σ s·ΔW (it keeps W_eff and the build's
intermediates, one (out × in) matrix or more per layer).
In inference (no autograd graph through the parameters) W_eff is cached per layer while W and every adapter
parameter keep their version counters, so repeated forwards run at exactly the base layer's speed. The cache holds
one (out × in) weight per layer; a config's ``fold_inference=True`` extends this inference fold to the layers that
train with the structured product (``compute_mode="fast"``).

Hybrid (compute mode "hybrid"): the same forward and ∂x, but each adapter's parameter gradient comes from
``op.param_grads(x, g)`` through the structure, so gᵀx (N·out·in multiply-adds) is replaced by the structure's own
cost (e.g. the block DFTs of x and g for circulant). "dense" and "hybrid" adapters of one layer train together
through :func:`hybrid_linear`.

Precision: W_eff is formed in the base weight's dtype, so folding is used only for float32 / float64 base
weights (in half precision the rounding of W + s·ΔW to W's 8 / 11 mantissa bits would swallow small ΔW). Under
``torch.autocast`` the matmul runs in the autocast dtype, as the base layer's would.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .base import _compiling, has_trainable, memoised

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
    return weight.requires_grad or any(has_trainable(op) for op in ops)


def _fold(weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], cache: bool) -> torch.Tensor:
    w = weight
    for op, scale in terms:
        delta = op.delta_weight(cache=cache)  # type: ignore[operator]  # nn.Module's __getattr__ hides the method
        w = _add_scaled(w, delta, scale)
    return w


def _add_scaled(w: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """w + scale·ΔW in w's dtype: one fused pass where the dtypes agree (no scaled copy of ΔW: on 2 CPU cores about
    half the time of the two passes at 576 × 576), else ΔW scaled in its own dtype and cast. Under torch.compile
    the two-op form, which inductor fuses itself: inductor (torch 2.13) rewrites add(W, mm(a, b), alpha=s) into an
    addmm that drops alpha (the class of pytorch/pytorch#167313), which gave PMSS's C·U·R fold wrong outputs."""
    if delta.dtype == w.dtype and not _compiling():
        return torch.add(w, delta, alpha=scale)
    return w + (delta * scale).to(w.dtype)


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
    structured: Sequence[bool] | None = None,
    keep: bool = False,
) -> torch.Tensor:
    """x·(W + Σ s·ΔW)ᵀ + b for training with a frozen base weight W, keeping only x for the backward.

    W_eff = W + Σ s·ΔW is built outside autograd in the forward and built again in the backward, where it gives
    ∂x = g·W_eff (what the frozen base layer's backward costs). Each adapter's parameter gradient comes either
    from the structure, s·``op.param_grads(x, g)`` (``structured[i]`` True, compute "hybrid": the (out × in)
    matrix gᵀx is never formed), or from autograd through the rebuilt ΔW with the incoming s·gᵀx (False,
    compute "dense": one gᵀx shared by all such adapters). Saved for the backward: x (which LoRA keeps too), and
    no (out × in) matrix: neither W_eff nor the intermediates of building ΔW (for Toeplitz and LDR the dense factor
    stacks), at the cost of building ΔW once more per step (O(out·in) and less than the layer's matmuls).
    ``structured`` defaults to all True. For a frozen base weight only (a trainable W needs gᵀx anyway: use
    :func:`folded_linear`); once differentiable (no double backward).

    ``keep=True`` trades memory for time: W_eff (one (out × in) matrix) and the dense adapters' ΔW with its
    autograd graph (for Toeplitz / LDR the factor stacks, about F more (out × in) matrices) are built once, in the
    forward, and held until the backward, which then builds nothing. The values are the same as with
    ``keep=False``, bit for bit (the same operations in the same order); only the time and the memory differ.
    """
    flags = tuple(True for _ in terms) if structured is None else tuple(bool(f) for f in structured)
    if len(flags) != len(terms):
        raise ValueError(f"structured has {len(flags)} entries for {len(terms)} adapters")
    params = [p for op, _ in terms for p in op.parameters()]
    # x as it comes (the matmul on it is then the one folded_linear and the base layer run, bit for bit); the
    # output is the Function's own tensor, not a view, so in-place ops on the layer output stay legal
    return _HybridLinear.apply(x, weight, bias, tuple(terms), flags, bool(keep), *params)


class _HybridLinear(torch.autograd.Function):
    """y = x·W_effᵀ + b for x (..., in), W_eff = W + Σ s_a·ΔW_a built in the forward and again in the backward
    (or, with ``keep``, built once and held); backward: ∂x = g·W_eff, ∂b = Σ g, ∂θ_a = s_a·``op_a.param_grads(x,
    g)`` (structured) or the vector-Jacobian product of ΔW_a(θ_a) with s_a·gᵀx (dense)."""

    @staticmethod
    def forward(ctx, x, weight, bias, terms, flags, keep, *params):
        ctx.terms, ctx.flags, ctx.keep = terms, flags, keep
        rows = math.prod(x.shape[:-1])
        if keep:  # build once, with the dense adapters' graphs, and hold W_eff and those graphs for the backward
            deltas = _dense_deltas(terms, flags, rows)
            w = _fold_with(weight, terms, deltas)
            ctx.deltas = deltas
            # the parameters are saved for autograd's check that nothing changed them in place before the backward
            ctx.save_for_backward(x, weight, w, *params)
        else:
            # ΔW and W_eff are rebuilt from the parameters in the backward (they are the module's own tensors: no
            # memory)
            ctx.save_for_backward(x, weight, *params)
            w = _fold(weight, terms, cache=False)  # no autograd graph inside a Function's forward
        return nn.functional.linear(x, w, bias)  # under autocast: in the autocast dtype, as the base layer's

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        terms, flags, keep = ctx.terms, ctx.flags, ctx.keep
        if keep:
            x_in, weight, w, *_ = ctx.saved_tensors
            deltas = ctx.deltas
        else:
            x_in, weight, *_ = ctx.saved_tensors
            w, deltas = None, None
        x, grad = x_in.reshape(-1, x_in.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N × in), (N × out) rows
        rows = x.shape[0]
        if deltas is None:  # the dense adapters' ΔW with an autograd graph through their parameters (for the VJP)
            deltas = _dense_deltas(terms, flags, rows)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if w is None:
                w = _fold_with(weight, terms, deltas)  # W_eff exactly as the forward built it
            grad_x = (grad @ w.to(grad.dtype)).to(x.dtype).view(x_in.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        grads: list[torch.Tensor | None] = []
        gx: torch.Tensor | None = None  # gᵀx (out × in), shared by the dense adapters
        for i, (op, scale) in enumerate(terms):
            if not rows:  # no rows: zero gradients (the FFT-based structured gradients refuse empty batches)
                grads.extend(torch.zeros_like(p) if p.requires_grad else None for p in op.parameters())
            elif flags[i]:
                grads.extend(None if d is None else d * scale for d in op.param_grads(x, grad))
            elif i not in deltas:  # a frozen dense adapter
                grads.extend(None for _ in op.parameters())
            else:
                delta = deltas[i]
                if gx is None or gx.dtype != delta.dtype:
                    gx = grad.to(delta.dtype).T @ x.to(delta.dtype)
                trainable = [p for p in op.parameters() if p.requires_grad]
                # retain_graph with keep: the held graph stays usable if the caller retains the outer graph (it is
                # freed with ctx)
                found = iter(torch.autograd.grad(delta, trainable, gx * scale, allow_unused=True, retain_graph=keep))
                grads.extend(next(found) if p.requires_grad else None for p in op.parameters())
        return (grad_x, None, grad_bias, None, None, None, *grads)


def _dense_deltas(
    terms: Sequence[tuple[nn.Module, float]], flags: Sequence[bool], rows: int
) -> dict[int, torch.Tensor]:
    """The ΔW of each trainable dense adapter (``flags[i]`` False), with an autograd graph through its parameters."""
    with torch.enable_grad():
        return {
            i: op.delta_weight(cache=False)  # type: ignore[operator]  # nn.Module's __getattr__ hides the method
            for i, (op, _) in enumerate(terms)
            if not flags[i] and has_trainable(op) and rows
        }


def _fold_with(
    weight: torch.Tensor, terms: Sequence[tuple[nn.Module, float]], deltas: dict[int, torch.Tensor]
) -> torch.Tensor:
    """W + Σ s·ΔW as :func:`_fold` builds it (same order and casts), reusing the ΔWs in ``deltas`` (detached)."""
    with torch.no_grad():
        w = weight
        for i, (op, scale) in enumerate(terms):
            # nn.Module's __getattr__ hides the method from mypy
            delta = deltas[i].detach() if i in deltas else op.delta_weight(cache=False)  # type: ignore[operator]
            w = _add_scaled(w, delta, scale)
    return w


def clear_cache(owner: object) -> None:
    """Drop the cached W_eff of ``owner`` (it is also dropped when W or an adapter parameter changes)."""
    _CACHES.pop(owner, None)
