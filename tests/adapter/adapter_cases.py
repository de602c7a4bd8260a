"""Layer-type cases of the SURM-Adapter test matrix (importable from fresh-process scripts: no pytest, no
structpeft at import time).

* ``STRUCTURES``: every registered structure; ``FORMS``: square, or bottleneck of width ``BOTTLENECK``;
* ``LAYER_CASES``: a BERT-like encoder (targets ``attention.output.dense`` and ``output.dense``, the Houlsby
  positions), GPT-2 (``c_proj``, Conv1D), a LLaMA-like decoder (``o_proj``, ``down_proj``, no bias) and a
  small Conv2d net — each a tiny seeded model, an input factory and the tensor compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from testkit import TinyConvNet, ids_input, tiny_bert_config, tiny_gpt2

STRUCTURES: tuple[str, ...] = ("circulant", "toeplitz", "kronecker", "ldr", "dense")
FORMS: tuple[str, ...] = ("square", "bottleneck")
ACTIVATIONS: tuple[str, ...] = ("identity", "gelu", "relu", "silu", "tanh")
BOTTLENECK = 4  # < every targeted width (the smallest is conv0's 6 channels)


def bert_like(hidden: int = 24, intermediate: int = 36, layers: int = 2) -> nn.Module:
    from transformers import BertModel

    return BertModel(tiny_bert_config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    return LlamaModel(cfg)


@dataclass(frozen=True)
class AdapterLayerCase:
    id: str
    factory: Callable[[], nn.Module]
    input_factory: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    target_modules: tuple[str, ...]
    kind: str  # "linear" | "conv1d" | "conv2d"
    has_bias: bool
    seed: int = 4321

    def model(self, dtype: torch.dtype = torch.float32, *, seed: int | None = None) -> nn.Module:
        torch.manual_seed(self.seed if seed is None else seed)
        return self.factory().to(dtype).eval()

    def inputs(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.input_factory(g).items()}

    def run(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.output(model(**inputs))

    def is_target(self, key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in self.target_modules)

    def config(self, structure: str, form: str = "square", **kwargs: Any):
        """A SurmConfig in adapter placement (``form`` square or bottleneck of width BOTTLENECK)."""
        from structpeft import SurmConfig

        kwargs.setdefault("target_modules", list(self.target_modules))
        if form == "bottleneck":
            kwargs.setdefault("bottleneck", BOTTLENECK)
        return SurmConfig(structure=structure, placement="adapter", adapter_form=form, **kwargs)

    def __repr__(self) -> str:
        return f"AdapterLayerCase({self.id})"


LAYER_CASES: list[AdapterLayerCase] = [
    AdapterLayerCase(
        id="bert-like",
        factory=bert_like,
        input_factory=ids_input(64, (2, 7)),
        output=lambda out: out.last_hidden_state,
        target_modules=("attention.output.dense", "output.dense"),
        kind="linear",
        has_bias=True,
    ),
    AdapterLayerCase(
        id="gpt2-conv1d",
        factory=tiny_gpt2,
        input_factory=ids_input(50, (2, 9)),
        output=lambda out: out.last_hidden_state,
        target_modules=("c_proj",),
        kind="conv1d",
        has_bias=True,
    ),
    AdapterLayerCase(
        id="llama-like",
        factory=tiny_llama,
        input_factory=ids_input(64, (2, 8)),
        output=lambda out: out.last_hidden_state,
        target_modules=("o_proj", "down_proj"),
        kind="linear",
        has_bias=False,
    ),
    AdapterLayerCase(
        id="conv2d",
        factory=TinyConvNet,
        input_factory=lambda g: {"x": torch.randn(2, 3, 8, 8, generator=g)},
        output=lambda out: out,
        target_modules=("conv0", "conv1"),
        kind="conv2d",
        has_bias=True,
    ),
]
CASES_BY_ID = {c.id: c for c in LAYER_CASES}
