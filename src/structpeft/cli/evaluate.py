"""``structpeft evaluate RUN_DIR``: reload a saved run in a fresh process and score it again.

The base model is rebuilt from the model directory recorded in ``run_config.json`` (or ``--model``), refused
if its weights differ from the ones the run was trained on, the adapter is loaded with
``PeftModel.from_pretrained`` (``full`` runs: the saved model; ``head-only`` runs: the saved head weights),
and the test split is scored exactly as ``finetune`` scored it. The result is printed next to the one in
``metrics.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from . import _common as C
from .methods import PEFT_METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a folder written by 'structpeft finetune'")
    p.add_argument(
        "--model",
        default=None,
        help="base model (built-in name or directory) to load instead of the recorded one, e.g. after moving "
        "the run to another machine; it must be the same model the run was trained on",
    )
    p.add_argument("--data", default=None, help="data set or file to use instead of the recorded one (same columns)")
    p.add_argument("--cache-dir", default=None, help="where converted built-in models are cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_run_dir(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if not run_dir.exists():
        raise C.CliError(f"run folder {str(run_dir)!r} does not exist; give a folder written by 'structpeft finetune'")
    if not run_dir.is_dir():
        raise C.CliError(f"{str(run_dir)!r} is not a folder; give a folder written by 'structpeft finetune'")
    if not (run_dir / C.RUN_CONFIG).is_file():
        hint = ""
        if (run_dir / "adapter_config.json").is_file():
            hint = " (it holds a PEFT adapter but no run_config.json; use peft.PeftModel.from_pretrained)"
        raise C.CliError(
            f"{str(run_dir)!r} is not a structpeft run folder: it has no {C.RUN_CONFIG}{hint}; give a folder "
            "written by 'structpeft finetune'"
        )
    rc = C.read_json(run_dir / C.RUN_CONFIG, "run config")
    needed = ("method", "task", "model_dir", "data_args", "max_length", "eval_batch_size", "seed")
    missing = [k for k in needed if not isinstance(rc, dict) or k not in rc]
    if missing:
        raise C.CliError(
            f"{str(run_dir / C.RUN_CONFIG)!r} lacks {', '.join(missing)}; it was not written by structpeft finetune"
        )
    kinds: dict[str, type | tuple[type, ...]] = {
        "method": dict,
        "task": str,
        "model_dir": str,
        "data_args": dict,
        "max_length": int,
        "eval_batch_size": int,
        "seed": int,
    }
    bad = [k for k, kind in kinds.items() if not isinstance(rc[k], kind) or isinstance(rc[k], bool)]
    labels = rc.get("label_names")
    if rc["task"] == "classification" and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        bad.append("label_names")
    if bad:
        raise C.CliError(
            f"{str(run_dir / C.RUN_CONFIG)!r} has invalid {', '.join(f'{k}={rc.get(k)!r}' for k in bad)}; it was "
            "edited or not written by structpeft finetune"
        )
    metrics = None
    if (run_dir / C.METRICS).is_file():
        metrics = C.read_json(run_dir / C.METRICS, "metrics file")
        fields = ("accuracy", "baseline_accuracy")
        numbers = (int, float)
        wrong = [
            k
            for k in fields
            if isinstance(metrics, dict)
            and metrics.get(k) is not None
            and (not isinstance(metrics[k], numbers) or isinstance(metrics[k], bool))
        ]
        if not isinstance(metrics, dict) or wrong:
            what = ", ".join(f"{k}={metrics[k]!r}" for k in wrong) if wrong else "its content (not an object)"
            raise C.CliError(
                f"{str(run_dir / C.METRICS)!r} has invalid {what}; it was edited or not written by structpeft finetune"
            )
    method = rc["method"].get("method")
    if method in PEFT_METHODS:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (run_dir / name).is_file():
                raise C.CliError(f"run folder {str(run_dir)!r} lacks {name}; the {method} adapter cannot be loaded")
    elif method == "full":
        if not (run_dir / C.FULL_MODEL_DIR / "config.json").is_file():
            raise C.CliError(f"run folder {str(run_dir)!r} lacks the saved model in {C.FULL_MODEL_DIR}/")
    elif method == "head-only":
        if not (run_dir / C.HEAD_FILE).is_file():
            raise C.CliError(f"run folder {str(run_dir)!r} lacks {C.HEAD_FILE}")
    else:
        raise C.CliError(f"{str(run_dir / C.RUN_CONFIG)!r} names an unknown method {method!r}")
    if method == "pmss":
        from .methods import pmss_available

        if not pmss_available():
            raise C.CliError("this run used pmss, which is not available in this version of structpeft")
    return rc, metrics


def load_run_model(run_dir: Path, model: str | None = None, cache_dir: str | None = None) -> tuple[Any, Any, dict]:
    """Rebuild a saved run's model exactly as ``finetune`` left it: ``(model, tokenizer, run_config)``.

    The base model is resolved from ``model`` (a built-in name or directory) or the recorded directory, refused
    if its weights differ from the ones the run was trained on; the adapter is loaded with
    ``PeftModel.from_pretrained`` (``full`` runs: the saved model; ``head-only`` runs: the saved head). The
    returned model is in eval mode with every parameter frozen.
    """
    rc, _ = _check_run_dir(run_dir)
    C.require_training_stack()

    from ..errors import BaseModelMismatchError
    from ..models import resolve_model

    method = rc["method"]["method"]
    task = rc["task"]
    if method == "full":
        if model is not None:
            raise C.CliError("--model does not apply to a 'full' run: it holds its own model (in model/)")
        model_dir = str((run_dir / C.FULL_MODEL_DIR).resolve())  # config, weights and tokenizer saved there
    elif model is not None:
        model_dir = resolve_model(model, cache_dir=cache_dir)
    elif os.path.isdir(rc["model_dir"]):
        model_dir = resolve_model(rc["model_dir"])
    else:
        # the recorded directory is gone (another machine?): resolve the name given to finetune again
        model_dir = resolve_model(rc.get("model") or rc["model_dir"], cache_dir=cache_dir)

    config = C.load_config(model_dir)
    tokenizer = C.load_tokenizer(model_dir, generative=(task == "generation"))

    import transformers

    transformers.set_seed(int(rc["seed"]))
    if method == "full":
        net, _ = C.load_base_model(model_dir, task, rc.get("label_names"))
    else:
        net, head = C.load_base_model(model_dir, task, rc.get("label_names"))
        fp = C.model_fingerprint(net, head)
        if rc.get("base_fingerprint") and fp != rc["base_fingerprint"]:
            raise BaseModelMismatchError(
                f"the {method} run in {str(run_dir)!r} was trained on the base model {rc['model_dir']!r} "
                f"({rc.get('model_type')}), but {model_dir!r} ({config.model_type}) has different weights or "
                "shapes; pass --model with the original base model"
            )
        if method in PEFT_METHODS:
            from peft import PeftModel

            import structpeft  # noqa: F401  (registers structpeft's methods with PEFT)

            try:
                net = PeftModel.from_pretrained(net, str(run_dir), is_trainable=False)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                raise C.CliError(f"cannot load the adapter in {str(run_dir)!r}: {C.one_line(exc)}") from None
        else:
            C.load_head(net, run_dir / C.HEAD_FILE)
    net.eval()
    net.requires_grad_(False)
    return net, tokenizer, rc


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    run_dir = Path(args.run_dir).expanduser()
    rc, metrics = _check_run_dir(run_dir)
    C.require_training_stack()
    C.quiet_transformers()

    from .finetune import load_dataset

    method = rc["method"]["method"]
    task = rc["task"]
    data_args = dict(rc["data_args"])
    if args.data is not None:  # other data: its own test split (the run's --test-file belongs to the run's data)
        data_args["name_or_path"] = args.data
        data_args["test_path"] = None
    data = load_dataset(data_args)
    is_cls = hasattr(data, "label_names")
    if (task == "classification") != is_cls:
        raise C.CliError(f"the run is a {task} task but the data {data_args['name_or_path']!r} is not")
    if task == "classification" and list(data.label_names) != list(rc["label_names"]):
        raise C.CliError(
            f"the data's labels {list(data.label_names)} differ from the run's {rc['label_names']}; "
            "use the data the run was trained on"
        )
    model, tokenizer, _ = load_run_model(run_dir, args.model, args.cache_dir)
    max_length = int(rc["max_length"])

    if task == "classification":
        test_ds = C.tokenize_classification(tokenizer, data.test_texts, data.test_pairs, data.test_labels, max_length)
        scores = C.evaluate_classification(model, tokenizer, test_ds, int(rc["eval_batch_size"]), int(rc["seed"]))
        value, loss = scores["accuracy"], scores["loss"]
        n_test = len(data.test_texts)
    else:
        loss = None  # generation: exact match only (its test loss is not recorded at the final step)
        value, _ = C.generate_and_score(
            model,
            tokenizer,
            data.test_prompts,
            data.test_answers,
            data.score,
            batch_size=int(rc["eval_batch_size"]),
            max_new_tokens=int(rc.get("max_new_tokens", 256)),
            max_prompt_length=max_length,
            desc="evaluating: greedy generation",
            show_progress=not args.no_progress,
        )
        n_test = len(data.test_prompts)

    saved: dict[str, Any] = metrics if isinstance(metrics, dict) else {}
    recorded = saved.get("accuracy")
    elapsed = time.perf_counter() - t_start
    print(
        f"accuracy: {value:.4f}  ({task}, {n_test} test examples, {method}, reloaded from {run_dir}) [{elapsed:.0f} s]"
    )
    if recorded is None:
        print("metrics.json: no recorded accuracy to compare with")
    else:
        same = "identical" if value == recorded else f"differs by {value - recorded:+.6f}"
        print(f"metrics.json: {recorded:.4f} ({same})")
        # the test loss is a far finer check than accuracy that the reloaded model is the trained one
        epochs = saved.get("epochs") or []
        recorded_loss = epochs[-1].get("loss") if epochs and isinstance(epochs[-1], dict) else None
        if loss is not None and recorded_loss is not None and data_args == dict(rc["data_args"]):
            same = "identical" if loss == recorded_loss else f"differs by {loss - recorded_loss:+.3g}"
            print(f"test loss: {loss:.6f}, metrics.json: {recorded_loss:.6f} ({same})")
        base = saved.get("baseline_accuracy")
        if base is not None:
            print(f"baseline: {base:.4f} ({(saved.get('baseline') or {}).get('description', 'frozen baseline')})")
    return 0
