"""Block ΔW whose blocks are products of Toeplitz matrices, applied with zero-padded real FFTs.

Math. ``T(v)`` is the b × b Toeplitz matrix built from its 2b − 1 diagonals, ``T(v)[r, s] = v[r − s + b − 1]``
(first column v[b−1:], first row v[b−1::−1]). ΔW (out × in) is a q × p grid of b × b blocks (padding / cropping
as in :mod:`structpeft.operators.base`); block (i, j) is a product of F Toeplitz factors

    B_ij = T(w[F−1, i, j]) ··· T(w[1, i, j]) · T(w[0, i, j])       (factor 0 is applied first).

The SURM paper's Toeplitz variant is F = 2 with symmetric factors T(b, b)·T(a, a); we use general (first row and
column free) factors, a superset. ``T(v) x`` is the slice [b−1, 2b−1) of the linear convolution v * x, computed
as a circular convolution of length 2b (no aliasing since len(v * x) = 3b − 2 ≤ 2b + b − 1).
Shapes: ``weight`` (F, q, p, 2b − 1). Parameters: F·q·p·(2b − 1) (single default block: F·(2·max(out, in) − 1)).
Cost per token: O(F·q·p·b log b) FFT work, intermediates of q·p·2b values per factor (F > 1: recomputed in the
backward rather than saved where that exceeds in + out, see :mod:`structpeft.operators.base`; F = 1: the
circulant's product of length 2b at window offset b − 1, whose backward keeps x and the weight alone, see
:mod:`structpeft.operators.circulant`).
Init (``init=True``, the paper's): factor 0 ~ N(0, 0.02²), middle factors the identity, last factor 0, so
ΔW = 0 with a non-zero gradient for the last factor. ``init=False``: every factor N(0, 1/b).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    BlockGridOperator,
    check_positive_int,
    compute_dtype,
    grid_shape,
    largest_block_size_within,
    resolve_block_size,
    toeplitz_dense,
)
from .circulant import circular_product, circular_product_for_training


class ToeplitzOperator(BlockGridOperator):
    """Blocks that are products of ``num_factors`` Toeplitz matrices (see the module docstring)."""

    structure = "toeplitz"
    option_names = ("block_size", "num_factors")

    def __init__(
        self, out_features: int, in_features: int, block_size: int | None = None, num_factors: int = 2
    ) -> None:
        super().__init__(out_features, in_features, block_size)
        self.num_factors = check_positive_int("num_factors", num_factors)
        q, p = self.grid
        self.weight = nn.Parameter(torch.zeros(num_factors, q, p, 2 * self.block_size - 1))
        self.reset_parameters(True)

    @property
    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "num_factors": self.num_factors}

    @classmethod
    def num_parameters(
        cls, out_features: int, in_features: int, block_size: int | None = None, num_factors: int = 2
    ) -> int:
        b = resolve_block_size(out_features, in_features, block_size)
        q, p = grid_shape(out_features, in_features, b)
        return check_positive_int("num_factors", num_factors) * q * p * (2 * b - 1)

    @classmethod
    def options_for_budget(
        cls, out_features: int, in_features: int, n_params: int, num_factors: int = 2, **fixed: Any
    ) -> dict[str, Any]:
        b = largest_block_size_within(
            out_features,
            in_features,
            n_params,
            lambda b: cls.num_parameters(out_features, in_features, b, num_factors),
        )
        return {"block_size": b, "num_factors": num_factors}

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        b = self.block_size
        if not init:
            self.weight.normal_(0.0, b**-0.5)
            return
        self.weight.zero_()
        if self.num_factors > 1:
            self.weight[0].normal_(0.0, 0.02)
            self.weight[1:-1, ..., b - 1] = 1.0  # identity factors in the middle

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, n_fft = self.block_size, 2 * self.block_size
        if self.num_factors == 1 and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training: the same product, keeping x and the weight alone for the backward
            return circular_product_for_training(x, self.weight[0], self.grid, b, self.out_features, n_fft, b - 1)
        dtype = compute_dtype(x.dtype, self.weight.dtype)
        wf = self.cached(  # (F, q, p, f)
            f"spectrum-{dtype}", lambda: torch.fft.rfft(self.weight.to(dtype), n=n_fft, dim=-1)
        )
        if self.num_factors == 1:
            return circular_product(x, wf[0], self.grid, b, self.out_features, n_fft, b - 1)
        xf = torch.fft.rfft(self._split_input(x.to(dtype)), n=n_fft, dim=-1)  # (..., p, f)
        h = xf.unsqueeze(-3) * wf[0]  # (..., q, p, f)
        for k in range(1, self.num_factors):
            t = torch.fft.irfft(h, n=n_fft, dim=-1)[..., b - 1 : 2 * b - 1]
            h = torch.fft.rfft(t, n=n_fft, dim=-1) * wf[k]
        yf = h.sum(dim=-2)  # the sum over input blocks commutes with the inverse FFT
        y = torch.fft.irfft(yf, n=n_fft, dim=-1)[..., b - 1 : 2 * b - 1]  # (..., q, b)
        return self._merge_output(y)

    def fast_intermediates(self) -> int:
        """Several factors: each chains through (q, p, 2b) values per row (spectra and the cropped products)."""
        q, p = self.grid
        return 0 if self.num_factors == 1 else q * p * 2 * self.block_size

    def factors_dense(self) -> torch.Tensor:
        """The dense Toeplitz factors, shape (F, q, p, b, b)."""
        return toeplitz_dense(self.weight)

    def to_dense(self) -> torch.Tensor:
        weight = self.weight.to(compute_dtype(self.weight.dtype))  # products of half-precision factors lose accuracy
        # one factor at a time: a select on the small weight, not on the (F, q, p, b, b) stack, whose backward would
        # write a zero-filled copy of the whole stack per factor
        blocks = toeplitz_dense(weight[0])
        for k in range(1, self.num_factors):
            blocks = toeplitz_dense(weight[k]) @ blocks
        return self._assemble(blocks)
