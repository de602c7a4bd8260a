"""Block-circulant ΔW, applied with real FFTs.

Math. ``circ(c)`` is the b × b circulant matrix with first column c: ``circ(c)[i, j] = c[(i - j) mod b]``, and
``circ(c) x = irfft(rfft(c) * rfft(x))``. ΔW (out × in) is a q × p grid of circulant blocks (see
:mod:`structpeft.operators.base` for padding / cropping), block (i, j) = circ(weight[i, j]):

    y_i = Σ_j circ(c_ij) x_j      for x split into p blocks x_j of length b, y cropped to out.

Shapes: ``weight`` (q, p, b). Parameters: q·p·b = ceil(out/b)·ceil(in/b)·b (≈ out·in / b; with the default
single block b = max(out, in), exactly max(out, in)). Cost per token: p real FFTs of length b, q·p·(b/2+1)
complex multiply-adds, q inverse FFTs: O((p + q)·b log b + q·p·b) instead of out·in.
Init: ``weight = 0`` (ΔW = 0; ΔW is linear in the weight, so gradients are not zero). ``init=False``:
N(0, 1/in) entries. Only ``rfft`` / ``irfft`` are used: the data are real.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    BlockGridOperator,
    circulant_dense,
    compute_dtype,
    grid_shape,
    largest_block_size_within,
    resolve_block_size,
)


class CirculantOperator(BlockGridOperator):
    """Block-circulant ΔW; ``block_size`` b controls the parameter count (q·p·b, see the module docstring)."""

    structure = "circulant"

    def __init__(self, out_features: int, in_features: int, block_size: int | None = None) -> None:
        super().__init__(out_features, in_features, block_size)
        q, p = self.grid
        self.weight = nn.Parameter(torch.zeros(q, p, self.block_size))

    @property
    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    @classmethod
    def num_parameters(cls, out_features: int, in_features: int, block_size: int | None = None) -> int:
        b = resolve_block_size(out_features, in_features, block_size)
        q, p = grid_shape(out_features, in_features, b)
        return q * p * b

    @classmethod
    def options_for_budget(cls, out_features: int, in_features: int, n_params: int, **fixed: Any) -> dict[str, Any]:
        b = largest_block_size_within(
            out_features, in_features, n_params, lambda b: cls.num_parameters(out_features, in_features, b)
        )
        return {"block_size": b}

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        if init:
            self.weight.zero_()
        else:
            self.weight.normal_(0.0, self.in_features**-0.5)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dtype = compute_dtype(x.dtype, self.weight.dtype)
        b = self.block_size
        xf = torch.fft.rfft(self._split_input(x.to(dtype)), dim=-1)  # (..., p, f)
        wf = self.cached(f"spectrum-{dtype}", lambda: torch.fft.rfft(self.weight.to(dtype), dim=-1))  # (q, p, f)
        if self.grid == (1, 1):
            yf = xf * wf[0]  # (..., 1, f)
        else:
            yf = torch.einsum("...pf,qpf->...qf", xf, wf)
        y = torch.fft.irfft(yf, n=b, dim=-1)  # (..., q, b)
        return self._merge_output(y)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂weight[i, j] = Σ_n corr(g_n,i, x_n,j): the circular cross-correlation of output block i's gradient with
        input block j, irfft(Σ_n rfft(g_n,i)·conj(rfft(x_n,j))) — two batched rffts, one frequency-domain einsum
        over the N rows and one small irfft of (q, p, f) (see ``StructuredOperator.param_grads``)."""
        if not self.weight.requires_grad:
            return (None,)
        dtype = compute_dtype(x.dtype, g.dtype, self.weight.dtype)
        with torch.autocast(self._device_type(), enabled=False):
            xf = torch.fft.rfft(self._split_input(x.to(dtype)), dim=-1)  # (N, p, f)
            gf = torch.fft.rfft(self._split_output(g.to(dtype)), dim=-1)  # (N, q, f)
            spectrum = torch.einsum("nqf,npf->qpf", gf, xf.conj())
            grad = torch.fft.irfft(spectrum, n=self.block_size, dim=-1)  # (q, p, b)
        return (grad.to(self.weight.dtype),)

    def to_dense(self) -> torch.Tensor:
        return self._assemble(circulant_dense(self.weight))  # (q, p, b, b) blocks
