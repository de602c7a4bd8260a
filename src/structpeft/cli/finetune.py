"""``structpeft finetune``: fine-tune a model with one method and save a re-loadable run folder.

Without arguments it runs the built-in demo: all-MiniLM-L6-v2 on BBC News topics (5 classes) with a SURM
circulant adapter on the attention query/value projections at the parameter budget of LoRA rank 8, and prints
the accuracy next to a frozen-encoder logistic-regression probe.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import _common as C
from .methods import (
    DEFAULT_LR,
    METHODS,
    PEFT_METHODS,
    STRUCTURES,
    apply_method,
    check_method_args,
    resolve_hparams,
)

# Demo / default sizing (measured on 2 CPU cores, see the package README / CLI docs).
DEFAULT_MODEL = "minilm"
DEFAULT_DATA = "bbc"
DEFAULT_EPOCHS = 2.0
DEFAULT_DEMO_MAX_TRAIN = 1000
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"batch_size": 16, "eval_batch_size": 32, "max_length": 128},
    "generation": {"batch_size": 8, "eval_batch_size": 16, "max_length": 384, "max_test": 100},
}
WARMUP_FRACTION = 0.06

BASELINE_DESCRIPTION = {
    "probe": "logistic-regression probe on frozen mean-pooled embeddings of the base model",
    "zero-shot": "base model without fine-tuning (greedy generation)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="built-in model name ('minilm', 'smollm2') or a local Hugging Face model directory "
        f"(default: {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--data",
        default=None,
        help="built-in data set ('bbc', 'snli', 'gsm_symbolic') or a .csv/.tsv/.jsonl/.json file "
        f"(default: {DEFAULT_DATA}, with --max-train {DEFAULT_DEMO_MAX_TRAIN})",
    )
    g.add_argument(
        "--task",
        choices=("classification", "generation"),
        default=None,
        help="default: inferred from the data",
    )
    g.add_argument("--test-file", default=None, help="a second file (same columns) used as the test set")
    g.add_argument("--text-column", default="text", help="classification text column (default: text)")
    g.add_argument("--text-pair-column", default=None, help="second-sentence column of pair tasks (default: none)")
    g.add_argument("--label-column", default="label", help="classification label column (default: label)")
    g.add_argument("--prompt-column", default="prompt", help="generation prompt column (default: prompt)")
    g.add_argument("--answer-column", default="answer", help="generation answer column (default: answer)")
    g.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="seeded (stratified) training subset size "
        f"(default: all; {DEFAULT_DEMO_MAX_TRAIN} when --data is not given)",
    )
    g.add_argument(
        "--max-test",
        type=int,
        default=None,
        help="seeded test subset size (default: all for classification, 100 for generation)",
    )
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of a single file (default: 0.2)")
    g.add_argument("--cache-dir", default=None, help="where converted built-in models are cached")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="surm", help="fine-tuning method (default: surm)")
    g.add_argument("--structure", choices=STRUCTURES, default=None, help="surm: structure of ΔW (default: circulant)")
    g.add_argument(
        "--placement",
        choices=("lora", "adapter"),
        default=None,
        help="surm: 'lora' (ΔW in parallel to the targeted weights; default) or 'adapter' (SURM-Adapter: a "
        "structured map after the attention-output and FFN-output projections; default one block per layer)",
    )
    g.add_argument("--block-size", type=int, default=None, help="surm circulant/toeplitz/ldr and c3a: block size")
    g.add_argument("--displacement-rank", type=int, default=None, help="surm ldr: displacement rank (default: 1)")
    g.add_argument(
        "--num-factors", type=int, default=None, help="surm toeplitz: Toeplitz factors per block (default: 2)"
    )
    g.add_argument("--factor-shape", type=int, nargs=2, metavar=("O1", "I1"), default=None, help="surm kronecker")
    g.add_argument(
        "--budget",
        default=None,
        help="surm / pmss / c3a: trainable parameters per layer, 'lora-R' or an integer "
        "(default: lora-8 unless a block size / factor shape is given)",
    )
    g.add_argument("--r", type=int, default=None, help="lora / lokr / vera rank (default: 8, 8, 256)")
    g.add_argument("--alpha", type=float, default=None, help="surm / pmss scale (1.0), lora_alpha (2r), lokr alpha (r)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (surm, lora, vera, pmss; default 0)")
    g.add_argument(
        "--selection",
        choices=_selection_choices(),
        default=None,
        help="pmss: skeleton selection strategy (default: deim)",
    )
    g.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modules to adapt (default per model family: BERT query value; LLaMA q_proj v_proj)",
    )

    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs", type=float, default=DEFAULT_EPOCHS, help=f"training epochs (default: {DEFAULT_EPOCHS:g})"
    )
    g.add_argument("--max-steps", type=int, default=None, help="train this many optimizer steps (overrides --epochs)")
    lr_help = ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR["classification"].items())
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default per method, classification: {lr_help})",
    )
    g.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of the newly initialised classification head (default: 5e-3 for every method)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 16; generation 8)")
    g.add_argument(
        "--eval-batch-size", type=int, default=None, help="evaluation batch size (default: 32; generation 16)"
    )
    g.add_argument("--max-length", type=int, default=None, help="max tokens per example (default: 128; generation 384)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="generation: greedy decoding length (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of data subsets, head init, adapter init and shuffling")
    g.add_argument(
        "--no-epoch-eval",
        action="store_true",
        help="evaluate only once, after training (default: also after every epoch, for the training curve)",
    )
    g.add_argument(
        "--baseline",
        choices=("auto", "probe", "zero-shot", "none"),
        default="auto",
        help="frozen baseline to report: 'probe' (logistic regression on frozen mean-pooled embeddings; "
        "default for classification), 'zero-shot' (the base model's score; default for generation) or 'none'",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        help="run folder (default: runs/<model>-<data>-<method>[-<structure>]-seed<seed>)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only once the new run is complete)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _selection_choices() -> list[str] | None:
    try:
        from ..selection import SELECTION_STRATEGIES
    except ImportError:  # pragma: no cover - older structpeft
        return None
    return sorted(SELECTION_STRATEGIES)


def default_out(args: argparse.Namespace) -> Path:
    parts = [C.slug(args.model), C.slug(args.data), args.method]
    if args.method == "surm":
        parts.append(args.structure or "circulant")
    return Path("runs") / ("-".join(parts) + f"-seed{args.seed}")


def _check_numbers(args: argparse.Namespace) -> None:
    positive = {
        "--batch-size": args.batch_size,
        "--eval-batch-size": args.eval_batch_size,
        "--max-length": args.max_length,
        "--max-new-tokens": args.max_new_tokens,
        "--max-steps": args.max_steps,
        "--max-train": args.max_train,
        "--max-test": args.max_test,
    }
    for flag, v in positive.items():
        if v is not None and v < 1:
            raise C.CliError(f"{flag} must be a positive integer, got {v}")
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise C.CliError(f"--epochs must be a positive number, got {args.epochs}")
    for flag, v in (("--lr", args.lr), ("--head-lr", args.head_lr)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise C.CliError(f"{flag} must be a positive number, got {v}")
    if args.max_length is not None and args.max_length < 8:
        raise C.CliError(f"--max-length must be at least 8, got {args.max_length}")
    if not 0 <= args.seed < 2**32:  # numpy's (and so transformers' set_seed) range
        raise C.CliError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")


def _data_args(args: argparse.Namespace, task_default_max_test: int | None) -> dict[str, Any]:
    data = args.data
    if Path(data).expanduser().is_file():
        data = str(Path(data).expanduser().resolve())
    test_path = args.test_file
    if test_path is not None and Path(test_path).expanduser().is_file():
        test_path = str(Path(test_path).expanduser().resolve())
    return {
        "name_or_path": data,
        "task": args.task,
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "label_column": args.label_column,
        "prompt_column": args.prompt_column,
        "answer_column": args.answer_column,
        "max_train": args.max_train,
        "max_test": args.max_test if args.max_test is not None else task_default_max_test,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "test_path": test_path,
    }


def load_dataset(data_args: dict[str, Any]) -> Any:
    from ..data import load_data

    kwargs = dict(data_args)
    name = kwargs.pop("name_or_path")
    if kwargs.get("test_path") is None:
        kwargs.pop("test_path")
    return load_data(name, **kwargs)


class _StepLossTrainerMixin:
    step_losses: list[float]

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
        # the mixin is only ever combined with transformers.Trainer (below), which defines training_step
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        self.step_losses.append(float(loss.detach().float().item()))
        return loss


def _make_trainer_cls():
    from transformers import Trainer

    class StepLossTrainer(_StepLossTrainerMixin, Trainer):
        """``transformers.Trainer`` that also records every step's training loss (curve, NaN stop)."""

    return StepLossTrainer


def _make_nan_callback(step_losses: list[float]):
    from transformers import TrainerCallback

    class NanLossStop(TrainerCallback):
        """Stop training as soon as a step's loss is NaN or infinite."""

        def __init__(self) -> None:
            self.nan_step: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if step_losses and not math.isfinite(step_losses[-1]):
                self.nan_step = state.global_step
                control.should_training_stop = True
                control.should_evaluate = False
                control.should_save = False
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.nan_step is not None:
                control.should_evaluate = False  # do not evaluate a diverged model
            return control

    return NanLossStop()


def _in_head(name: str, head: list[str]) -> bool:
    """Whether parameter ``name`` belongs to a head module (also inside PEFT's ``modules_to_save`` wrappers)."""
    return any(f".{h}." in f".{name}." for h in head)


def _optimizer(model: Any, head: list[str], lr: float, head_lr: float) -> Any:
    import torch

    head_params: list[torch.nn.Parameter] = []
    other: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (head_params if _in_head(name, head) else other).append(p)
    groups = [g for g in ({"params": other, "lr": lr}, {"params": head_params, "lr": head_lr}) if g["params"]]
    if not groups:
        raise C.CliError("the chosen method leaves no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    demo = args.data is None
    if demo:
        args.data = DEFAULT_DATA
        if args.max_train is None:
            args.max_train = DEFAULT_DEMO_MAX_TRAIN
    check_method_args(args)
    _check_numbers(args)
    out = Path(args.out).expanduser() if args.out else default_out(args)
    C.check_out_dir(out, args.overwrite, inputs=(args.data, args.test_file, args.model))
    C.require_training_stack()
    C.require("matplotlib", C.MATPLOTLIB_PIP, "the training-curve plot")
    C.quiet_transformers()

    import transformers

    from ..data import ClassificationData
    from ..models import resolve_model

    # ------------------------------------------------------------------ data (first: it does not need the model,
    # and resolving a model can take a minute, e.g. de-quantising SmolLM2 once)
    task_guess = args.task
    data_args = _data_args(args, None)
    if data_args["max_test"] is None and (task_guess == "generation" or str(args.data).lower() == "gsm_symbolic"):
        data_args["max_test"] = TASK_DEFAULTS["generation"]["max_test"]
    data = load_dataset(data_args)
    task = "classification" if isinstance(data, ClassificationData) else "generation"
    if task == "generation" and data_args["max_test"] is None and args.max_test is None:
        # a generation file detected from its columns: cap the (slow) greedy-decoding evaluation
        data_args["max_test"] = TASK_DEFAULTS["generation"]["max_test"]
        data = load_dataset(data_args)

    model_dir = resolve_model(args.model, cache_dir=args.cache_dir)
    config = C.load_config(model_dir)
    generative = C.is_generative_config(config)
    if task == "generation" and not generative:
        raise C.CliError(
            f"data {args.data!r} is a generation task but model {args.model!r} ({config.model_type}) cannot "
            "generate text; use a decoder model such as 'smollm2', or classification data"
        )
    if task == "generation" and args.method == "head-only":
        raise C.CliError("--method head-only needs classification data (a generation model has no separate head)")
    if args.baseline == "probe" and task != "classification":
        raise C.CliError("--baseline probe needs classification data; use zero-shot or none for generation")
    if args.baseline == "zero-shot" and task != "generation":
        raise C.CliError("--baseline zero-shot applies to generation data; use probe or none for classification")
    baseline_kind = args.baseline if args.baseline != "auto" else ("probe" if task == "classification" else "zero-shot")

    tdef = TASK_DEFAULTS[task]
    batch_size = args.batch_size or tdef["batch_size"]
    eval_batch_size = args.eval_batch_size or tdef["eval_batch_size"]
    max_length = C.max_length_for(None, config, args.max_length or tdef["max_length"])
    hp = resolve_hparams(args, task)

    if task == "classification":
        n_train, n_test = len(data.train_texts), len(data.test_texts)
    else:
        n_train, n_test = len(data.train_prompts), len(data.test_prompts)
    if n_train == 0 or n_test == 0:
        raise C.CliError(f"data {args.data!r} gives {n_train} training and {n_test} test examples; both must be > 0")

    tokenizer = C.load_tokenizer(model_dir, generative=(task == "generation"))
    if task == "classification":
        train_ds = C.tokenize_classification(
            tokenizer, data.train_texts, data.train_pairs, data.train_labels, max_length
        )
        test_ds = C.tokenize_classification(tokenizer, data.test_texts, data.test_pairs, data.test_labels, max_length)
        dropped = 0
    else:
        train_ds, dropped = C.tokenize_generation_train(tokenizer, data.train_prompts, data.train_answers, max_length)
        test_ds, _ = C.tokenize_generation_train(tokenizer, data.test_prompts, data.test_answers, max_length)
        if len(train_ds) == 0:
            raise C.CliError(f"every training prompt is longer than --max-length {max_length}; raise --max-length")
        if dropped:
            print(f"note: {dropped} training examples dropped (prompt longer than --max-length {max_length})")
    collator = C.make_collator(task, tokenizer)

    # ------------------------------------------------------------------ model
    transformers.set_seed(args.seed)
    model, head = C.load_base_model(model_dir, task, data.label_names if task == "classification" else None)
    fingerprint = C.model_fingerprint(model, head)
    targets = None
    if args.method in PEFT_METHODS:
        targets = args.target_modules or C.default_target_modules(config, model, hp.get("placement", "lora"))
        targets = [t for name in targets for t in name.split(",") if t]

    print(
        f"structpeft finetune: {args.method} on {args.model} ({model_dir}) with {data.name}: "
        f"{n_train} train / {n_test} test examples, {task}, max length {max_length}"
    )

    # ------------------------------------------------------------------ method (validates targets etc. early)
    transformers.set_seed(args.seed)
    if args.method in ("surm", "pmss"):
        # compute="auto" times each layer on a training batch's rows (a batch never exceeds the training set)
        hp["compute_tokens"] = min(batch_size, n_train) * max_length
    model = apply_method(model, hp, task, head, targets)
    trainable, total = C.count_parameters(model)
    head_params = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and _in_head(name, head))
    print(
        f"{args.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"lr {hp['lr']:g}"
    )

    # ------------------------------------------------------------------ baseline (frozen base model)
    # The adapters are disabled (PEFT's disable_adapter), so this is the base model whatever the adapter init.
    baseline: dict[str, Any] | None = None
    if baseline_kind != "none":
        t0 = time.perf_counter()
        frozen = model.disable_adapter() if args.method in PEFT_METHODS else contextlib.nullcontext()
        with frozen:
            if baseline_kind == "probe":
                base = model.get_base_model() if args.method in PEFT_METHODS else model
                value = _baseline_probe(base, train_ds, test_ds, collator, eval_batch_size, data.num_labels)
            else:
                value, _ = C.generate_and_score(
                    model,
                    tokenizer,
                    data.test_prompts,
                    data.test_answers,
                    data.score,
                    batch_size=eval_batch_size,
                    max_new_tokens=args.max_new_tokens,
                    max_prompt_length=max_length,
                    desc="baseline: zero-shot generation",
                    show_progress=not args.no_progress,
                )
        baseline = {
            "kind": baseline_kind,
            "description": BASELINE_DESCRIPTION[baseline_kind],
            "accuracy": value,
            "time_s": round(time.perf_counter() - t0, 2),
        }
        print(f"baseline ({baseline['description']}): accuracy {value:.4f} [{baseline['time_s']:.0f} s]")

    # ------------------------------------------------------------------ trainer
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    total_steps = args.max_steps or max(1, math.ceil(steps_per_epoch * args.epochs))
    scratch = tempfile.mkdtemp(prefix="structpeft-trainer-")
    step_losses: list[float] = []
    nan_stop = _make_nan_callback(step_losses)
    step_timer = _make_step_timer()
    try:
        targs = C.make_training_args(
            scratch,
            task=task,
            seed=args.seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            epochs=args.epochs,
            max_steps=args.max_steps or -1,
            lr=hp["lr"],
            warmup_steps=round(WARMUP_FRACTION * total_steps),
            logging_steps=max(1, min(50, total_steps // 10)),
            eval_each_epoch=not args.no_epoch_eval,
            show_progress=not args.no_progress,
        )
        trainer = _make_trainer_cls()(
            model=model,
            args=targs,
            train_dataset=train_ds,
            eval_dataset=test_ds,
            data_collator=collator,
            compute_metrics=C.accuracy_metric if task == "classification" else None,
            callbacks=[nan_stop, step_timer],
            optimizers=(_optimizer(model, head, hp["lr"], hp["head_lr"]), None),
        )
        trainer.step_losses = step_losses
        t_train = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - t_train
        if nan_stop.nan_step is not None:
            raise C.TrainingFailedError(
                f"training stopped at step {nan_stop.nan_step}: the loss became {step_losses[-1]} "
                f"(--method {args.method}, --lr {hp['lr']:g}); try a smaller --lr. Nothing was saved."
            )
        history = trainer.state.log_history
        global_step = trainer.state.global_step
        epochs_log = _epoch_log(history, task)

        # -------------------------------------------------------------- final score
        if task == "classification":
            last = epochs_log[-1] if epochs_log else None
            if last is not None and last["step"] == global_step:
                final = last["accuracy"]
            else:
                res = trainer.evaluate()
                final = float(res["eval_accuracy"])
                epochs_log.append(
                    {
                        "epoch": round(float(trainer.state.epoch or 0), 4),
                        "step": global_step,
                        "accuracy": final,
                        "loss": float(res["eval_loss"]),
                    }
                )
        else:
            final, _ = C.generate_and_score(
                model,
                tokenizer,
                data.test_prompts,
                data.test_answers,
                data.score,
                batch_size=eval_batch_size,
                max_new_tokens=args.max_new_tokens,
                max_prompt_length=max_length,
                desc="evaluating: greedy generation",
                show_progress=not args.no_progress,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.eval()

    # ------------------------------------------------------------------ save (atomically)
    wall = time.perf_counter() - t_start
    run_config = {
        "command": "finetune",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "demo_defaults": demo,
        "model": args.model,
        "model_dir": model_dir,
        "model_type": config.model_type,
        "base_fingerprint": fingerprint,
        "task": task,
        "label_names": list(data.label_names) if task == "classification" else None,
        "head_modules": head,
        "target_modules": targets,
        "method": hp,
        "data": {
            "name": data.name,
            "source": data.source,
            "n_train": n_train,
            "n_test": n_test,
            "dropped_train": dropped,
        },
        "data_args": data_args,
        "max_length": max_length,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "total_steps": global_step,
        "warmup_steps": round(WARMUP_FRACTION * total_steps),
        "seed": args.seed,
        "versions": C.versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metrics = {
        "task": task,
        "metric": "accuracy",
        "accuracy": final,
        "baseline_accuracy": baseline["accuracy"] if baseline else None,
        "baseline": baseline,
        "trainable_params": trainable,
        "total_params": total,
        "head_params": head_params,
        "trainable_percent": round(100 * trainable / total, 4),
        "wall_time_s": round(wall, 2),
        "cpu_time_s": round(time.process_time() - cpu_start, 2),
        "train_time_s": round(train_time, 2),
        "train_steps": global_step,
        # median wall time of one optimizer step (forward, backward, optimizer; no evaluation)
        "step_time_s": round(statistics.median(step_timer.durations), 4) if step_timer.durations else None,
        "peak_memory_mb": _peak_memory_mb(),
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs_log,
        "final_train_loss": step_losses[-1] if step_losses else None,
        "train_loss": step_losses,
    }
    with C.atomic_output_dir(out, args.overwrite) as tmp:
        if args.method in PEFT_METHODS:
            model.save_pretrained(str(tmp))
        elif args.method == "full":
            model.save_pretrained(str(tmp / C.FULL_MODEL_DIR))
            tokenizer.save_pretrained(str(tmp / C.FULL_MODEL_DIR))
        else:
            C.save_head(model, head, tmp / C.HEAD_FILE)
        C.write_json(tmp / C.RUN_CONFIG, run_config)
        C.write_json(tmp / C.METRICS, metrics)
        from ._plot import plot_training_curve

        plot_training_curve(
            tmp / C.CURVE_PNG,
            step_losses,
            epochs_log,
            metric="accuracy" if task == "classification" else "loss",
            final=final,
            baseline=baseline["accuracy"] if baseline else None,
            baseline_kind=baseline_kind,
            title=f"{args.method} on {args.model} / {data.name} (seed {args.seed})",
        )

    # ------------------------------------------------------------------ summary
    what = "adapter" if args.method in PEFT_METHODS else ("model" if args.method == "full" else "head weights")
    print(f"accuracy: {final:.4f}  ({task}, {n_test} test examples, {args.method})")
    if baseline:
        delta = final - baseline["accuracy"]
        print(f"baseline: {baseline['accuracy']:.4f}  ({baseline['description']}); difference {delta:+.4f}")
    print(f"trainable parameters: {trainable:,} of {total:,}; wall time {wall:.0f} s (training {train_time:.0f} s)")
    print(f"saved {what} to {out}")
    return 0


def _make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step (from step begin to step end: forward, backward, optimizer)."""

        def __init__(self) -> None:
            self.durations: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self._t0)

    return StepTimer()


def _peak_memory_mb() -> dict[str, float | None]:
    """Peak memory of this process so far: CPU resident set (``ru_maxrss``) and CUDA max allocated."""
    import torch

    rss = None
    with contextlib.suppress(ImportError):
        import resource

        # Linux reports KiB, macOS bytes
        scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
        rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)
    cuda = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    return {"cpu_rss": rss, "cuda_allocated": cuda}


def _baseline_probe(model, train_ds, test_ds, collator, batch_size, num_classes) -> float:
    from ._baseline import probe_accuracy

    return probe_accuracy(model, train_ds, test_ds, collator, batch_size, num_classes)


def _epoch_log(history: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    out = []
    for entry in history:
        if "eval_loss" not in entry:
            continue
        row: dict[str, float | None] = {
            "epoch": round(float(entry.get("epoch", 0.0)), 4),
            "step": int(entry.get("step", 0)),
        }
        row["accuracy"] = float(entry["eval_accuracy"]) if "eval_accuracy" in entry else None
        row["loss"] = float(entry["eval_loss"])
        out.append(row)
    return out
