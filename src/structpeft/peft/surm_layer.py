"""SURM's layer: the shared :class:`StructuredLayer` with a structured operator built from the layer shape."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..operators import StructuredOperator, get_operator_class
from .adapter import AdapterBlock
from .layer import StructuredLayer, base_weight


class SurmLayer(StructuredLayer):
    """Adapter containers of SURM: ``surm_op[name]`` (a structured operator), ``surm_scaling``, ``surm_dropout``."""

    adapter_layer_names = ("surm_op",)
    other_param_names = ("surm_scaling", "surm_dropout")
    op_attr = "surm_op"
    scaling_attr = "surm_scaling"
    dropout_attr = "surm_dropout"

    def _build_operator(self, adapter_name: str, config: Any, options: dict[str, Any]) -> nn.Module:
        base = self.get_base_layer()
        with_bias = getattr(base, "bias", None) is not None
        module = build_surm_module(config, options, self.out_features, self.in_features, with_bias)
        compute = self._recorded_compute(config)
        for role, op in module.ops.items() if isinstance(module, AdapterBlock) else [("delta", module)]:
            operator = cast(StructuredOperator, op)  # build_surm_module builds structured operators
            operator.compute_mode = compute.get(role, "fast")
            operator.fold_inference = config.fold_inference
            operator.keep_folded_weight = config.keep_folded_weight
        if any(p.is_meta for p in module.parameters()):  # PEFT's low_cpu_mem_usage: filled by the state dict load
            return module
        return module.to(base_weight(base).device)


def build_surm_module(
    config: Any, options: dict[str, Any], out_features: int, in_features: int, with_bias: bool
) -> nn.Module:
    """The per-adapter module of SURM for a layer: a structured operator (placement 'lora') or an
    :class:`AdapterBlock` (placement 'adapter'), initialised per ``config.init_weights``. ``options`` maps each
    operator role ("delta"; "op"; "down" / "up") to its resolved structure options."""
    cls = get_operator_class(config.structure)
    if config.placement == "lora":
        op = cls(out_features, in_features, **options["delta"])
        op.reset_parameters(config.init_weights)
        return op
    n = out_features
    if config.adapter_form == "square":
        ops = {"op": cls(n, n, **options["op"])}
        ops["op"].reset_parameters(config.init_weights)
    else:
        m = config.bottleneck
        ops = {"down": cls(m, n, **options["down"]), "up": cls(n, m, **options["up"])}
        ops["down"].reset_parameters(False)  # random: the output is zero through S_up alone
        ops["up"].reset_parameters(config.init_weights)
    block = AdapterBlock(ops, config.activation, n, with_bias)
    if not config.init_weights and block.bias is not None:
        with torch.no_grad():
            block.bias.normal_(0.0, 0.1)
    return block


class SurmWrapper(nn.Module, SurmLayer):
    """The module that replaces a targeted Linear / Conv1D / Conv2d (one class for all structures)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        module_path: str = "",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        SurmLayer.__init__(self, base_layer, module_path=module_path)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, options=options or {})

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return SurmLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "surm." + nn.Module.__repr__(self)
