"""Fine-tune with a structpeft adapter and a plain loop under Hugging Face ``accelerate``.

    python examples/train_accelerate.py --output-dir runs/acc                  # MiniLM-L6 on BBC News, SURM circulant
    python examples/train_accelerate.py --output-dir runs/acc2 --resume-from-checkpoint runs/acc/checkpoint-100
    python examples/train_accelerate.py --output-dir runs/tiny --tiny --max-steps 6 --save-steps 3   # tests
    accelerate launch --cpu --num_processes 2 examples/train_accelerate.py --output-dir runs/ddp   # DDP (gloo on CPU)

``accelerator.prepare`` wraps the PEFT model (DDP under ``accelerate launch``), ``accelerator.save_state`` writes
the checkpoints and ``accelerator.load_state`` resumes: two state hooks make the model part of a checkpoint the
adapter only (PEFT's ``save_pretrained`` / ``load_adapter``) instead of the full model's weights; the optimizer,
scheduler, data-loader and RNG states are accelerate's. The data order is a function of (seed, epoch) (a seedable
sampler), and a resumed run skips the batches already seen, so it continues with the same losses as an
uninterrupted run. Every step's loss goes to ``OUTPUT_DIR/losses.json``, the final adapter to
``OUTPUT_DIR/adapter``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import accuracy, add_arguments, build, write_losses  # noqa: E402

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_only_checkpoints(accelerator: Any) -> None:
    """Make ``save_state`` / ``load_state`` store the PEFT model as its adapter (not as a full state dict)."""
    from peft import PeftModel

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[i])
            if isinstance(model, PeftModel):
                model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
                if weights:  # empty on the processes that do not write
                    weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[i])
            if isinstance(model, PeftModel):
                model.load_adapter(input_dir, adapter_name=model.active_adapter, is_trainable=True)
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    set_seed(args.seed)
    model, train, test, collate = build(args)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    # a generator of its own: starting an epoch's iterator then draws nothing from the global RNG, whose state (the
    # dropout masks) a checkpoint restores
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # a prepared scheduler steps once per process at every optimizer step (accelerate's convention): size it so
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.max_steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    adapter_only_checkpoints(accelerator)

    step = 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        match = re.search(r"checkpoint-(\d+)$", os.path.normpath(args.resume_from_checkpoint))
        if match is None:
            parser.error(f"--resume-from-checkpoint {args.resume_from_checkpoint!r}: expected a checkpoint-N folder")
        step = int(match.group(1))
    losses = []
    model.train()
    while step < args.max_steps:
        epoch, seen = divmod(step, len(loader))
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, seen) if seen else loader
        for batch in batches:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
            losses.append({"step": step, "loss": float(mean_loss)})
            if step % args.save_steps == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))
            if step >= args.max_steps:
                break
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(os.path.join(args.output_dir, "adapter"), is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        write_losses(args.output_dir, losses)
        print(f"test accuracy {accuracy(unwrapped, test, collate):.4f}; adapter saved in {args.output_dir}/adapter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
