"""Pieces shared by the test folders (tests/ is on ``sys.path`` through tests/conftest.py): tiny models built from
configs with random weights, their integer inputs, model snapshots, and child Python processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------- models
class TinyConvNet(nn.Module):
    """Conv2d(3, 6, 3) -> ReLU -> Conv2d(6, c, 3, padding=1, groups=2) -> ReLU -> spatial mean -> Linear(c, 5)."""

    def __init__(self, conv1_out: int = 8) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv2d(6, conv1_out, 3, padding=1, groups=2)
        self.head = nn.Linear(conv1_out, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(h.mean(dim=(-2, -1)))


def tiny_gpt2(**overrides: Any) -> nn.Module:
    """GPT-2 (Conv1D layers): width 24, 2 layers, 2 heads, vocabulary 50."""
    from transformers import GPT2Config, GPT2Model

    settings = dict(n_embd=24, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(GPT2Config(**{**settings, **overrides}))


def tiny_bert_config(**overrides: Any) -> Any:
    """BERT: width 24, 2 layers, 2 heads, FFN 36, vocabulary 64, 3 labels."""
    from transformers import BertConfig

    settings = dict(
        vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=36, num_labels=3
    )
    return BertConfig(**{**settings, **overrides})


def tiny_bert_cls(**overrides: Any) -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config(**overrides))


def ids_input(vocab: int, shape: tuple[int, ...]) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    """An input factory: ``{"input_ids": random ids in [0, vocab) of shape}`` from a generator."""
    return lambda g: {"input_ids": torch.randint(0, vocab, shape, generator=g)}


# ---------------------------------------------------------------------------------------------- snapshots
def snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    """(module names and types, a cloned state dict): everything a failed call must leave unchanged."""
    modules = [(k, type(m).__qualname__) for k, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return modules, state


def assert_same_snapshot(before, after) -> None:
    assert before[0] == after[0], "module tree changed"
    assert before[1].keys() == after[1].keys(), "state dict keys changed"
    for k, v in before[1].items():
        assert torch.equal(v, after[1][k]), f"{k} changed"


# --------------------------------------------------------------------------------------- child processes
def subprocess_env() -> dict[str, str]:
    """The environment of a child Python: one thread per process, structpeft importable from this checkout."""
    import structpeft

    env = dict(os.environ)
    src = str(Path(structpeft.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_python(script: str, *args: str, path: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter with ``path`` (a test folder) and tests/ on sys.path; fail with its
    output if it fails."""
    code = f"import sys\nsys.path[:0] = [{path!r}, {TESTS_DIR!r}]\n" + textwrap.dedent(script)
    env = dict(
        os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc
