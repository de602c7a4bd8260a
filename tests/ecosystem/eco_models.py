"""Tiny seeded models and adapter configs of the ecosystem tests (mixed batches, memory features, model card).

``ADAPTER_KINDS``: the three kinds of structpeft adapter — SURM LoRA-placement (circulant, Kronecker), SURM
adapter placement (a bottleneck with a non-linear activation) and PMSS — each as a config factory for a list of
target module names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """nn.Linear layers 10 -> 12 -> 12 -> 5 with tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv2d(3, 6, 3) -> ReLU -> Conv2d(6, 6, 3, padding=1) -> ReLU -> spatial mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(h.mean(dim=(-2, -1)))


def seeded(factory: Callable[[], nn.Module], seed: int = 1234) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def gpt2_lm() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=40,
        n_positions=24,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def surm_lora(structure: str, targets: list[str], **kwargs: Any):
    from structpeft import SurmConfig

    options = {"block_size": 4} if structure == "circulant" else {}
    return SurmConfig(structure=structure, target_modules=targets, init_weights=False, **options, **kwargs)


def surm_adapter(targets: list[str], **kwargs: Any):
    from structpeft import SurmConfig

    return SurmConfig(
        structure="circulant",
        placement="adapter",
        adapter_form="bottleneck",
        bottleneck=3,
        activation="gelu",
        target_modules=targets,
        init_weights=False,
        **kwargs,
    )


def pmss(targets: list[str], **kwargs: Any):
    from structpeft import PmssConfig

    kwargs.setdefault("k_in", 3)
    kwargs.setdefault("k_out", 3)
    return PmssConfig(target_modules=targets, init_weights=False, **kwargs)


# every ΔW-placed method (the four SURM structures and PMSS) on the MLP's fc1 and fc2, as config factories
MLP_DELTA_METHODS: dict[str, Callable[..., Any]] = {
    "surm-circulant": lambda **kw: surm_lora("circulant", ["fc1", "fc2"], **kw),
    "surm-toeplitz": lambda **kw: surm_lora("toeplitz", ["fc1", "fc2"], **kw),
    "surm-kronecker": lambda **kw: surm_lora("kronecker", ["fc1", "fc2"], **kw),
    "surm-ldr": lambda **kw: surm_lora("ldr", ["fc1", "fc2"], **kw),
    "pmss": lambda **kw: pmss(["fc1", "fc2"], **kw),
}

ADAPTER_KINDS: dict[str, Callable[..., Any]] = {
    "surm-circulant": lambda targets, **kw: surm_lora("circulant", targets, **kw),
    "surm-kronecker": lambda targets, **kw: surm_lora("kronecker", targets, **kw),
    "surm-adapter": surm_adapter,
    "pmss": pmss,
}
