"""Fine-tune with a structpeft adapter and ``transformers.Trainer``.

    python examples/train_trainer.py --output-dir runs/trainer                 # MiniLM-L6 on BBC News, SURM circulant
    python examples/train_trainer.py --output-dir runs/t --method pmss          # PMSS instead
    python examples/train_trainer.py --output-dir runs/t2 --resume-from-checkpoint runs/t/checkpoint-100
    python examples/train_trainer.py --output-dir runs/tiny --tiny --max-steps 6 --save-steps 3   # seconds, tests
    torchrun --nproc_per_node 2 examples/train_trainer.py --output-dir runs/ddp   # DDP (Trainer does the rest)

Nothing here is specific to structpeft beyond the config: the PEFT model goes to ``Trainer`` as any PEFT model
does. Its checkpoints (``checkpoint-N/``) hold the adapter only (``adapter_model.safetensors``,
``adapter_config.json``, the model card) next to the optimizer, scheduler and RNG states; resuming restores all of
them and continues with the same losses as an uninterrupted run. Every step's training loss (full precision; the
Trainer's own log rounds it) goes to ``OUTPUT_DIR/losses.json``, the final adapter to ``OUTPUT_DIR/adapter``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import accuracy, add_arguments, build, write_losses  # noqa: E402


def make_trainer_class() -> type:
    """``Trainer`` that records each optimizer step's loss (mean over the processes) at full precision."""
    from transformers import Trainer

    class LossRecordingTrainer(Trainer):
        step_losses: list[dict[str, float]]

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102 (Trainer API)
            loss = super().training_step(model, inputs, num_items_in_batch)
            mean = self.accelerator.reduce(loss.detach().clone(), reduction="mean")  # over processes (DDP)
            self.step_losses.append({"step": self.state.global_step + 1, "loss": float(mean)})
            return loss

    return LossRecordingTrainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from transformers import TrainingArguments

    model, train, test, collate = build(args)
    model.print_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=max(1, args.save_steps // 5),
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        label_names=["labels"],
        # each process's loss is the mean over its own examples (equal per-process batches: the mean of the
        # process losses is the global batch's), so the recorded curve does not depend on the number of processes
        average_tokens_across_devices=False,
    )
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train, data_collator=collate)
    trainer.step_losses = []
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        write_losses(args.output_dir, trainer.step_losses)
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
        print(f"test accuracy {accuracy(model, test, collate):.4f}; adapter saved in {args.output_dir}/adapter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
