"""Low-displacement-rank ΔW: sums of circulant × skew-circulant products, applied with real FFTs.

Math. circ(c)[a, s] = c[(a − s) mod b]; the skew-circulant skew(h)[a, s] = h[a − s] if a >= s else −h[a − s + b].
Every b × b matrix M of displacement rank r w.r.t. (Z₁, Z₋₁) — rank(Z₁ M − M Z₋₁) <= r, Z_f the unit f-circulant
shift — can be written (Pan) as

    M = Σ_{k=1..r} circ(c_k) · skew(h_k).

ΔW (out × in) is a q × p grid of such blocks (padding / cropping as in :mod:`structpeft.operators.base`).
skew(h)·x is a negacyclic convolution: the linear convolution h * x (a circular one of length 2b, one real FFT)
folded as y[a] = (h*x)[a] − (h*x)[a + b]; circ(c)·z is a cyclic convolution (real FFT of length b). All r terms
and all grid blocks go through the same batched FFT calls: one rfft(2b) of the input, one batched irfft(2b),
one batched rfft(b), a sum over r and input blocks in the frequency domain, one irfft(b). Intermediates: r·q·p·2b
values per row, recomputed in the backward rather than saved where that exceeds in + out
(:mod:`structpeft.operators.base`).
Shapes: ``circ`` and ``skew`` (r, q, p, b). Parameters: 2·r·q·p·b (single default block: 2·r·max(out, in)).
Init (``init=True``, the paper's): circ = 0, skew ~ N(0, 0.02²) → ΔW = 0, circ receives gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    BlockGridOperator,
    check_positive_int,
    circulant_dense,
    compute_dtype,
    grid_shape,
    largest_block_size_within,
    resolve_block_size,
    skew_circulant_dense,
)


class LDROperator(BlockGridOperator):
    """Σ_k circ(c_k)·skew(h_k) blocks; ``displacement_rank`` r >= 1 and ``block_size`` control the size."""

    structure = "ldr"
    option_names = ("block_size", "displacement_rank")

    def __init__(
        self, out_features: int, in_features: int, block_size: int | None = None, displacement_rank: int = 1
    ) -> None:
        super().__init__(out_features, in_features, block_size)
        self.displacement_rank = check_positive_int("displacement_rank", displacement_rank)
        q, p = self.grid
        self.circ = nn.Parameter(torch.zeros(displacement_rank, q, p, self.block_size))
        self.skew = nn.Parameter(torch.zeros(displacement_rank, q, p, self.block_size))
        self.reset_parameters(True)

    @property
    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "displacement_rank": self.displacement_rank}

    @classmethod
    def num_parameters(
        cls, out_features: int, in_features: int, block_size: int | None = None, displacement_rank: int = 1
    ) -> int:
        b = resolve_block_size(out_features, in_features, block_size)
        q, p = grid_shape(out_features, in_features, b)
        return 2 * check_positive_int("displacement_rank", displacement_rank) * q * p * b

    @classmethod
    def options_for_budget(
        cls, out_features: int, in_features: int, n_params: int, displacement_rank: int = 1, **fixed: Any
    ) -> dict[str, Any]:
        b = largest_block_size_within(
            out_features,
            in_features,
            n_params,
            lambda b: cls.num_parameters(out_features, in_features, b, displacement_rank),
        )
        return {"block_size": b, "displacement_rank": displacement_rank}

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        if init:
            self.circ.zero_()
            self.skew.normal_(0.0, 0.02)
        else:
            self.circ.normal_(0.0, self.block_size**-0.5)
            self.skew.normal_(0.0, self.block_size**-0.5)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dtype = compute_dtype(x.dtype, self.circ.dtype)
        b = self.block_size
        xf = torch.fft.rfft(self._split_input(x.to(dtype)), n=2 * b, dim=-1)  # (..., p, f2)
        hf = self.cached(f"skew-spectrum-{dtype}", lambda: torch.fft.rfft(self.skew.to(dtype), n=2 * b, dim=-1))
        conv = torch.fft.irfft(xf[..., None, None, :, :] * hf, n=2 * b, dim=-1)  # (..., r, q, p, 2b)
        z = conv[..., :b] - conv[..., b:]  # negacyclic fold: skew(h) x
        cf = self.cached(f"circ-spectrum-{dtype}", lambda: torch.fft.rfft(self.circ.to(dtype), dim=-1))
        yf = (torch.fft.rfft(z, dim=-1) * cf).sum(dim=(-4, -2))  # sum over r and input blocks -> (..., q, f)
        return self._merge_output(torch.fft.irfft(yf, n=b, dim=-1))

    def fast_intermediates(self) -> int:
        """The (r, q, p, 2b) convolutions per row and their spectra."""
        q, p = self.grid
        return self.displacement_rank * q * p * 2 * self.block_size

    def to_dense(self) -> torch.Tensor:
        dtype = compute_dtype(self.circ.dtype)  # products of half-precision factors lose accuracy
        if self.displacement_rank == 1:  # select the small (q, p, b) parameters, not the (q, p, b, b) matrices
            return self._assemble(
                circulant_dense(self.circ[0].to(dtype)) @ skew_circulant_dense(self.skew[0].to(dtype))
            )
        circ = circulant_dense(self.circ.to(dtype))  # (r, q, p, b, b)
        skew = skew_circulant_dense(self.skew.to(dtype))
        return self._assemble((circ @ skew).sum(dim=0))
