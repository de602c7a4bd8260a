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
        ∂R = Σ_n (Lᵀ G_n)ᵀ X_n — four matmuls, the fast product's forward skipped (see
        ``StructuredOperator.param_grads``). Each sum over n is one matmul over the stacked rows; Lᵀ G_n is a
        batched matmul with Lᵀ broadcast, or for thin blocks one matmul over per-row transposed copies (as in the
        forward, :data:`BMM_MIN_BLOCK`)."""
        (o1, i1), (o2, i2) = self.left.shape, self.right.shape
        dtype = compute_dtype(x.dtype, g.dtype, self.left.dtype)
        grad_left = grad_right = None
        with torch.autocast(self._device_type(), enabled=False):
            xm = _split_blocks(x.to(dtype), i1, i2).reshape(-1, i1, i2)  # (N, i1, i2), zero-padded to i1·i2
            gm = _split_blocks(g.to(dtype), o1, o2).reshape(-1, o1, o2)
            left, right = self.left.to(dtype), self.right.to(dtype)
            g_rows = _g_rows(gm, i2)
            if self.left.requires_grad:
                grad_left = _grad_left(xm, gm, right, g_rows).to(self.left.dtype)
            if self.right.requires_grad:
                # Σ_n (Lᵀ G_n)ᵀ X_n = Σ_n G_nᵀ L X_n: rows (n, c) of U_n = Lᵀ G_n and of X_n
                grad_right = (_u_rows(left, gm, g_rows).T @ xm.reshape(-1, i2)).to(self.right.dtype)
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
    n = xm.shape[0]
    left, right = left.to(dtype), right.to(dtype)
    # R acts on the rows' last axis: one 2-D matmul over the stacked rows. L acts on their middle axis: for blocks
    # of at least BMM_MIN_BLOCK columns a batched matmul with L broadcast (a stride-0 batch, no copy), else one 2-D
    # matmul over per-row transposed copies (the batched kernel is slow on thin blocks). Explicit kernels rather
    # than torch.matmul, whose choice for a broadcast operand depends on requires_grad: the result is
    # bit-identical in training and inference mode.
    if _batched(o2, i2):
        if right_first:
            t = (xm.reshape(-1, i2) @ right.T).view(n, i1, o2)  # X Rᵀ
            y = torch.bmm(left.expand(n, o1, i1), t)  # L X Rᵀ, (N, o1, o2)
        else:
            t = torch.bmm(left.expand(n, o1, i1), xm)  # L X, (N, o1, i2)
            y = (t.reshape(-1, i2) @ right.T).view(n, o1, o2)
    elif right_first:
        t = (xm.reshape(-1, i2) @ right.T).reshape(-1, i1, o2)  # X Rᵀ
        y = (t.transpose(1, 2).reshape(-1, i1) @ left.T).reshape(-1, o2, o1).transpose(1, 2)
    else:
        t = (xm.transpose(1, 2).reshape(-1, i1) @ left.T).reshape(-1, i2, o1)  # (L X)ᵀ
        y = (t.transpose(1, 2).reshape(-1, i2) @ right.T).reshape(-1, o1, o2)
    return y.reshape(*lead, o1 * o2)[..., :out_features]


# Smallest trailing block size (columns of X_n and G_n) for which L is applied by a batched matmul with L broadcast;
# thinner blocks take one 2-D matmul over per-row transposed copies. On 2 CPU cores (N = 512 and 4,096 rows) the
# batched product was 1.2-2.4x faster for blocks of 10-78 columns (24 x 24 ⊗ 24 x 24: forward 0.46x, with backward
# 0.71-0.78x) and up to 1.4x slower for 5-8 (78 x 78 ⊗ 5 x 5, MiniLM's budget factors).
BMM_MIN_BLOCK = 10


def _batched(o2: int, i2: int) -> bool:
    return min(o2, i2) >= BMM_MIN_BLOCK


def _grad_left(xm: torch.Tensor, gm: torch.Tensor, right: torch.Tensor, g_rows: torch.Tensor | None) -> torch.Tensor:
    """∂L = Σ_n G_n (X_n Rᵀ)ᵀ (o1 × i1) from the rows X_n (N, i1, i2) and G_n (N, o1, o2): T_n = X_n Rᵀ, then
    Σ_n,j G_n[a, j] T_n[c, j] as one matmul over the stacked (n, j). ``g_rows``: None on the batched path
    (:func:`_batched`), else :func:`_g_rows` of ``gm``, shared with :func:`_u_rows`."""
    n, i1, i2 = xm.shape
    o1, o2 = gm.shape[1:]
    t = (xm.reshape(-1, i2) @ right.T).view(n, i1, o2)  # X_n Rᵀ
    if g_rows is None:  # (o1, N·o2) @ (N·o2, i1), one copy of G and of T in that layout
        return gm.permute(1, 0, 2).reshape(o1, -1) @ t.permute(1, 0, 2).reshape(i1, -1).T
    return g_rows.T @ t.transpose(1, 2).reshape(-1, i1)  # rows (n, j) of G_nᵀ and of T_nᵀ


def _g_rows(gm: torch.Tensor, i2: int) -> torch.Tensor | None:
    """The rows (n, j) of G_nᵀ, (N·o2, o1), for thin blocks (G_n (N, o1, o2), X_n's width i2); None where the
    batched path (:func:`_batched`) needs no such copy."""
    if _batched(gm.shape[2], i2):
        return None
    return gm.transpose(1, 2).reshape(-1, gm.shape[1])


def _u_rows(left: torch.Tensor, gm: torch.Tensor, g_rows: torch.Tensor | None) -> torch.Tensor:
    """The rows (n, c) of U_n = Lᵀ G_n, (N·i1, o2), from G_n (N, o1, o2) (``g_rows`` as in :func:`_grad_left`)."""
    (o1, i1), (n, _, o2) = left.shape, gm.shape
    if g_rows is None:  # a batched matmul with Lᵀ broadcast (no copy)
        return torch.bmm(left.T.expand(n, i1, o1), gm).reshape(-1, o2)
    return (g_rows @ left).reshape(-1, o2, i1).transpose(1, 2).reshape(-1, o2)


class _KroneckerProduct(torch.autograd.Function):
    """:func:`_kronecker_product` keeping only x (and the small factors) for the backward.

    Autograd through the two reshaped matmuls keeps the intermediate T_n = X_n Rᵀ (or L X_n), a copy as large as
    the input (N × i1·o2), per layer. Here it is recomputed in the backward (one thin matmul, N·i1·i2·o2
    multiply-adds), with G_n (o1 × o2) the reshaped output gradient and U_n = Lᵀ G_n (i1 × o2):

        ∂X_n = U_n R,      ∂R = Σ_n U_nᵀ X_n,      ∂L = Σ_n G_n (X_n Rᵀ)ᵀ,

    five matmuls (Lᵀ G_n batched with Lᵀ broadcast for blocks of at least BMM_MIN_BLOCK columns), in the
    compute dtype with autocast off. The backward is itself differentiable (double
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
            g_rows = _g_rows(gm, i2)
            if need_x or need_right:
                u_rows = _u_rows(lf, gm, g_rows)  # rows (n, a) of U_n = Lᵀ G_n
                if need_x:
                    gx = (u_rows @ rf).reshape(-1, i1 * i2)[:, : x.shape[-1]]  # rows of U_n R, cropped to in
                    grad_x = gx.reshape(x.shape).to(x.dtype)
                if need_right:
                    grad_right = (u_rows.T @ xm.reshape(-1, i2)).to(right.dtype)
            if need_left:
                grad_left = _grad_left(xm, gm, rf, g_rows).to(left.dtype)  # X_n Rᵀ recomputed there
        return grad_x, grad_left, grad_right, None, None
