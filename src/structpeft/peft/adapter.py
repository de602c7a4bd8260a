"""SURM-Adapter: a structured adapter placed *after* a targeted module (Houlsby positions).

For a targeted module with output h (n = out_features):

    square form      h ← h + s · act(S · dropout(h)) + bias            S: n × n structured operator
    bottleneck form  h ← h + s · S_up · act(S_down · dropout(h)) + bias S_down: m × n, S_up: n × m

S, S_down, S_up are the structured operators of :mod:`structpeft.operators` (``structure="dense"`` gives the
classic dense bottleneck adapter). The output is zero at init: S (or S_up) starts at ΔW = 0, S_down random.
``bias`` (n values, zero at init) exists when the targeted module has a bias, so that merging stays possible.
Parameters: square, P_S(n, n) + n; bottleneck, P_S(m, n) + P_S(n, m) + n (P_S = the structure's count).
With the identity activation the adapter is linear, h ← (I + M) h + bias with M = s·S (or s·S_up·S_down), so it
merges into the base layer as W ← (I + M) W, b ← (I + M) b + bias; with a non-linear activation it cannot be
merged and :class:`~structpeft.errors.MergeError` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from ..errors import ConfigError, MergeError
from ..operators.base import StructuredOperator

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
ADAPTER_FORMS = ("square", "bottleneck")


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"activation={name!r} is invalid; valid: {', '.join(ACTIVATIONS)}") from None


class AdapterBlock(nn.Module):
    """The adapter function h ↦ s·act(S h) + bias (or the bottleneck form); see the module docstring."""

    placement = "adapter"

    def __init__(
        self,
        operators: Mapping[str, StructuredOperator],
        activation: str,
        n_features: int,
        with_bias: bool,
    ) -> None:
        super().__init__()
        self.ops = nn.ModuleDict(operators)  # {"op"} (square) or {"down", "up"} (bottleneck)
        self.activation_name = activation
        self.act = make_activation(activation)
        self.bias = nn.Parameter(torch.zeros(n_features)) if with_bias else None

    @property
    def form(self) -> str:
        return "square" if "op" in self.ops else "bottleneck"

    def transform(self, h: torch.Tensor, scale: float) -> torch.Tensor:
        """s·act(S h) (+ bias) for h of shape (..., n)."""
        if self.form == "square":
            y = self.act(self.ops["op"](h)) * scale
        else:
            y = self.ops["up"](self.act(self.ops["down"](h))) * scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def check_linear(self) -> None:
        """:class:`MergeError` if the activation is non-linear (the adapter then has no matrix to merge)."""
        if self.activation_name != "identity":
            raise MergeError(
                f"an adapter with activation={self.activation_name!r} is non-linear and cannot be merged into "
                "the base weight; use activation='identity' to merge, or keep the adapter unmerged"
            )

    def _operator(self, role: str) -> StructuredOperator:
        """The structured operator of ``role`` ("op"; "down" / "up")."""
        return cast(StructuredOperator, self.ops[role])

    def linear_map(self, scale: float) -> torch.Tensor:
        """M (n × n) with adapter(h) = M h + bias; :class:`MergeError` if the activation is non-linear."""
        self.check_linear()
        if self.form == "square":
            return self._operator("op").to_dense() * scale
        return self._operator("up").to_dense() @ self._operator("down").to_dense() * scale
