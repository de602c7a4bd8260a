"""Block-circulant ΔW, applied with real FFTs.

Math. ``circ(c)`` is the b × b circulant matrix with first column c: ``circ(c)[i, j] = c[(i - j) mod b]``, and
``circ(c) x = irfft(rfft(c) * rfft(x))``. ΔW (out × in) is a q × p grid of circulant blocks (see
:mod:`structpeft.operators.base` for padding / cropping), block (i, j) = circ(weight[i, j]):

    y_i = Σ_j circ(c_ij) x_j      for x split into p blocks x_j of length b, y cropped to out.

Shapes: ``weight`` (q, p, b). Parameters: q·p·b = ceil(out/b)·ceil(in/b)·b (≈ out·in / b; with the default
single block b = max(out, in), exactly max(out, in)). Cost per token: p real FFTs of length b, q·p·(b/2+1)
complex multiply-adds, q inverse FFTs: O((p + q)·b log b + q·p·b) instead of out·in.
Init: ``weight = 0`` (ΔW = 0; ΔW is linear in the weight, so gradients are not zero). ``init=False``:
N(0, 1/in) entries. Only ``rfft`` / ``irfft`` are used: the data are real. In training the product has a backward
of its own that keeps x and the weight alone (no N × p × f spectrum per layer; ``_CircularProduct``).

The products here are windows of circular convolutions of zero-padded blocks (``circular_product``: length L, window
[offset, offset + b)); circulant blocks are L = b, offset 0, and :mod:`structpeft.operators.toeplitz`'s one-factor
blocks T(v) are L = 2b, offset b − 1, so both train through the same backward.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn

from .base import (
    BlockGridOperator,
    _merge_blocks,
    _split_blocks,
    circulant_dense,
    compute_dtype,
    grid_shape,
    largest_block_size_within,
    resolve_block_size,
)


class CirculantOperator(BlockGridOperator):
    """Block-circulant ΔW; ``block_size`` b controls the parameter count (q·p·b, see the module docstring)."""

    structure = "circulant"
    option_names = ("block_size",)

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
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training: the same product, keeping x and the weight alone for the backward
            return circular_product_for_training(x, self.weight, self.grid, self.block_size, self.out_features)
        dtype = compute_dtype(x.dtype, self.weight.dtype)
        wf = self.cached(f"spectrum-{dtype}", lambda: torch.fft.rfft(self.weight.to(dtype), dim=-1))  # (q, p, f)
        return circular_product(x, wf, self.grid, self.block_size, self.out_features)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂weight[i, j] = Σ_n corr(g_n,i, x_n,j): the circular cross-correlation of output block i's gradient with
        input block j, irfft(S) with the cross-spectrum S[i, j, f] = Σ_n G_n,i[f]·conj(X_n,j[f]) (G, X the DFTs
        of the blocks) — per frequency one matmul over the N rows, then one small irfft of (q, p, f) (see
        ``StructuredOperator.param_grads``). Cost O(N·(p + q)·b·log b + N·q·p·b) instead of gᵀx's N·out·in.

        Blocks up to :data:`DFT_MATMUL_MAX_BLOCK` take the DFT as one real matmul with the (2f × b) DFT matrix
        (N·(p + q)·b·(b + 2) flops, laid out frequency-major, so the cross-spectrum is three real batched
        matmuls on views); larger blocks use rfft and a complex batched matmul."""
        if not self.weight.requires_grad:
            return (None,)
        dtype = compute_dtype(x.dtype, g.dtype, self.weight.dtype)
        with torch.autocast(self._device_type(), enabled=False):
            grad = _weight_grad(x.to(dtype), g.to(dtype), self.grid, self.block_size)
        return (grad.to(self.weight.dtype),)

    def to_dense(self) -> torch.Tensor:
        return self._assemble(circulant_dense(self.weight))  # (q, p, b, b) blocks


# Largest block size whose parameter gradient takes the DFT as a real matmul: on 2 CPU cores that was 1.2-4x faster
# than rfft + a complex batched matmul for b = 24-96 and slower from b = 128 on (N = 512-4,096 rows).
DFT_MATMUL_MAX_BLOCK = 96


def real_dft_matrix(b: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """The real DFT of length b as a (2f × b) matrix, f = b // 2 + 1, rows (frequency, re / im):
    (D x)[2k] = Σ_t x_t cos(2π k t / b), (D x)[2k + 1] = −Σ_t x_t sin(2π k t / b), i.e. rfft(x) interleaved.
    Built in float64 (angles reduced mod b) and cast; kept per (b, dtype, device), since every backward of a
    circulant layer reads it (building it costs about ten small tensor operations). Do not modify the result."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():  # traced into the graph (a constant there); dynamo would skip the cache anyway
        return _real_dft_matrix.__wrapped__(b, dtype, device)
    return _real_dft_matrix(b, dtype, device)


@functools.cache  # at most one matrix per block size up to DFT_MATMUL_MAX_BLOCK, dtype and device (small)
def _real_dft_matrix(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even if first built under inference mode
        f = b // 2 + 1
        t = torch.arange(b, dtype=torch.float64, device=device)
        k = torch.arange(f, dtype=torch.float64, device=device)
        angle = (2 * torch.pi / b) * torch.remainder(k[:, None] * t[None, :], b)  # (f, b)
        return torch.stack([torch.cos(angle), -torch.sin(angle)], dim=1).reshape(2 * f, b).to(dtype)


def _cross_spectrum_by_matmul(gs: torch.Tensor, xs: torch.Tensor, n_fft: int) -> torch.Tensor:
    """S[f, i, j] = Σ_n G_n,i[f]·conj(X_n,j[f]) for blocks gs (N, q, b), xs (N, p, b) zero-padded to length
    n_fft, the DFTs taken as one real matmul each (the first b columns of the (2f × n_fft) DFT matrix) into a
    (f, re / im, N, ·) layout: Re S = Gr·Xr + Gi·Xi (one matmul over the stacked 2N rows), Im S = Gi·Xr − Gr·Xi.
    Returns (f, q, p) complex."""
    n, q, b = gs.shape
    p = xs.shape[1]
    f = n_fft // 2 + 1
    dft = real_dft_matrix(n_fft, xs.dtype, xs.device)[:, :b]  # (2f, b)
    xd = (dft @ xs.reshape(-1, b).T).view(f, 2, n, p)  # (f, re / im, N, p)
    gd = (dft @ gs.reshape(-1, b).T).view(f, 2, n, q)
    real = torch.bmm(gd.reshape(f, 2 * n, q).mT, xd.reshape(f, 2 * n, p))
    imag = torch.bmm(gd[:, 1].mT, xd[:, 0]) - torch.bmm(gd[:, 0].mT, xd[:, 1])
    return torch.complex(real, imag)


def circular_product(
    x: torch.Tensor,
    wf: torch.Tensor,
    grid: tuple[int, int],
    b: int,
    out_features: int,
    n_fft: int | None = None,
    offset: int = 0,
    xf: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., in) times ΔWᵀ whose (i, j) block maps a block x_j (length b) to the window [offset, offset + b) of
    its circular convolution, at length L = ``n_fft`` (default b), with the block's weight, given by its spectrum
    wf (q, p, f) of length L: y_i = Σ_j window(irfft(W_ij · rfft(x_j, L))), in wf's (compute) dtype: (..., out).
    L = b, offset = 0: circ(c) x; L = 2b, offset = b − 1: the Toeplitz T(v) x (v of length 2b − 1).
    ``xf``: the spectrum of x's blocks, rfft(blocks, L) (..., p, f), where the caller has it."""
    n_fft = b if n_fft is None else n_fft
    if xf is None:
        xf = torch.fft.rfft(_split_blocks(x.to(wf.real.dtype), grid[1], b), n=n_fft, dim=-1)  # (..., p, f)
    yf = xf * wf[0] if grid == (1, 1) else torch.einsum("...pf,qpf->...qf", xf, wf)  # (..., q, f)
    y = torch.fft.irfft(yf, n=n_fft, dim=-1)  # (..., q, L)
    if n_fft != b:
        y = y[..., offset : offset + b]
    return _merge_blocks(y, out_features)  # (..., q, b) -> (..., out)


def circular_product_for_training(
    x: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[int, int],
    b: int,
    out_features: int,
    n_fft: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """:func:`circular_product` from the weight (q, p, ≤ L) itself, keeping only x and the weight for the backward
    (``_CircularProduct``)."""
    return cast(torch.Tensor, _CircularProduct.apply(x, weight, grid, b, out_features, n_fft or b, offset))


def _weight_grad(x: torch.Tensor, g: torch.Tensor, grid: tuple[int, int], b: int) -> torch.Tensor:
    """∂weight (q, p, b) of Σ g·(x ΔWᵀ) for rows x (..., in), g (..., out) of one dtype (see ``param_grads``)."""
    xs = _split_blocks(x.reshape(-1, x.shape[-1]), grid[1], b)  # (N, p, b)
    gs = _split_blocks(g.reshape(-1, g.shape[-1]), grid[0], b)  # (N, q, b)
    return block_correlation(xs, gs)


def block_correlation(
    xs: torch.Tensor, gs: torch.Tensor, n_fft: int | None = None, gf: torch.Tensor | None = None
) -> torch.Tensor:
    """C[i, j, m] = Σ_n Σ_t gs[n, i, (t + m) mod L]·xs[n, j, t]: the circular cross-correlations (q, p, L) of
    blocks gs (N, q, b) with blocks xs (N, p, b), both zero-padded to length L = ``n_fft`` (default b), summed over
    the N rows: irfft of the cross-spectrum Σ_n G_n,i·conj(X_n,j). The DFTs are real matmuls for L <=
    :data:`DFT_MATMUL_MAX_BLOCK`, rffts above (then a complex bmm over frequencies, or for a single block
    (q = p = 1) a product summed over the rows, which needs no frequency-major copy); ``gf``, rfft(gs, L) where the
    caller has it, is used there instead of taking it again."""
    b = xs.shape[-1]
    n_fft = b if n_fft is None else n_fft
    if n_fft <= DFT_MATMUL_MAX_BLOCK:
        spectrum = _cross_spectrum_by_matmul(gs, xs, n_fft)
    else:
        xf = torch.fft.rfft(xs, n=n_fft, dim=-1)  # (N, p, f)
        gf = torch.fft.rfft(gs, n=n_fft, dim=-1) if gf is None else gf  # (N, q, f)
        if xs.shape[1] == gs.shape[1] == 1:
            spectrum = (gf[:, 0] * xf[:, 0].conj()).sum(dim=0)[:, None, None]  # (f, 1, 1)
        else:  # (f, q, p): Σ_n G_n,q · conj(X_n,p) = conj(Gᴴ X), frequency-major
            spectrum = torch.bmm(gf.permute(2, 0, 1).contiguous().mH, xf.permute(2, 0, 1).contiguous()).conj()
    return torch.fft.irfft(spectrum.permute(1, 2, 0), n=n_fft, dim=-1)  # (q, p, L)


class _CircularProduct(torch.autograd.Function):
    """The training product of :func:`circular_product`, keeping only x and the weight for the backward.

    Autograd through rfft · einsum · irfft keeps the input's spectrum X (N × p × f complex, as large as x, twice
    that at L = 2b) per layer. Here the backward takes it again from x: with G the spectra of the output gradient's
    blocks (zero-padded to L) and C the weight spectrum (q, p, f),

        ∂X_j = irfft(Σ_i conj(C_ij)·e^(−2πi·k·offset/L)·G_i)[0, b)   (the adjoint: the same product on the
               transposed (p, q) grid, at window 0, of conjugate spectra shifted by the forward's window offset),
        ∂c_ij[m] = corr_ij[(m − offset) mod L],  corr = irfft(Σ_n G_n,i · conj(X_n,j))   (:func:`block_correlation`,
               for m below the weight's length),

    G taken once for both where the correlation uses rffts (L > 96). In the compute dtype with autocast off; the
    backward is made of differentiable operations on the saved x and weight, so double backward works.
    """

    @staticmethod
    def forward(ctx, x, weight, grid, b, out_features, n_fft, offset):
        ctx.save_for_backward(x, weight)
        ctx.grid, ctx.b, ctx.n_fft, ctx.offset = grid, b, n_fft, offset
        wf = torch.fft.rfft(weight.to(compute_dtype(x.dtype, weight.dtype)), n=n_fft, dim=-1)
        return circular_product(x, wf, grid, b, out_features, n_fft, offset)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (q, p), b, n_fft, offset = ctx.grid, ctx.b, ctx.n_fft, ctx.offset
        dtype = compute_dtype(x.dtype, grad.dtype, weight.dtype)
        grad_x = grad_weight = None
        device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
        with torch.autocast(device_type, enabled=False):
            g = grad.to(dtype).reshape(-1, grad.shape[-1])  # (N, out)
            gs = _split_blocks(g, q, b)  # (N, q, b)
            # the output gradient's spectrum serves both gradients where the weight's is taken by rfft too
            both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and n_fft > DFT_MATMUL_MAX_BLOCK
            gf = torch.fft.rfft(gs, n=n_fft, dim=-1) if both else None  # (N, q, f)
            if ctx.needs_input_grad[0]:
                wf_t = torch.fft.rfft(weight.to(dtype), n=n_fft, dim=-1).conj()  # (q, p, f)
                if offset:
                    wf_t = wf_t * _shift(n_fft, offset, wf_t)
                grad_x = circular_product(g, wf_t.transpose(0, 1), (p, q), b, x.shape[-1], n_fft, 0, xf=gf)
                grad_x = grad_x.to(x.dtype).view(x.shape)
            if ctx.needs_input_grad[1]:
                xs = _split_blocks(x.to(dtype).reshape(-1, x.shape[-1]), p, b)  # (N, p, b)
                corr = block_correlation(xs, gs, n_fft, gf=gf)  # (q, p, L)
                if offset:
                    corr = torch.roll(corr, offset, dims=-1)
                grad_weight = corr[..., : weight.shape[-1]].to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None


def _shift(n_fft: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    """e^(−2πi·k·offset/L) for k = 0 … L // 2 (the spectrum of a delay by ``offset``), in ``like``'s dtype and
    device; angles reduced mod L in float64."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=like.device)
    angle = (-2 * torch.pi / n_fft) * torch.remainder(k * offset, n_fft)
    return torch.polar(torch.ones_like(angle), angle).to(like.dtype)
