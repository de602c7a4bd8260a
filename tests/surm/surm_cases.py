"""The structure and layer-type tables of the SURM-through-PEFT test matrix.

Kept free of pytest fixtures and of any top-level ``structpeft`` import so that the fresh-process script
(``surm_testing.FRESH_PROCESS_SCRIPT``, run by the ``fresh_process`` fixture) can import it (with
``tests/surm`` on ``sys.path``) to rebuild exactly the same base models, and can first try to load an adapter
*without* ``structpeft`` imported.

* ``STRUCTURE_CASES``: per structure, the option sets the matrix runs (every per-structure quirk lives here);
* ``LAYER_CASES``: per layer type, a seeded factory of a tiny model, an input factory, how to read the output,
  the targets, and a factory of the same architecture with *different* targeted shapes (for mismatch tests).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from testkit import TinyConvNet, ids_input, tiny_bert_cls, tiny_gpt2

# --------------------------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class StructureCase:
    """One structure with one set of its options."""

    id: str
    structure: str
    options: dict[str, Any] = field(default_factory=dict)
    # matrix tests that do not apply to this case: (test function name, or "name/layer case id", reason); the
    # ``structure`` / ``one_structure`` fixtures skip them with the reason (conftest.py)
    not_applicable: tuple[tuple[str, str], ...] = ()
    # layer cases (ids) on which test_budget's budgets are below the structure's smallest layer: ConfigError expected
    budget_too_small: tuple[str, ...] = ()

    def reason_not_applicable(self, test: str, layer_case_id: str | None) -> str | None:
        for key, reason in self.not_applicable:
            name, _, layer = key.partition("/")
            if name == test and layer in ("", layer_case_id):
                return reason
        return None

    def config(self, case: LayerCase, **kwargs: Any):
        """A fresh ``SurmConfig`` for ``case`` (fresh: a config records ``layer_options`` when it is used)."""
        from structpeft import SurmConfig

        kwargs.setdefault("target_modules", list(case.target_modules))
        kwargs.setdefault("modules_to_save", list(case.modules_to_save) if case.modules_to_save else None)
        return SurmConfig(structure=self.structure, **copy.deepcopy(self.options), **kwargs)

    def config_for(self, target_modules: list[str], **kwargs: Any):
        """A fresh ``SurmConfig`` for an ad-hoc model."""
        from structpeft import SurmConfig

        return SurmConfig(
            structure=self.structure, target_modules=target_modules, **copy.deepcopy(self.options), **kwargs
        )

    def __repr__(self) -> str:  # readable in assertion messages
        return f"StructureCase({self.id})"


STRUCTURE_CASES: list[StructureCase] = [
    StructureCase("circulant-default", "circulant"),
    StructureCase("circulant-b4", "circulant", {"block_size": 4}),
    StructureCase("toeplitz-default", "toeplitz"),
    StructureCase("toeplitz-f1-b5", "toeplitz", {"num_factors": 1, "block_size": 5}),
    StructureCase("kronecker-auto", "kronecker"),
    # o1 = 3 <= every targeted out (the MLP has outs 7, 11, 5, 3); i1 = 1 because the MLP has a 1 -> 5 layer.
    # 7, 11, 5 are not multiples of 3, so R is padded and the product cropped along the output dimension.
    StructureCase("kronecker-3x1", "kronecker", {"factor_shape": [3, 1]}),
    StructureCase("ldr-r2", "ldr", {"displacement_rank": 2}),
    StructureCase("ldr-b6", "ldr", {"block_size": 6}),
    # no options: ΔW is a free out x in matrix (in the LoRA placement, full fine-tuning of the targeted layers)
    StructureCase(
        "dense",
        "dense",
        not_applicable=(
            (
                "test_adapter_file_with_other_options_of_the_structure",
                "dense has no options, so no other option set with other tensor shapes",
            ),
        ),
        # a dense ΔW of these layers has more parameters than the budgets of test_budget (lora-8, 400)
        budget_too_small=("conv1d-gpt2", "linear-bert"),
    ),
]
STRUCTURES_BY_ID = {s.id: s for s in STRUCTURE_CASES}

# per structure: invalid options and the text the ConfigError message must contain (the bad value, named)
BAD_OPTIONS: dict[str, list[tuple[dict[str, Any], str]]] = {
    "circulant": [
        ({"block_size": 0}, "block_size=0"),
        ({"displacement_rank": 2}, "displacement_rank=2"),
        ({"budget": "lora-8", "block_size": 4}, "budget='lora-8' and block_size=4"),
        ({"budget": "lora-0"}, "'lora-0'"),
    ],
    "toeplitz": [
        ({"block_size": 0}, "block_size=0"),
        ({"num_factors": 0}, "num_factors=0"),
        ({"factor_shape": [2, 2]}, "factor_shape=[2, 2]"),
    ],
    "kronecker": [
        ({"factor_shape": [0, 2]}, "factor_shape[0]=0"),
        ({"block_size": 4}, "block_size=4"),
        ({"budget": "lora-8", "factor_shape": [2, 2]}, "factor_shape=[2, 2]"),
    ],
    "ldr": [
        ({"displacement_rank": 0}, "displacement_rank=0"),
        ({"block_size": 0}, "block_size=0"),
        ({"num_factors": 2}, "num_factors=2"),
    ],
    "dense": [
        ({"block_size": 4}, "block_size=4"),
        ({"factor_shape": [2, 2]}, "factor_shape=[2, 2]"),
        ({"displacement_rank": 1}, "displacement_rank=1"),
        ({"budget": "lora-0"}, "'lora-0'"),
    ],
}

# the first option set of each structure (for the tests that run once per structure)
ONE_PER_STRUCTURE: list[StructureCase] = [
    s for i, s in enumerate(STRUCTURE_CASES) if all(t.structure != s.structure for t in STRUCTURE_CASES[:i])
]


# -------------------------------------------------------------------------------------------- layer types


class AwkwardMLP(nn.Module):
    """nn.Linear layers with awkward shapes: 13 -> 7 -> 11, a 1 -> 5 side branch, and a 16 -> 3 head.

    Input (..., 14): features [:13] go through lin0 / lin1, feature [13:] through lin2 (in_features = 1).
    """

    def __init__(self, hidden: int = 7) -> None:
        super().__init__()
        self.lin0 = nn.Linear(13, hidden)
        self.lin1 = nn.Linear(hidden, 11)
        self.lin2 = nn.Linear(1, 5)
        self.lin3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(torch.tanh(self.lin0(x[..., :13])))
        g = self.lin2(x[..., 13:])
        return self.lin3(torch.tanh(torch.cat([h, g], dim=-1)))


def mlp_functional(params: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """``AwkwardMLP.forward`` written out with explicit weights: x @ W.T + b, layer by layer."""

    def lin(name: str, v: torch.Tensor) -> torch.Tensor:
        w, b = params[name]
        return v @ w.T + b

    h = lin("lin1", torch.tanh(lin("lin0", x[..., :13])))
    g = lin("lin2", x[..., 13:])
    return lin("lin3", torch.tanh(torch.cat([h, g], dim=-1)))


@dataclass(frozen=True)
class LayerCase:
    """A layer type: a tiny seeded model holding such layers, its inputs and its targets."""

    id: str
    factory: Callable[[], nn.Module]  # float32, built under a fixed seed by ``model``
    mismatched_factory: Callable[[], nn.Module]  # same architecture, some targeted layer of another shape
    input_factory: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]  # the model's return value -> the tensor compared
    target_modules: tuple[str, ...]
    base_layer_type: str  # "linear" | "conv1d" | "conv2d": the type of every targeted module
    modules_to_save: tuple[str, ...] = ()
    # optional functional dense reference: (params {name: (W, b)}, inputs) -> output; None: copy-and-add
    functional: Callable[[dict, torch.Tensor], torch.Tensor] | None = None
    seed: int = 1234

    def model(self, dtype: torch.dtype = torch.float32, *, mismatched: bool = False) -> nn.Module:
        torch.manual_seed(self.seed)
        model = (self.mismatched_factory if mismatched else self.factory)()
        return model.to(dtype).eval()

    def inputs(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.input_factory(g).items()}

    def run(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.output(model(**inputs))

    def loss(self, out: torch.Tensor, target_seed: int = 99) -> torch.Tensor:
        """A tiny regression loss towards a fixed random target of the output's shape."""
        g = torch.Generator().manual_seed(target_seed)
        target = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        return ((out - target) ** 2).mean()

    def __repr__(self) -> str:
        return f"LayerCase({self.id})"


LAYER_CASES: list[LayerCase] = [
    LayerCase(
        id="linear-mlp",
        factory=AwkwardMLP,
        mismatched_factory=lambda: AwkwardMLP(hidden=8),
        input_factory=lambda g: {"x": torch.randn(4, 3, 14, generator=g)},
        output=lambda out: out,
        target_modules=("lin0", "lin1", "lin2", "lin3"),
        base_layer_type="linear",
        functional=mlp_functional,
    ),
    LayerCase(
        id="conv1d-gpt2",
        factory=tiny_gpt2,
        mismatched_factory=lambda: tiny_gpt2(n_inner=64),  # c_fc 24 -> 64 instead of 24 -> 96
        input_factory=ids_input(50, (2, 9)),
        output=lambda out: out.last_hidden_state,
        target_modules=("c_attn", "c_fc"),
        base_layer_type="conv1d",
    ),
    LayerCase(
        id="conv2d-convnet",
        factory=lambda: TinyConvNet(conv1_out=4),
        mismatched_factory=lambda: TinyConvNet(conv1_out=6),
        input_factory=lambda g: {"x": torch.randn(2, 3, 8, 8, generator=g)},
        output=lambda out: out,
        target_modules=("conv0", "conv1"),
        base_layer_type="conv2d",
    ),
    LayerCase(
        id="linear-bert",
        factory=tiny_bert_cls,
        mismatched_factory=lambda: tiny_bert_cls(intermediate_size=40),  # query / value still fit, intermediate not
        input_factory=ids_input(64, (2, 7)),
        output=lambda out: out.logits,
        target_modules=("query", "value", "intermediate.dense"),
        base_layer_type="linear",
        modules_to_save=("classifier",),
    ),
]
LAYERS_BY_ID = {c.id: c for c in LAYER_CASES}

# (structure id, layer case id) pairs reloaded in a fresh interpreter: every structure on BERT (nn.Linear),
# plus one Conv1D and one Conv2d model
FRESH_PROCESS_CASES: list[tuple[str, str]] = [(s.id, "linear-bert") for s in ONE_PER_STRUCTURE] + [
    ("ldr-b6", "conv1d-gpt2"),
    ("kronecker-3x1", "conv2d-convnet"),
]
