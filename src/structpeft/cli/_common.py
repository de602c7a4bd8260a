"""Helpers shared by ``structpeft finetune`` and ``structpeft evaluate``.

Everything the two commands must do *identically* lives here (tokenisation, model loading, scoring), so that
``evaluate`` reproduces the metric ``finetune`` reported, bit for bit on the same machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._staging import make_readable, staged_folder
from ..errors import StructPeftError

PROG = "structpeft"

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
CURVE_PNG = "training_curve.png"
HEAD_FILE = "head.safetensors"
FULL_MODEL_DIR = "model"

TRANSFORMERS_PIP = "pip install 'transformers>=4.56,<6' 'accelerate>=1.0,<2'"
MATPLOTLIB_PIP = "pip install matplotlib"

# model_type -> default target modules (the attention query and value projections)
TARGET_DEFAULTS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}

# Encoder-only model types: they cannot generate text even if transformers has an LM head class for them.
_ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "albert",
    "mpnet",
    "deberta",
    "deberta-v2",
    "camembert",
    "modernbert",
}


class CliError(StructPeftError, ValueError):
    """Bad command-line input (exit code 2)."""


class TrainingFailedError(StructPeftError, RuntimeError):
    """Training could not finish (e.g. the loss became NaN): exit code 1."""


def one_line(message: object) -> str:
    """``message`` on one line (newlines and runs of spaces collapsed)."""
    return re.sub(r"\s+", " ", str(message)).strip()


def set_offline_env() -> None:
    """Never fetch anything from a model or data hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require(module: str, pip: str, purpose: str) -> Any:
    """Import ``module`` or raise :class:`~structpeft.errors.MissingExtraError` naming what to install."""
    from ..errors import MissingExtraError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{purpose} needs the package {module!r}, which is not installed; run: {pip}") from exc


def require_training_stack() -> None:
    require("transformers", TRANSFORMERS_PIP, "structpeft finetune/evaluate")
    require("accelerate", TRANSFORMERS_PIP, "training with transformers.Trainer")


def quiet_transformers() -> None:
    """Silence transformers' info/warning logs and load bars (load reports etc.)."""
    import transformers

    transformers.logging.set_verbosity_error()
    # no "Loading weights" bars on stderr (the Trainer's own tqdm progress is not affected)
    transformers.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("structpeft", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------------------------- JSON / files


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CliError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"{what} {str(path)!r} is not readable JSON ({one_line(exc)})") from None


RUN_MARKER = "run_config.json"  # every run folder holds it (written by finetune)


def check_out_dir(out: Path, overwrite: bool, inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse, before any work: an output path that exists as a file or lies under one; a non-empty folder
    without ``--overwrite``; with ``--overwrite``, a folder that is not an earlier run (no run_config.json: it
    would be deleted whole) or that holds one of the run's own ``inputs`` (data, test file, model folder)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a directory; choose another --out")
    ancestor = next((a for a in out.absolute().parents if a.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise CliError(f"--out {str(out)!r} lies under {str(ancestor)!r}, which is a file; choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise CliError(
            f"--out {str(out)!r} already exists and is not empty; pass --overwrite to replace it "
            "(the old folder is kept until the new run is complete) or choose another --out"
        )
    if not (out / RUN_MARKER).is_file():
        raise CliError(
            f"--out {str(out)!r} is not an earlier structpeft run (it has no {RUN_MARKER}); --overwrite replaces "
            "run folders only, since the whole folder is deleted: choose another --out"
        )
    root = out.resolve()
    for item in inputs:
        if item is not None and Path(item).expanduser().exists():
            path = Path(item).expanduser().resolve()
            if path == root or root in path.parents:
                raise CliError(
                    f"--out {str(out)!r} holds {str(item)!r}, an input of this run; --overwrite would delete it: "
                    "choose another --out"
                )


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success move it to ``out`` atomically.

    An existing ``out`` (allowed by :func:`check_out_dir`) is only removed after the new folder is complete:
    it is first renamed aside, then the new folder is renamed into place, then the old one is deleted. If the
    body raises (or the process is killed), ``out`` is untouched and the temporary folder is removed.
    """
    with staged_folder(out) as tmp:
        yield tmp
        make_readable(tmp)  # mkdtemp creates 0o700 and some writers use mkstemp (0o600)
        check_out_dir(out, overwrite)  # again: something may have appeared there while we trained


def slug(text: str) -> str:
    """A file-name friendly short name for a model or data argument (``path/to/my.csv`` -> ``my``)."""
    raw = str(text).rstrip("/\\")
    base = os.path.basename(raw) or raw
    if os.sep in raw or (os.altsep and os.altsep in raw) or "." in base:
        base = Path(base).stem or base
    s = re.sub(r"[^A-Za-z0-9_.]+", "-", base).strip("-.")
    return s or "x"


# ---------------------------------------------------------------------------------------------- model family


def is_generative_config(config: Any) -> bool:
    """Whether a transformers config describes a decoder that can ``generate`` text."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", "")
    if model_type in _ENCODER_TYPES and not getattr(config, "is_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def default_target_modules(config: Any, model: Any, placement: str = "lora") -> list[str]:
    """Default targets per model family: the attention query / value projections, or for SURM-Adapter
    (``placement="adapter"``) the attention-output and FFN-output projections (Houlsby positions)."""
    model_type = getattr(config, "model_type", "")
    if placement == "adapter":
        from ..peft.model import ADAPTER_PRESETS

        if model_type in ADAPTER_PRESETS:
            return list(ADAPTER_PRESETS[model_type])
        raise CliError(
            f"no default SURM-Adapter positions for model type {model_type!r} (known: "
            f"{', '.join(sorted(ADAPTER_PRESETS))}); pass --target-modules"
        )
    if model_type in TARGET_DEFAULTS:
        return list(TARGET_DEFAULTS[model_type])
    with contextlib.suppress(ImportError):
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
    shown = ", ".join(names[:15]) or "(none)"
    raise CliError(
        f"no default target modules for model type {model_type!r}; pass --target-modules "
        f"(Linear modules of this model: {shown})"
    )


def load_config(model_dir: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot read the model config in {model_dir!r}: {one_line(exc)}") from None


def load_tokenizer(model_dir: str, generative: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(
            f"cannot load a tokenizer from {model_dir!r} ({one_line(exc)}); the model directory needs the "
            "tokenizer files (tokenizer.json or vocab files) next to config.json"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CliError(f"the tokenizer in {model_dir!r} has neither a pad token nor an eos token")
        tok.pad_token = tok.eos_token
    if generative:
        tok.padding_side = "left"  # generation appends to the right end of every prompt
    return tok


def load_base_model(model_dir: str, task: str, label_names: Sequence[str] | None) -> tuple[Any, list[str]]:
    """Load the base model for ``task``; return it and the names of its newly initialised head modules."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if task == "classification":
            assert label_names is not None
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)},
                dtype=torch.float32,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
            model.config.problem_type = "single_label_classification"
        else:
            model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc, unused-ignore]  # untyped (model, info)
                model_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CliError(f"cannot load the model in {model_dir!r}: {one_line(exc)}") from None
    if model.config.pad_token_id is None:
        pad = getattr(model.config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
        model.config.pad_token_id = pad
    head: list[str] = []
    if task == "classification":
        module_names = {n for n, _ in model.named_modules()}
        newly = list(info.get("missing_keys", [])) + [
            k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])
        ]
        for key in newly:
            top = key.split(".", 1)[0]
            if top in module_names and top not in head:
                head.append(top)
        if not head:
            head = [n for n in ("classifier", "score") if n in module_names]
        if not head:
            raise CliError(f"cannot find the classification head of the model in {model_dir!r}")
        head.sort()
    model.eval()
    return model, head


def model_fingerprint(model: Any, exclude: Sequence[str] = ()) -> str:
    """A cheap fingerprint of a base model: parameter names, shapes and a sample of every tensor's values.

    Head modules (newly initialised at load) are excluded. Used by ``evaluate`` to refuse an adapter trained
    on another base model.
    """
    import torch

    h = hashlib.sha256()
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if id(p) in seen:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to(torch.float64)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; for a PEFT model PEFT's own count (no double counting)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ----------------------------------------------------------------------------------------------- data sets


class ListDataset:
    """A map-style data set over a list of feature dicts (what ``Trainer`` needs)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def max_length_for(tokenizer: Any, config: Any, requested: int) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return min(requested, limit)
    return requested


def tokenize_classification(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, labels: list[int], max_length: int
) -> ListDataset:
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    items = [{**{k: enc[k][i] for k in keys}, "labels": int(labels[i])} for i in range(len(texts))]
    return ListDataset(items)


def tokenize_generation_train(
    tokenizer: Any, prompts: list[str], answers: list[str], max_length: int
) -> tuple[ListDataset, int]:
    """Prompt + answer + eos, loss on the answer tokens only; returns the data set and the number dropped."""
    eos = tokenizer.eos_token_id
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    items, dropped = [], 0
    for p, a in zip(p_ids, a_ids, strict=True):
        a = list(a) + ([eos] if eos is not None else [])
        ids = (list(p) + a)[:max_length]
        labels = ([-100] * len(p) + a)[:max_length]
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return ListDataset(items), dropped


class CausalCollator:
    """Pad ``input_ids`` / ``attention_mask`` / ``labels`` (labels with -100) on one side."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad = pad_token_id
        self.left = padding_side == "left"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            k = n - len(f["input_ids"])
            for key, fill in (("input_ids", self.pad), ("attention_mask", 0), ("labels", -100)):
                row = list(f[key])
                out[key].append([fill] * k + row if self.left else row + [fill] * k)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class EvalSettings:
    batch_size: int
    max_new_tokens: int


def accuracy_metric(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    preds = np.argmax(logits, axis=-1)
    return {"accuracy": float((preds == labels).mean())}


def make_training_args(
    scratch: str,
    *,
    task: str,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    logging_steps: int = 10,
    eval_each_epoch: bool = True,
    show_progress: bool = True,
) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=scratch,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="epoch" if eval_each_epoch else "no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=logging_steps,
        logging_nan_inf_filter=False,
        prediction_loss_only=(task == "generation"),
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not show_progress,
        save_only_model=True,
    )


def make_collator(task: str, tokenizer: Any) -> Any:
    if task == "classification":
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)
    return CausalCollator(tokenizer.pad_token_id, "right")


def evaluate_classification(
    model: Any, tokenizer: Any, test_ds: ListDataset, eval_batch_size: int, seed: int
) -> dict[str, float]:
    """Accuracy (and loss) of ``model`` on ``test_ds`` via ``Trainer.evaluate`` (the per-epoch eval path)."""
    from transformers import Trainer

    scratch = tempfile.mkdtemp(prefix="structpeft-eval-")
    try:
        args = make_training_args(
            scratch,
            task="classification",
            seed=seed,
            batch_size=eval_batch_size,
            eval_batch_size=eval_batch_size,
            show_progress=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            eval_dataset=test_ds,
            data_collator=make_collator("classification", tokenizer),
            compute_metrics=accuracy_metric,
        )
        res = trainer.evaluate()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"accuracy": float(res["eval_accuracy"]), "loss": float(res["eval_loss"])}


def normalise_answer(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def generate_and_score(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    answers: list[str],
    score: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_length: int,
    desc: str = "generating",
    show_progress: bool = True,
) -> tuple[float, list[str]]:
    """Greedy generation for every prompt; mean of ``score(text, i)`` (exact match if ``score`` is None)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    model.eval()
    outputs: list[str] = []
    total = 0.0
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", file=sys.stdout, disable=not show_progress):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length)
        with torch.no_grad():
            gen = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, text in enumerate(texts):
            i = start + j
            if score is not None:
                total += float(score(text, i))
            else:
                total += float(normalise_answer(text) == normalise_answer(answers[i]))
            outputs.append(text)
    return (total / len(prompts) if prompts else math.nan), outputs


def answer_loss(
    model: Any, tokenizer: Any, prompts: list[str], answers: list[str], *, max_length: int, batch_size: int = 4
) -> float:
    """Teacher-forced loss of the reference answers: Σ −log p(token | prompt, earlier answer tokens) over every
    answer token (and the closing eos) of every example, divided by their number (nats per token).

    Tokenised as for training (prompt + answer + eos, cut at ``max_length``), so it is the training objective on
    the test problems: a continuous companion to exact match, which a few dozen problems resolve only in steps
    of one problem.
    """
    import torch

    ds, _ = tokenize_generation_train(tokenizer, prompts, answers, max_length)
    collate = CausalCollator(tokenizer.pad_token_id, "right")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
        )  # ignore_index -100: prompt and padding positions
        count += int((labels != -100).sum())
    return total / count if count else math.nan


# ----------------------------------------------------------------------------------------------- head files


def head_state(model: Any, head: Sequence[str]) -> dict[str, Any]:
    return {
        n: p.detach().clone().contiguous()
        for n, p in model.named_parameters()
        if any(n == h or n.startswith(h + ".") for h in head)
    }


def save_head(model: Any, head: Sequence[str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(head_state(model, head), str(path), metadata={"format": "pt", "modules": ",".join(head)})


def load_head(model: Any, path: Path) -> None:
    from ..peft.io import read_safetensors

    tensors = read_safetensors(str(path))
    own = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise CliError(f"{str(path)!r} holds {unknown[0]!r}, which this model does not have: wrong base model")
    for k, v in tensors.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CliError(
                f"{str(path)!r}: {k!r} has shape {tuple(v.shape)} but the model's is {tuple(own[k].shape)}: "
                "wrong base model"
            )
    import torch

    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
