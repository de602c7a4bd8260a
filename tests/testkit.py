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


def tiny_gpt2_lm() -> nn.Module:
    """:func:`tiny_gpt2`'s settings with a language-model head: seeded, dropout off (deterministic in train mode),
    in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    cfg = GPT2Config(n_embd=24, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    cfg.pad_token_id = 0
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg).eval()


def greedy_decode(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``ids`` extended by ``steps`` tokens, each the argmax of the full forward's last logits (no KV cache): the
    reference that ``generate(do_sample=False)`` must reproduce."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


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


# ------------------------------------------------------------------- dtypes: a 48-wide BERT with adapters
# max |y − y32| / max |y32| allowed for a half-precision model against its float32 reference (README, Speed)
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
BERT48_IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def cotangent_loss(y: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Σ y · c for a fixed random c of y's shape (seeded), in float32 / float64: a loss whose gradient reaches
    every layer. (Not y.pow(2).sum(): a layer-normed output, such as BERT's last hidden state or GPT-2's, has an
    almost constant sum of squares, so its gradient is rounding noise that any two computations "agree" on.)"""
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    c = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (y.to(dtype) * c.to(y.device, dtype)).sum()


def tiny_bert48() -> nn.Module:
    """BERT without dropout: width 48, 2 layers, 4 heads, FFN 96, vocabulary 100; seeded weights, eval mode."""
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = tiny_bert_config(
        hidden_size=48,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).eval()


def adapted_bert48(
    method: str, compute: str = "dense", device: torch.device | str = "cpu", keep_folded_weight: bool = False
) -> nn.Module:
    """:func:`tiny_bert48` with a random non-zero adapter on query / value: ``method`` a SURM structure (blocks of
    16; Kronecker's default factors; dense has no size option) or ``"pmss"`` (8 × 8 core), on the compute path
    ``compute`` (folds held for the backward with ``keep_folded_weight``); the base model is moved to ``device``
    first (the skeleton is selected, and ``compute="auto"`` timed, there)."""
    from peft import get_peft_model

    from structpeft import PmssConfig, SurmConfig

    if method == "pmss":
        cfg: Any = PmssConfig(
            target_modules=["query", "value"],
            k_in=8,
            k_out=8,
            init_weights="random",
            alpha=300.0,
            compute=compute,
            keep_folded_weight=keep_folded_weight,
        )
    else:
        size = {} if method in ("kronecker", "dense") else {"block_size": 16}
        cfg = SurmConfig(
            structure=method,
            target_modules=["query", "value"],
            init_weights=False,
            compute=compute,
            keep_folded_weight=keep_folded_weight,
            **size,
        )
    base = tiny_bert48().to(device)
    torch.manual_seed(1)
    return get_peft_model(base, cfg)


def saved_non_parameter_tensors(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for the backward of ``model(x)``, other than the model's own
    parameters and buffers (which cost no memory of their own); the backward runs outside the hooks, so what it
    builds for a moment is not counted."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x).sum()
    y.backward()
    return shapes


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward while ``fn()`` runs, parameters
    included (unlike :func:`saved_non_parameter_tensors`, which lists a model's other saved tensors by shape)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in float64 on ``expected``'s device."""
    a, e = actual.detach().to(expected.device, torch.float64), expected.detach().to(torch.float64)
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


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
