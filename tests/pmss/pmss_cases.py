"""Layer-type cases of the PMSS test matrix (importable from fresh-process scripts: no pytest, no structpeft).

Each :class:`PmssLayerCase` is a tiny seeded model whose targeted modules are all of one layer type, with an
input factory, the tensor compared, and the targets. ``SELECTIONS`` lists the selection strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from testkit import TinyConvNet, ids_input, tiny_bert_cls, tiny_gpt2

SELECTIONS: tuple[str, ...] = ("deim", "qdeim", "leverage", "norm", "random")


class PmssMLP(nn.Module):
    """nn.Linear with awkward shapes: 24 -> 40 -> 13 -> 11 (targeted), then an untargeted 11 -> 5 head.

    The smallest targeted layer (13 -> 11) comes last, so a k that only it cannot take fails on the last layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(24, 40)
        self.lin1 = nn.Linear(40, 13)
        self.lin2 = nn.Linear(13, 11)
        self.head = nn.Linear(11, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin0(x))
        h = torch.tanh(self.lin1(h))
        return self.head(torch.tanh(self.lin2(h)))


@dataclass(frozen=True)
class PmssLayerCase:
    id: str
    factory: Callable[[], nn.Module]
    input_factory: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    target_modules: tuple[str, ...]
    kind: str  # "linear" | "conv1d" | "conv2d"
    modules_to_save: tuple[str, ...] = ()
    seed: int = 1234
    # alpha at which a random U (init_weights=False) moves the output by 0.4-1.0 of its scale (measured): far more
    # than half-precision rounding (<= 0.02), so a half-precision test with this alpha fails if the adapter is lost
    visible_alpha: float = 1.0

    def model(self, dtype: torch.dtype = torch.float32, *, seed: int | None = None) -> nn.Module:
        """The base model (eval mode), built in float32 under a fixed seed, then cast to ``dtype``."""
        torch.manual_seed(self.seed if seed is None else seed)
        return self.factory().to(dtype).eval()

    def inputs(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.input_factory(g).items()}

    def run(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.output(model(**inputs))

    def is_target(self, key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in self.target_modules)

    def config(self, **kwargs: Any):
        from structpeft import PmssConfig

        kwargs.setdefault("target_modules", list(self.target_modules))
        if self.modules_to_save:
            kwargs.setdefault("modules_to_save", list(self.modules_to_save))
        return PmssConfig(**kwargs)

    def __repr__(self) -> str:
        return f"PmssLayerCase({self.id})"


LAYER_CASES: list[PmssLayerCase] = [
    PmssLayerCase(
        id="linear-mlp",
        factory=PmssMLP,
        input_factory=lambda g: {"x": torch.randn(4, 3, 24, generator=g)},
        output=lambda out: out,
        target_modules=("lin0", "lin1", "lin2"),
        kind="linear",
        visible_alpha=3.0,
    ),
    PmssLayerCase(
        id="conv1d-gpt2",
        factory=tiny_gpt2,
        input_factory=ids_input(50, (2, 9)),
        output=lambda out: out.last_hidden_state,
        target_modules=("c_attn", "c_proj"),
        kind="conv1d",
        visible_alpha=20.0,
    ),
    PmssLayerCase(
        id="conv2d-convnet",
        factory=TinyConvNet,
        input_factory=lambda g: {"x": torch.randn(2, 3, 8, 8, generator=g)},
        output=lambda out: out,
        target_modules=("conv0", "conv1"),
        kind="conv2d",
        visible_alpha=10.0,
    ),
    PmssLayerCase(
        id="linear-bert",
        factory=tiny_bert_cls,
        input_factory=ids_input(64, (2, 7)),
        output=lambda out: out.logits,
        target_modules=("query", "value", "intermediate.dense"),
        kind="linear",
        modules_to_save=("classifier",),
        visible_alpha=200.0,
    ),
]
CASES_BY_ID = {c.id: c for c in LAYER_CASES}
