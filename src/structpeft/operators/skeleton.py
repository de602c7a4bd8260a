"""PMSS's skeleton operator: ΔW = C · U · R with C, R gathered from the frozen pretrained weight.

Math (PyTorch layout, W is out × in, y = x Wᵀ): for column indices I (|I| = k_in) and row indices J (|J| = k_out),

    C = W[:, I] · D_c   (out × k_in),   R = D_r · W[J, :]   (k_out × in),   ΔW = C · U · R,   U (k_in × k_out).

D_c, D_r are diagonal normalisations: the identity (``skeleton_scaling="none"``) or the inverse norms of the
selected columns / rows (``"unit"``). Only U is trained (k_in·k_out parameters); U = 0 at init, so ΔW = 0.
rank(ΔW) <= min(k_in, k_out) and the column space of ΔW lies in span(W[:, I]).
Forward: ``x Rᵀ`` is read from the base layer's own output, (x Wᵀ + b)[..., J] − b[J] (exact while W is
unmerged, only without dropout on the adapter input), so the adapter costs k_out·k_in + k_in·out multiply-adds
per token — about k·(k + d) — instead of out·in. ``forward`` (with dropout) computes x Rᵀ directly: k_out·in.
``add_from_base(base_out, s)`` returns base_out + s·x·ΔWᵀ by two ``addmm`` (h = x Rᵀ Uᵀ with the bias term, then
base_out + s·h Cᵀ) and a backward that writes ∂base_out = g + scatter_J(s·g C U) in one pass (autograd's gather
backward would build a zero (tokens × out) gradient, scatter into it, then add it to g).
C and R are frozen buffers gathered when the operator is built; they are not saved. The state dict (and so the
adapter file) holds U and the indices I, J (int64: the config holds them too, with a checksum of the gathered
factors), so a state dict loaded into an existing adapter (``load_adapter`` under a name that exists, as the
Trainer does when it resumes from a checkpoint) brings the selection it was trained with: :meth:`regather`.
``compute_mode="dense"`` (chosen per layer by measurement, see :mod:`structpeft.operators.dispatch`): the layer
folds ΔW = C·U·R (out·k_in·k_out + out·k_out·in multiply-adds, once per step) into the base weight instead, so
the forward and input gradient cost the frozen layer's, and inference with a cached W + s·ΔW costs nothing extra.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import _CACHES, DenseDeltaMixin

SKELETON_SCALINGS = ("none", "unit")
SKELETON_INITS = ("zero", "gaussian", "random")


class SkeletonOperator(DenseDeltaMixin, nn.Module):
    """ΔW = C·U·R (see the module docstring); built from the frozen (out × in) weight and the indices I, J."""

    structure = "skeleton"
    # buffers (registered in __init__)
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    row_scale: torch.Tensor
    row_bias: torch.Tensor | None
    # set by the PMSS layer (PmssConfig.fold_inference / keep_folded_weight); read by the layer's folds
    fold_inference: bool
    keep_folded_weight: bool

    def __init__(
        self,
        weight: torch.Tensor,
        col_idx: torch.Tensor,
        row_idx: torch.Tensor,
        skeleton_scaling: str = "none",
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if skeleton_scaling not in SKELETON_SCALINGS:
            raise ConfigError(
                f"skeleton_scaling={skeleton_scaling!r} is invalid; valid: {', '.join(SKELETON_SCALINGS)}"
            )
        self.out_features, self.in_features = weight.shape
        self.skeleton_scaling = skeleton_scaling
        w = weight.detach()
        col_idx = torch.as_tensor(col_idx, dtype=torch.long, device=w.device)
        row_idx = torch.as_tensor(row_idx, dtype=torch.long, device=w.device)
        dtype = torch.promote_types(w.dtype, torch.float32)  # float64 weights stay float64
        cols = w[:, col_idx].to(dtype)
        rows = w[row_idx, :].to(dtype)
        col_scale = torch.ones(cols.shape[1], device=w.device, dtype=dtype)
        row_scale = torch.ones(rows.shape[0], device=w.device, dtype=dtype)
        if skeleton_scaling == "unit":
            col_scale = 1.0 / cols.norm(dim=0).clamp_min(1e-12)
            row_scale = 1.0 / rows.norm(dim=1).clamp_min(1e-12)
        self.register_buffer("col_idx", col_idx)  # saved: U means nothing without its I and J
        self.register_buffer("row_idx", row_idx)
        self.register_buffer("cols", cols * col_scale, persistent=False)  # C (out × k_in)
        self.register_buffer("rows", rows * row_scale[:, None], persistent=False)  # R (k_out × in)
        self.register_buffer("row_scale", row_scale, persistent=False)
        b = None if bias is None else bias.detach()[row_idx].to(dtype)
        self.register_buffer("row_bias", b, persistent=False)  # b[J], to subtract from the base output
        self.core = nn.Parameter(torch.zeros(cols.shape[1], rows.shape[0], device=w.device, dtype=dtype))
        # "fast": W[J, :]x read from the base output; "dense": ΔW folded into the base weight by the layer
        self.compute_mode = "fast"

    @torch.no_grad()
    def regather(
        self, weight: torch.Tensor, col_idx: torch.Tensor, row_idx: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        """Select other columns I and rows J (as many as now) of the frozen (out × in) ``weight``: C, R, the unit
        scaling and b[J] are gathered again in place (U keeps its tensor, so an optimiser holding it still
        works)."""
        w = weight.detach()
        col_idx = torch.as_tensor(col_idx, dtype=torch.long, device=w.device)
        row_idx = torch.as_tensor(row_idx, dtype=torch.long, device=w.device)
        cols = w[:, col_idx].to(self.cols.dtype)
        rows = w[row_idx, :].to(self.rows.dtype)
        col_scale = torch.ones(cols.shape[1], device=w.device, dtype=cols.dtype)
        row_scale = torch.ones(rows.shape[0], device=w.device, dtype=rows.dtype)
        if self.skeleton_scaling == "unit":
            col_scale = 1.0 / cols.norm(dim=0).clamp_min(1e-12)
            row_scale = 1.0 / rows.norm(dim=1).clamp_min(1e-12)
        self.col_idx.copy_(col_idx)
        self.row_idx.copy_(row_idx)
        self.cols.copy_(cols * col_scale)
        self.rows.copy_(rows * row_scale[:, None])
        self.row_scale.copy_(row_scale)
        if self.row_bias is not None and bias is not None:
            self.row_bias.copy_(bias.detach()[row_idx].to(self.row_bias.dtype))
        _CACHES.pop(self, None)  # a cached ΔW was built from the old C and R (its key holds U only)

    @property
    def options(self) -> dict:
        return {
            "k_in": self.core.shape[0],
            "k_out": self.core.shape[1],
            "skeleton_scaling": self.skeleton_scaling,
        }

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True) -> None:
        """``True``/``"zero"``: U = 0 (the paper). ``"gaussian"``: U ~ N(0, 1e-4) (small, for ablation).
        ``False``/``"random"``: U ~ N(0, 1/k_in) (a clearly non-zero ΔW, for tests)."""
        if init is True or init == "zero":
            self.core.zero_()
        elif init == "gaussian":
            self.core.normal_(0.0, 1e-2)
        elif init is False or init == "random":
            self.core.normal_(0.0, self.core.shape[0] ** -0.5)
        else:
            raise ConfigError(f"init_weights={init!r} is invalid; valid: True, False, {', '.join(SKELETON_INITS)}")

    def _finish(self, xr: torch.Tensor) -> torch.Tensor:
        """(..., k_out) values of x·Rᵀ -> (..., out) values of x·Rᵀ·Uᵀ·Cᵀ = x·ΔWᵀ."""
        dtype = torch.promote_types(xr.dtype, self.core.dtype)
        xr = xr.to(dtype)
        return (xr @ self.core.to(dtype).T) @ self.cols.to(dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, self.core.dtype)
        return self._finish(x.to(dtype) @ self.rows.to(dtype).T)

    def forward_from_base(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(x)`` but reads x·W[J, :]ᵀ from ``base_out`` = x Wᵀ + b (exact while W is unmerged)."""
        xr = base_out[..., self.row_idx]
        if self.row_bias is not None:
            xr = xr - self.row_bias.to(xr.dtype)
        dtype = torch.promote_types(xr.dtype, self.core.dtype)
        return self._finish(xr.to(dtype) * self.row_scale.to(dtype))

    def add_from_base(self, base_out: torch.Tensor, scale: float) -> torch.Tensor:
        """base_out + scale · x·ΔWᵀ, with x·Rᵀ read from ``base_out`` = x Wᵀ + b (see the module docstring).

        Fused (:class:`_GatherAdd`) when ``base_out`` has the operator's dtype; otherwise the product is computed in
        the promoted dtype and cast to ``base_out``'s, as ``forward_from_base`` does.
        """
        if base_out.dtype != self.core.dtype:
            return base_out + (self.forward_from_base(base_out, base_out) * scale).to(base_out.dtype)
        return _GatherAdd.apply(
            base_out, self.core, self.cols, self.row_idx, self.row_bias, self.row_scale, float(scale)
        )

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂U = (g C)ᵀ (x Rᵀ): two thin matmuls (N·out·k_in, N·in·k_out) and one k_in × N × k_out (see
        ``DenseDeltaMixin.param_grads``)."""
        if not self.core.requires_grad:
            return (None,)
        dtype = torch.promote_types(torch.promote_types(x.dtype, g.dtype), self.core.dtype)
        with torch.autocast(self._device_type(), enabled=False):
            gc = g.to(dtype) @ self.cols.to(dtype)  # (N, k_in)
            xr = x.to(dtype) @ self.rows.to(dtype).T  # (N, k_out)
            return ((gc.T @ xr).to(self.core.dtype),)

    def to_dense(self) -> torch.Tensor:
        dtype = torch.promote_types(self.cols.dtype, self.core.dtype)
        return self.cols.to(dtype) @ self.core.to(dtype) @ self.rows.to(dtype)


class _GatherAdd(torch.autograd.Function):
    """y = z + s·((z[:, J] − b_J)·D_r) Uᵀ Cᵀ for z = base_out (tokens × out); gradients for z and U only.

    With V = U·D_r (k_in × k_out) and c = V b_J: h = z[:, J] Vᵀ − c, y = z + s·h Cᵀ. Backward, for g = ∂y:
    ∂h = s·g C, ∂U = (∂hᵀ z[:, J] − (Σ_t ∂h_t) b_Jᵀ) D_r, ∂z = g + scatter_J(∂h V). Saved: z[:, J] (tokens × k_out).
    """

    @staticmethod
    def forward(ctx, base_out, core, cols, row_idx, row_bias, row_scale, scale):
        z = base_out.reshape(-1, base_out.shape[-1])
        xr = z.index_select(1, row_idx)  # (tokens, k_out)
        v = core * row_scale  # U·D_r
        h = xr @ v.T if row_bias is None else torch.addmm(-(v @ row_bias), xr, v.T)
        y = torch.addmm(z, h, cols.T, alpha=scale)
        ctx.save_for_backward(xr, v, cols, row_idx, row_bias, row_scale)
        ctx.scale = scale
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        xr, v, cols, row_idx, row_bias, row_scale = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gh = g @ (cols * ctx.scale)  # (tokens, k_in)
        grad_base = grad_core = None
        if ctx.needs_input_grad[1]:
            gv = gh.T @ xr
            if row_bias is not None:
                gv = gv - torch.outer(gh.sum(0), row_bias)
            grad_core = gv * row_scale
        if ctx.needs_input_grad[0]:
            grad_base = g.index_add(1, row_idx, gh @ v).view(grad_out.shape)
        return grad_base, grad_core, None, None, None, None, None
