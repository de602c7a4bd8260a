"""One run of the accuracy sweep, in its own process: fine-tune, then measure forgetting, write ``bench.json``."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...data.builtin import BBC_DATA_VERSION
from .tasks import BENCH_FILE, Forgetting, Method, Run, Task, finetune_argv, run_dir


def _spec(run: Run, runs_root: Path) -> dict[str, Any]:
    return {
        "id": run.id,
        "task": asdict(run.task),
        "method": asdict(run.method),
        "seed": run.seed,
        "dir": str(run_dir(runs_root, run)),
        "reference_dir": str(runs_root / "_reference"),
    }


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _saved_bytes(d: Path) -> int:
    """Bytes of the saved trainable state: the adapter file(s), the head file or the full model's weights."""
    names = ("adapter_model.safetensors", "head.safetensors")
    total = sum((d / n).stat().st_size for n in names if (d / n).is_file())
    model_dir = d / "model"
    if model_dir.is_dir():
        total += sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return total


def _probe_value(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    from ...cli import _common as C
    from ...cli._baseline import probe_accuracy
    from ...data import ClassificationData, load_data

    data = load_data(f.data, max_train=f.max_train, max_test=f.max_test, seed=seed)
    assert isinstance(data, ClassificationData)  # the probe sets (TASKS) are built-in classification sets
    train = C.tokenize_classification(tokenizer, data.train_texts, data.train_pairs, data.train_labels, f.max_length)
    test = C.tokenize_classification(tokenizer, data.test_texts, data.test_pairs, data.test_labels, f.max_length)
    collator = C.make_collator("classification", tokenizer)
    return probe_accuracy(model, train, test, collator, 32, data.num_labels)


def _lm_loss(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    """Mean token cross-entropy of a causal LM on ``f.max_test`` BBC articles (first ``f.max_length`` tokens)."""
    import torch

    from ...data import ClassificationData, load_data

    data = load_data(f.data, max_train=1, max_test=f.max_test, seed=seed)
    assert isinstance(data, ClassificationData)  # the text sets (TASKS) are built-in classification sets
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.test_texts), 8):
            enc = tokenizer(
                list(data.test_texts[i : i + 8]),
                truncation=True,
                max_length=f.max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def _forgetting_value(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    if f.kind == "probe":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return _probe_value(base, tokenizer, f, seed)
    return _lm_loss(model, tokenizer, f, seed)


def _reference_value(spec: dict[str, Any], rc: dict[str, Any]) -> float:
    """The forgetting measure of the untouched base model (cached per model, measure and seed)."""
    from ...cli import _common as C

    f = Forgetting(**spec["task"]["forgetting"])
    key = f"{spec['task']['model']}-{f.kind}-{f.data}-{f.max_train}-{f.max_test}-{f.max_length}-seed{spec['seed']}"
    path = Path(spec["reference_dir"]) / f"{key}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["value"])
    model_dir = rc["model_dir"]
    tokenizer = C.load_tokenizer(model_dir, generative=(rc["task"] == "generation"))
    labels = rc.get("label_names") or ["a", "b"]
    model, _ = C.load_base_model(model_dir, rc["task"], labels)
    model.eval()
    value = _forgetting_value(model, tokenizer, f, spec["seed"])
    _write_json_atomic(path, {"value": value, "measure": asdict(f), "model_dir": model_dir})
    return value


def worker(spec: dict[str, Any]) -> int:
    """Run one benchmark run (in its own process): fine-tune unless already saved, then forgetting → bench.json."""
    from ...cli import _common as C
    from ...cli import main as cli_main
    from ...cli.evaluate import load_run_model

    started_with = code_version()  # the checkout this process imports its code from (a later commit does not count)
    C.set_offline_env()
    C.quiet_transformers()
    d = Path(spec["dir"])
    task = {**spec["task"], "args": tuple(spec["task"]["args"])}
    task["forgetting"] = Forgetting(**task["forgetting"])
    method = {**spec["method"], "args": tuple(spec["method"]["args"])}
    argv = finetune_argv(Run(Task(**task), Method(**method), spec["seed"]), d)
    if (d / "run_config.json").is_file() and json.loads((d / "run_config.json").read_text()).get("argv") != argv:
        shutil.rmtree(d)  # a fine-tune of an older plan: not this run
    if not (d / "metrics.json").is_file():
        code = cli_main(argv)
        if code != 0:
            return code
    metrics = json.loads((d / "metrics.json").read_text())
    rc = json.loads((d / "run_config.json").read_text())

    t0 = time.perf_counter()
    f = Forgetting(**spec["task"]["forgetting"])
    base_value = _reference_value(spec, rc)
    model, tokenizer, _ = load_run_model(d)
    after = _forgetting_value(model, tokenizer, f, spec["seed"])
    # probe: points of second-task accuracy lost; lm: increase of the mean token loss on general text
    delta = 100 * (base_value - after) if f.kind == "probe" else after - base_value
    head = metrics.get("head_params") or 0
    forgetting_time = round(time.perf_counter() - t0, 2)
    answer = None
    if rc.get("task") == "generation":  # exact match on a few dozen problems is coarse: the answers' loss too
        from ...cli.finetune import load_dataset

        data = load_dataset(dict(rc["data_args"]))
        answer = C.answer_loss(model, tokenizer, data.test_prompts, data.test_answers, max_length=int(rc["max_length"]))
    result = {
        "id": spec["id"],
        "task": spec["task"]["name"],
        "model": spec["task"]["model"],
        "method": spec["method"]["name"],
        "family": spec["method"]["family"],
        "seed": spec["seed"],
        "accuracy": metrics["accuracy"],
        "trainable_params": metrics["trainable_params"],
        "adapter_params": metrics["trainable_params"] - head,
        "head_params": head,
        "total_params": metrics["total_params"],
        "trainable_percent": 100 * metrics["trainable_params"] / metrics["total_params"],
        "step_time_s": metrics.get("step_time_s"),
        "peak_rss_mb": (metrics.get("peak_memory_mb") or {}).get("cpu_rss"),
        "cuda_peak_mb": (metrics.get("peak_memory_mb") or {}).get("cuda_allocated"),
        "saved_bytes": _saved_bytes(d),
        "train_steps": metrics.get("train_steps"),
        "train_time_s": metrics.get("train_time_s"),
        "finetune_wall_s": metrics.get("wall_time_s"),
        "forgetting_kind": f.kind,
        "forgetting_base": base_value,
        "forgetting_after": after,
        "forgetting": delta,
        "forgetting_time_s": forgetting_time,
        "test_answer_loss": answer,
        "hardware": hardware(),  # step times of runs on different machines do not compare
        "code": started_with,  # the numerics of the paths change between commits (rounding, compute choices)
        "bbc_data_version": BBC_DATA_VERSION,  # absent: 1, before BBC's repeated articles were dropped
        "argv": argv,
    }
    _write_json_atomic(d / BENCH_FILE, result)
    return 0


def code_version() -> str:
    """structpeft's version and, for a git checkout of it, ``git describe --always --dirty`` of that checkout
    (e.g. ``0.1.0+4655389-dirty``), so that a run names the code it ran with."""
    import subprocess

    import structpeft

    package = Path(structpeft.__file__).resolve().parent
    root = package.parents[1]
    if package.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return structpeft.__version__  # installed, not a checkout (a repository around it would be another's)
    try:
        described = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{structpeft.__version__}+{described}" if described else structpeft.__version__


def hardware() -> str:
    import torch

    from ..speed import cpu_model

    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), torch {torch.__version__} with {threads} threads"
