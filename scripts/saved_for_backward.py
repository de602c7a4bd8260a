"""What autograd holds for the backward in one training forward of MiniLM's shape, per method and compute path.

A BERT encoder of MiniLM-L6's shape (random weights, ``structpeft.bench.speed.build_base``), query and value adapted
at LoRA r=8's budget, one forward of a ``--batch`` × ``--seq`` batch under ``torch.autograd.graph.saved_tensors_hooks``
that sums the bytes of the distinct storages saved; printed in MB and as the excess over the frozen model (whose
input embeddings are made trainable so that its backward runs through every layer). Device-independent: the same
tensors are saved on the GPU, where they are most of the difference in peak memory between methods.

    python scripts/saved_for_backward.py toeplitz:fast ldr:fast circulant:fast pmss:fast
    python scripts/saved_for_backward.py --recompute off toeplitz:fast ldr:fast   # intermediates saved, not recomputed
    python scripts/saved_for_backward.py --recompute on circulant:fast            # circulant's spectra recomputed too
"""

from __future__ import annotations

import argparse
import copy

import peft
import torch
from peft import get_peft_model
from torch import nn

import structpeft
from structpeft.bench.speed import build_base
from structpeft.operators import StructuredOperator

TARGETS = ["query", "value"]


def saved_mb(model: nn.Module, ids: torch.Tensor) -> float:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).last_hidden_state.pow(2).mean()
    return sum(seen.values()) / 2**20


def config(spec: str) -> object:
    structure, _, compute = spec.partition(":")
    if structure == "pmss":
        return structpeft.PmssConfig(target_modules=TARGETS, budget="lora-8", compute=compute or "auto")
    return structpeft.SurmConfig(
        structure=structure, target_modules=TARGETS, budget="lora-8", compute=compute or "auto"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "methods",
        nargs="*",
        default=["circulant:fast", "toeplitz:fast", "ldr:fast", "pmss:fast"],
        help="STRUCTURE[:COMPUTE] (or pmss[:COMPUTE]); COMPUTE fast / dense / hybrid / auto",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--recompute",
        choices=("rule", "on", "off"),
        default="rule",
        help="recompute_fast of every operator: the rule (default), True or False",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    base = build_base("minilm")
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.embeddings.word_embeddings.weight.requires_grad_(True)
    reference = saved_mb(frozen, ids)
    print(f"{'frozen model':24s} {reference:8.1f} MB")
    rows = {"lora-r8": peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)}
    rows.update({spec: config(spec) for spec in args.methods})
    recompute = {"rule": None, "on": True, "off": False}[args.recompute]
    for name, cfg in rows.items():
        model = get_peft_model(copy.deepcopy(base), cfg)
        for m in model.modules():
            if isinstance(m, StructuredOperator):
                m.recompute_fast = recompute
        mb = saved_mb(model, ids)
        print(f"{name:24s} {mb:8.1f} MB  (+{mb - reference:.1f} over the frozen model)")


if __name__ == "__main__":
    main()
