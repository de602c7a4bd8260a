"""Kronecker-product ΔW, applied by reshapes and two small matmuls (never the dense kron in forward).

Math. ΔW = (L ⊗ R)[:out, :in] with L (o1 × i1), R (o2 × i2), o2 = ceil(out / o1), i2 = ceil(in / i1). For x
reshaped row-major to X (i1 × i2) (zero-padded from in to i1·i2), (L ⊗ R)·vec(X) = vec(L · X · Rᵀ), so

    y = crop(vec(L @ X @ R.T))      cost per token: i1·i2·o2 + o1·i1·o2 (or the other order, whichever is less).

Parameters: o1·i1 + o2·i2; rank(ΔW) <= rank(L)·rank(R). ``factor_shape=(o1, i1)`` sets the shape of L;
``None`` chooses, among factor sizes whose padding wastes at most max(5 %, 1) of each dimension, a pair that
allows full rank (rank bound min(o1, i1)·min(o2, i2) >= min(out, in)) and is the most balanced, o1 ≈ sqrt(out)
and i1 ≈ sqrt(in) (≈ 2·sqrt(out·in) parameters, the paper's in + out for square layers); prime sizes fall back
gracefully by padding and cropping (97 × 89 → L 10 × 9, R 10 × 10).
The paper's (α/r)·kron(B, A) with B (out/r × r), A (r × in/r) is ``factor_shape=(out // r, r)``.
With a parameter budget, the factor shapes with the highest rank bound min(o1, i1)·min(o2, i2) (capped at
min(out, in)) are preferred, then the most parameters within the budget.
Init (``init=True``, the paper's): L = 0, R Kaiming-uniform, so ΔW = 0 and L receives gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import StructuredOperator, _compiling, _split_blocks, check_positive_int, compute_dtype, has_trainable

MAX_PAD_FRACTION = 0.05


def _factor_candidates(n: int) -> list[int]:
    """Sizes d of the first factor along a dimension n whose padding d·ceil(n/d) − n is at most max(5 % of n, 1)."""
    return [d for d in range(1, n + 1) if d * math.ceil(n / d) - n <= max(MAX_PAD_FRACTION * n, 1)]


def _imbalance(out_features: int, in_features: int, o1: int, i1: int) -> float:
    """Distance of (o1, i1) from (sqrt(out), sqrt(in)) on a log scale (balanced factors give the highest rank),
    plus the padded fraction of each dimension (an exact factorisation wins over a padded one that is barely
    more balanced)."""
    pad = (o1 * math.ceil(out_features / o1) - out_features) / out_features
    pad += (i1 * math.ceil(in_features / i1) - in_features) / in_features
    return abs(math.log(o1) - 0.5 * math.log(out_features)) + abs(math.log(i1) - 0.5 * math.log(in_features)) + pad


def _rank_bound(out_features: int, in_features: int, o1: int, i1: int) -> int:
    """The largest rank L ⊗ R can have: rank(L)·rank(R) <= min(o1, i1)·min(o2, i2), capped at min(out, in)."""
    o2, i2 = math.ceil(out_features / o1), math.ceil(in_features / i1)
    return min(min(o1, i1) * min(o2, i2), out_features, in_features)


def _count(out_features: int, in_features: int, o1: int, i1: int) -> int:
    return o1 * i1 + math.ceil(out_features / o1) * math.ceil(in_features / i1)


class KroneckerOperator(StructuredOperator):
    """ΔW = crop(L ⊗ R); ``factor_shape`` = shape of L (see the module docstring)."""

    structure = "kronecker"
    option_names = ("factor_shape",)

    def __init__(
        self, out_features: int, in_features: int, factor_shape: tuple[int, int] | list[int] | None = None
    ) -> None:
        super().__init__(out_features, in_features)
        o1, i1 = self.resolve_factor_shape(out_features, in_features, factor_shape)
        o2, i2 = math.ceil(out_features / o1), math.ceil(in_features / i1)
        self.factor_shape = (o1, i1)
        self.left = nn.Parameter(torch.zeros(o1, i1))
        self.right = nn.Parameter(torch.zeros(o2, i2))
        # apply R first when it is cheaper: (X Rᵀ costs i1·i2·o2, then L· costs o1·i1·o2)
        self._right_first = i1 * i2 * o2 + o1 * i1 * o2 <= o1 * i1 * i2 + o1 * i2 * o2
        self.reset_parameters(True)

    @staticmethod
    def resolve_factor_shape(
        out_features: int, in_features: int, factor_shape: tuple[int, int] | list[int] | None
    ) -> tuple[int, int]:
        if factor_shape is None:
            pairs = [(o1, i1) for o1 in _factor_candidates(out_features) for i1 in _factor_candidates(in_features)]
            full = min(out_features, in_features)
            # full rank possible first (the docstring's promise), then the most balanced, then the fewest parameters
            return min(
                pairs,
                key=lambda s: (
                    _rank_bound(out_features, in_features, *s) < full,
                    _imbalance(out_features, in_features, *s),
                    _count(out_features, in_features, *s),
                ),
            )
        if not isinstance(factor_shape, (tuple, list)) or len(factor_shape) != 2:
            raise ConfigError(f"factor_shape={factor_shape!r} is invalid: expected a pair (o1, i1) or None")
        o1 = check_positive_int("factor_shape[0]", factor_shape[0])
        i1 = check_positive_int("factor_shape[1]", factor_shape[1])
        if o1 > out_features or i1 > in_features:
            raise ConfigError(
                f"factor_shape={tuple(factor_shape)!r} does not fit a ({out_features} x {in_features}) layer: "
                f"need 1 <= o1 <= {out_features} and 1 <= i1 <= {in_features}"
            )
        return o1, i1

    @property
    def options(self) -> dict[str, Any]:
        return {"factor_shape": list(self.factor_shape)}

    @classmethod
    def num_parameters(
        cls, out_features: int, in_features: int, factor_shape: tuple[int, int] | list[int] | None = None
    ) -> int:
        return _count(out_features, in_features, *cls.resolve_factor_shape(out_features, in_features, factor_shape))

    @classmethod
    def options_for_budget(cls, out_features: int, in_features: int, n_params: int, **fixed: Any) -> dict[str, Any]:
        best = None
        for o1 in _factor_candidates(out_features):
            for i1 in _factor_candidates(in_features):
                n = _count(out_features, in_features, o1, i1)
                key = (
                    _rank_bound(out_features, in_features, o1, i1),
                    n,
                    -_imbalance(out_features, in_features, o1, i1),
                )
                if n <= n_params and (best is None or key > best[0]):
                    best = (key, (o1, i1))
        if best is None:
            smallest = min(
                _count(out_features, in_features, o1, i1)
                for o1 in _factor_candidates(out_features)
                for i1 in _factor_candidates(in_features)
            )
            raise ConfigError(
                f"budget of {n_params} parameters is too small for a ({out_features} x {in_features}) layer: "
                f"the smallest Kronecker factorisation has {smallest}"
            )
        return {"factor_shape": list(best[1])}

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        if init:
            self.left.zero_()
            nn.init.kaiming_uniform_(self.right, a=math.sqrt(5))
        else:
            self.left.normal_(0.0, self.left.shape[1] ** -0.5)
            self.right.normal_(0.0, self.right.shape[1] ** -0.5)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if _compiling() or not (torch.is_grad_enabled() and (x.requires_grad or has_trainable(self))):
            return _kronecker_product(x, self.left, self.right, self.out_features, self._right_first)
        return _KroneckerProduct.apply(x, self.left, self.right, self.out_features, self._right_first)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """With X_n (i1 × i2), G_n (o1 × o2) the reshaped (padded) rows: ∂L = Σ_n G_n (X_n Rᵀ)ᵀ and
        ∂R = Σ_n G_nᵀ (L X_n) — four thin matmuls, the fast product's forward skipped (see
        ``StructuredOperator.param_grads``). Each sum over n is one matmul over the stacked rows, laid out so that
        only the small per-row blocks are transposed (cache-local copies), never the N axis."""
        (o1, i1), (o2, i2) = self.left.shape, self.right.shape
        dtype = compute_dtype(x.dtype, g.dtype, self.left.dtype)
        grad_left = grad_right = None
        with torch.autocast(self._device_type(), enabled=False):
            xm = _split_blocks(x.to(dtype), i1, i2)  # (N, i1, i2), zero-padded to i1·i2
            gm = _split_blocks(g.to(dtype), o1, o2)
            left, right = self.left.to(dtype), self.right.to(dtype)
            if self.left.requires_grad:
                grad_left = _grad_left(xm, gm.transpose(1, 2).reshape(-1, o1), right).to(self.left.dtype)
            if self.right.requires_grad:
                st = (xm.transpose(1, 2).reshape(-1, i1) @ left.T).reshape(-1, i2, o1)  # (L X_n)ᵀ
                # Σ_n,a G_n[a, j] (L X_n)[a, k]: rows (n, a) of G_n and L X_n
                grad_right = gm.reshape(-1, o2).T @ st.transpose(1, 2).reshape(-1, i2)
                grad_right = grad_right.to(self.right.dtype)
        return grad_left, grad_right

    def to_dense(self) -> torch.Tensor:
        (o1, i1), (o2, i2) = self.left.shape, self.right.shape
        dtype = compute_dtype(self.left.dtype)
        left, right = self.left.to(dtype), self.right.to(dtype)
        full = (left[:, None, :, None] * right[None, :, None, :]).reshape(o1 * o2, i1 * i2)
        return full[: self.out_features, : self.in_features]


def _kronecker_product(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out_features: int, right_first: bool
) -> torch.Tensor:
    """crop(vec(L · X_n · Rᵀ)) for every row x_n of ``x`` (..., in) reshaped (zero-padded) to X_n (i1 × i2)."""
    (o1, i1), (o2, i2) = left.shape, right.shape
    dtype = torch.promote_types(x.dtype, left.dtype)
    lead = x.shape[:-1]
    xm = _split_blocks(x.to(dtype), i1, i2).reshape(-1, i1, i2)  # (N, i1, i2), zero-padded to i1·i2
    left, right = left.to(dtype), right.to(dtype)
    # plain 2-D matmuls (not broadcast batched ones, whose kernel choice depends on requires_grad), so that
    # the result is bit-identical in training and inference mode
    if right_first:
        t = (xm.reshape(-1, i2) @ right.T).reshape(-1, i1, o2)  # X Rᵀ
        y = (t.transpose(1, 2).reshape(-1, i1) @ left.T).reshape(-1, o2, o1).transpose(1, 2)
    else:
        t = (xm.transpose(1, 2).reshape(-1, i1) @ left.T).reshape(-1, i2, o1)  # (L X)ᵀ
        y = (t.transpose(1, 2).reshape(-1, i2) @ right.T).reshape(-1, o1, o2)
    return y.reshape(*lead, o1 * o2)[..., :out_features]


def _grad_left(xm: torch.Tensor, g_rows: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """∂L = Σ_n G_n (X_n Rᵀ)ᵀ (o1 × i1) from the rows X_n (N, i1, i2) and ``g_rows``, the rows (n, j) of G_nᵀ
    (N·o2, o1): T_n = X_n Rᵀ, then Σ_n,j G_n[a, j] T_n[c, j] as one matmul over the stacked rows (n, j)."""
    i1, i2 = xm.shape[-2:]
    t = (xm.reshape(-1, i2) @ right.T).reshape(-1, i1, right.shape[0])  # X_n Rᵀ
    return g_rows.T @ t.transpose(1, 2).reshape(-1, i1)


class _KroneckerProduct(torch.autograd.Function):
    """:func:`_kronecker_product` keeping only x (and the small factors) for the backward.

    Autograd through the two reshaped matmuls keeps the intermediate T_n = X_n Rᵀ (or L X_n), a copy as large as
    the input (N × i1·o2), per layer. Here it is recomputed in the backward (one thin matmul, N·i1·i2·o2
    multiply-adds), with G_n (o1 × o2) the reshaped output gradient and U_n = Lᵀ G_n (i1 × o2):

        ∂X_n = U_n R,      ∂R = Σ_n U_nᵀ X_n,      ∂L = Σ_n G_n (X_n Rᵀ)ᵀ,

    five thin matmuls, in the compute dtype with autocast off. The backward is itself differentiable (double
    backward works).
    """

    @staticmethod
    def forward(ctx, x, left, right, out_features, right_first):
        ctx.save_for_backward(x, left, right)
        return _kronecker_product(x, left, right, out_features, right_first)

    @staticmethod
    def backward(ctx, grad):
        x, left, right = ctx.saved_tensors
        (o1, i1), (o2, i2) = left.shape, right.shape
        dtype = compute_dtype(x.dtype, grad.dtype, left.dtype, right.dtype)
        need_x, need_left, need_right = ctx.needs_input_grad[:3]
        grad_x = grad_left = grad_right = None
        device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
        with torch.autocast(device_type, enabled=False):
            xm = _split_blocks(x.to(dtype), i1, i2).reshape(-1, i1, i2)  # (N, i1, i2)
            gm = _split_blocks(grad.to(dtype), o1, o2).reshape(-1, o1, o2)  # (N, o1, o2)
            lf, rf = left.to(dtype), right.to(dtype)
            g_rows = gm.transpose(1, 2).reshape(-1, o1)  # rows (n, j) of G_nᵀ
            if need_x or need_right:
                u_rows = (g_rows @ lf).reshape(-1, o2, i1).transpose(1, 2).reshape(-1, o2)  # rows (n, a) of U_n
                if need_x:
                    gx = (u_rows @ rf).reshape(-1, i1 * i2)[:, : x.shape[-1]]  # rows of U_n R, cropped to in
                    grad_x = gx.reshape(x.shape).to(x.dtype)
                if need_right:
                    grad_right = (u_rows.T @ xm.reshape(-1, i2)).to(right.dtype)
            if need_left:
                grad_left = _grad_left(xm, g_rows, rf).to(left.dtype)  # X_n Rᵀ recomputed there
        return grad_x, grad_left, grad_right, None, None
