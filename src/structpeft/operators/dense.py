"""Dense ΔW: an unstructured out × in matrix (the baseline the structured operators are compared with).

Parameters: out·in. Product: one matmul. Init: 0 (``init=False``: N(0, 1/in)). Used as ``structure="dense"`` for
the classic dense bottleneck adapter (``placement="adapter", adapter_form="bottleneck"``) and, in the LoRA
placement, as full fine-tuning of the targeted layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import StructuredOperator


class DenseOperator(StructuredOperator):
    """ΔW = ``weight`` (out × in), no structure."""

    structure = "dense"
    option_names = ()

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    @property
    def options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def num_parameters(cls, out_features: int, in_features: int) -> int:
        return out_features * in_features

    @classmethod
    def options_for_budget(cls, out_features: int, in_features: int, n_params: int, **fixed: Any) -> dict[str, Any]:
        if n_params < out_features * in_features:
            raise ConfigError(
                f"budget of {n_params} parameters is too small for a dense ({out_features} x {in_features}) "
                f"matrix, which has {out_features * in_features}"
            )
        return {}

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        if init:
            self.weight.zero_()
        else:
            self.weight.normal_(0.0, self.in_features**-0.5)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        return x.to(dtype) @ self.weight.to(dtype).T

    def to_dense(self) -> torch.Tensor:
        return self.weight
