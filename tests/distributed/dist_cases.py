"""Cases of the distributed tests, shared by the torchrun worker (``dist_worker.py``) and the single-process
reference computed in the pytest process.

Every case builds, under a fixed seed, the same tiny model and PEFT config in every process, and a fixed global
batch; ``micro_batches(world)`` splits it into equal per-rank parts. The loss of a part is the *mean* over its
examples, so the mean of the per-rank losses is the global-batch loss and DDP / FSDP2's averaged gradients are its
gradients. Kept free of pytest and of top-level structpeft imports (the worker imports it after ``sys.path``
setup).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GLOBAL_BATCH = 8
STEPS = 3  # optimizer steps before the adapter is saved
LR = 5e-2


class Block(nn.Module):
    """x + W2·tanh(W1·x + b1) + b2: a residual MLP block (one FSDP2 unit)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class BlockMLP(nn.Module):
    """Input projection, two residual blocks, a classification head."""

    def __init__(self, n_in: int = 10, width: int = 12, hidden: int = 16, n_out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([Block(width, hidden) for _ in range(2)])
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _mlp() -> nn.Module:
    return BlockMLP()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=40,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


def _mlp_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(GLOBAL_BATCH, 10, generator=g), "y": torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)}


def _lm_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 40, (GLOBAL_BATCH, 6), generator=g)
    return {"input_ids": ids}


def _mlp_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@dataclass(frozen=True)
class DistCase:
    """A tiny model, a structpeft config for it and a loss on a fixed global batch."""

    id: str
    factory: Callable[[], nn.Module]
    method: str  # "surm" | "pmss"
    options: dict[str, Any]
    batch_factory: Callable[[torch.Generator], dict[str, torch.Tensor]]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    blocks: Callable[[nn.Module], list[nn.Module]]  # the FSDP2 units (besides the root), in the PEFT model
    task_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 1234

    def config(self):
        from structpeft import PmssConfig, SurmConfig

        # compute="fast" unless the case sets one: 'auto' times the compute paths per process, so ranks (and the
        # reference process) could pick different, equally correct paths; the tests compare bits
        options = {"compute": "fast", **self.options}
        if self.method == "pmss":
            return PmssConfig(task_type=self.task_type, **options)
        return SurmConfig(task_type=self.task_type, **options)

    def model(self) -> nn.Module:
        """The PEFT model (float32), identical in every process: base and adapter weights drawn from ``seed``."""
        from peft import get_peft_model

        torch.manual_seed(self.seed)
        base = self.factory()
        torch.manual_seed(self.seed + 1)  # non-zero adapters (init_weights=False), so every gradient is non-trivial
        return get_peft_model(base, self.config())

    def batch(self) -> dict[str, torch.Tensor]:
        return self.batch_factory(torch.Generator().manual_seed(self.seed + 2))

    def micro_batches(self, world: int) -> list[dict[str, torch.Tensor]]:
        """The global batch split into ``world`` equal parts along dim 0 (part r goes to rank r)."""
        batch = self.batch()
        return [{k: v.chunk(world)[r] for k, v in batch.items()} for r in range(world)]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model, batch)


def _mlp_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.base_model.model.blocks)


def _gpt2_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.base_model.model.transformer.h)


MLP_TARGETS = ["fc1", "fc2"]
CASES: list[DistCase] = [
    DistCase(
        "mlp-circulant",
        _mlp,
        "surm",
        {"structure": "circulant", "block_size": 4, "target_modules": MLP_TARGETS, "init_weights": False},
        _mlp_batch,
        _mlp_loss,
        _mlp_blocks,
    ),
    DistCase(
        "mlp-kronecker",
        _mlp,
        "surm",
        {"structure": "kronecker", "target_modules": MLP_TARGETS, "init_weights": False},
        _mlp_batch,
        _mlp_loss,
        _mlp_blocks,
    ),
    DistCase(  # the hybrid path's backward reads L and R again (FSDP2 must have them unsharded then)
        "mlp-kronecker-hybrid",
        _mlp,
        "surm",
        {"structure": "kronecker", "target_modules": MLP_TARGETS, "init_weights": False, "compute": "hybrid"},
        _mlp_batch,
        _mlp_loss,
        _mlp_blocks,
    ),
    DistCase(
        "mlp-adapter-bottleneck",
        _mlp,
        "surm",
        {
            "structure": "circulant",
            "placement": "adapter",
            "adapter_form": "bottleneck",
            "bottleneck": 4,
            "activation": "gelu",
            "target_modules": ["fc2"],
            "init_weights": False,
        },
        _mlp_batch,
        _mlp_loss,
        _mlp_blocks,
    ),
    DistCase(
        "mlp-pmss",
        _mlp,
        "pmss",
        {"target_modules": MLP_TARGETS, "k_in": 3, "k_out": 3, "init_weights": False},
        _mlp_batch,
        _mlp_loss,
        _mlp_blocks,
    ),
    DistCase(
        "gpt2-ldr",
        _gpt2,
        "surm",
        {"structure": "ldr", "block_size": 8, "target_modules": ["c_attn", "mlp.c_proj"], "init_weights": False},
        _lm_batch,
        _lm_loss,
        _gpt2_blocks,
        task_type="CAUSAL_LM",
    ),
]
# keep_folded_weight: W + s·ΔW built in the forward and held for the backward, across FSDP's reshard; on "dense" it
# also holds ΔW's graph (the PMSS gather, the LDR factor products). Each is its twin above on one folded path.
_KEEP_TWINS = [
    ("mlp-kronecker-hybrid", "hybrid", "mlp-kronecker-hybrid-keep"),
    ("mlp-pmss", "dense", "mlp-pmss-dense-keep"),
    ("gpt2-ldr", "dense", "gpt2-ldr-dense-keep"),
]
_TWINS = {c.id: c for c in CASES}  # a renamed twin fails here (KeyError) rather than dropping its keep case
CASES += [
    dataclasses.replace(
        _TWINS[twin], id=keep_id, options={**_TWINS[twin].options, "compute": compute, "keep_folded_weight": True}
    )
    for twin, compute, keep_id in _KEEP_TWINS
]
CASES_BY_ID = {c.id: c for c in CASES}


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: gradient} of every trainable parameter (DTensor gradients gathered with ``full_tensor``)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            raise AssertionError(f"trainable parameter {name} got no gradient")
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def reference_run(case: DistCase, world: int, folder: str | None = None) -> dict[str, Any]:
    """The single-process run the distributed one must match.

    * ``full_grads``: gradients of the global-batch loss in one backward (what DDP / FSDP2 compute, up to float
      rounding);
    * ``grads``: the same gradient assembled as DDP / FSDP2 do: per-part gradients g_r, then (Σ_r g_r) / world,
      which for world = 2 rounds exactly as their all-reduce / reduce-scatter of g_r / 2 (halving is exact);
    * ``losses``: the global-batch loss before each of ``STEPS`` AdamW steps on ``grads``-style gradients;
    * the adapter saved after those steps in ``folder`` (if given).
    """
    model = case.model()
    model.train()
    parts = case.micro_batches(world)
    full = case.loss(model, case.batch())
    full.backward()
    full_grads = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    first_grads, losses = None, []
    for _ in range(STEPS):
        per_part = []
        part_losses = []
        for part in parts:
            model.zero_grad(set_to_none=True)
            loss = case.loss(model, part)
            loss.backward()
            part_losses.append(loss.detach())
            per_part.append(adapter_grads(model))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        for n, p in model.named_parameters():
            if n in names:
                p.grad = sum(g[n] / world for g in per_part)
        if first_grads is None:
            first_grads = adapter_grads(model)
        losses.append(float(sum(part_losses) / world))
        opt.step()
    if folder is not None:
        model.save_pretrained(folder)
    return {"full_grads": full_grads, "grads": first_grads, "losses": losses}
