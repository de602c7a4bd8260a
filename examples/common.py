"""Shared by ``train_trainer.py`` and ``train_accelerate.py``: command-line options, the model with a structpeft
adapter, and the data.

Default: the embedded MiniLM-L6 encoder (``structpeft.models.resolve_model("minilm")``, no download) on the
embedded BBC News topics (``structpeft.data.load_data("bbc")``). ``--tiny``: a 2-layer BERT with random weights
built from a config and a synthetic token-id data set, for tests and smoke runs (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

import structpeft

TINY_VOCAB = 96
TINY_LABELS = 4
TINY_LENGTH = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both examples take."""
    parser.add_argument("--model", default="minilm", help="built-in model name or local model folder")
    parser.add_argument("--data", default="bbc", help="built-in data set or a local .csv/.jsonl file")
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT + synthetic data (tests)")
    parser.add_argument("--tiny-dropout", type=float, default=0.1, help="dropout of the --tiny BERT")
    parser.add_argument("--method", choices=("surm", "pmss"), default="surm")
    parser.add_argument("--structure", default="circulant", help="SURM structure")
    parser.add_argument("--placement", choices=("lora", "adapter"), default="lora", help="SURM placement")
    parser.add_argument("--budget", default="lora-8", help="trainable parameters per layer ('lora-R' or an int)")
    parser.add_argument(
        "--compute",
        default="auto",
        choices=("auto", "fast", "dense", "hybrid"),
        help="compute path per layer (auto: timed and recorded; a resumed run reuses the checkpoint's choice)",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=100, help="checkpoint every this many steps")
    parser.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder written by this script")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--max-test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")


def peft_config(args: argparse.Namespace) -> Any:
    """The structpeft config of the run (sequence classification: PEFT also trains and saves the head)."""
    if args.method == "pmss":
        return structpeft.PmssConfig(
            task_type="SEQ_CLS", target_modules=["query", "value"], budget=args.budget, compute=args.compute
        )
    if args.placement == "adapter":
        return structpeft.SurmConfig(
            task_type="SEQ_CLS",
            structure=args.structure,
            placement="adapter",
            target_modules=["attention.output.dense", "output.dense"],
        )
    return structpeft.SurmConfig(
        task_type="SEQ_CLS",
        structure=args.structure,
        target_modules=["query", "value"],
        budget=args.budget,
        compute=args.compute,
    )


def _tiny_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of random token ids; the label is the first token's id modulo the number of labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (n, TINY_LENGTH), generator=g)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": int(row[0]) % TINY_LABELS} for row in ids
    ]


def build(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict], Any]:
    """(PEFT model, train examples, test examples, collate function)."""
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        default_data_collator,
    )

    torch.manual_seed(args.seed)
    if args.tiny:
        config = BertConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_LENGTH,
            num_labels=TINY_LABELS,
            hidden_dropout_prob=args.tiny_dropout,
            attention_probs_dropout_prob=args.tiny_dropout,
        )
        base = BertForSequenceClassification(config)
        train, test = _tiny_data(64, args.seed), _tiny_data(32, args.seed + 1)
        collate = default_data_collator
    else:
        from structpeft.data import load_data
        from structpeft.models import resolve_model

        path = resolve_model(args.model)
        data = load_data(args.data, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=data.num_labels, local_files_only=True
        )

        def encode(texts: list[str], pairs: list[str] | None, labels: list[int]) -> list[dict]:
            enc = tokenizer(texts, pairs, truncation=True, max_length=args.max_length)
            return [{**{k: v[i] for k, v in enc.items()}, "labels": y} for i, y in enumerate(labels)]

        train = encode(data.train_texts, data.train_pairs, data.train_labels)
        test = encode(data.test_texts, data.test_pairs, data.test_labels)
        collate = DataCollatorWithPadding(tokenizer)
    if args.gradient_checkpointing:  # transformers 5 renamed it activation_checkpointing_enable
        (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    config = peft_config(args)
    if args.resume_from_checkpoint:
        # the layers as the checkpoint recorded them, with the compute paths its run timed: timed again here,
        # compute="auto" could pick another path and the resumed run would round differently from an uninterrupted one
        config = config.for_resume(args.resume_from_checkpoint)
    # compute="auto" times each layer's compute paths where the layer is: on the GPU the run will train on (this
    # process's, under torchrun), not on the CPU the weights were loaded on; Trainer / accelerate keep it there
    if torch.cuda.is_available():
        base.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    model = get_peft_model(base, config)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, train, test, collate


@torch.no_grad()
def accuracy(model: Any, examples: list[dict], collate: Any, batch_size: int = 64) -> float:
    """Test accuracy of a sequence classifier."""
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def write_losses(output_dir: str, losses: list[dict[str, float]]) -> str:
    """``output_dir/losses.json``: the training loss of every optimizer step of this invocation."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "losses.json")
    with open(path, "w") as f:
        json.dump(losses, f, indent=1)
    return path
