"""Speed benchmark: train-step and inference time of every method at LoRA r=8's parameter budget, in ONE run.

All models are built first, then timed with interleaved repetitions (rep 1 of every method, rep 2 of every
method, ...) so that machine noise hits every method alike; the median of ``reps`` timings after ``warmup``
untimed ones is reported, as a ratio to the frozen base model and to PEFT LoRA r=8. Peak memory is measured per
method in a fresh subprocess (CPU: peak RSS growth of one train step; CUDA: max allocated).

The model is a BERT encoder with MiniLM-L6's shape (6 layers, hidden 384, 12 heads, FFN 1536) and random
weights — speed does not depend on the weight values, so no checkpoint is needed — targeting query and value
(``--targets`` to change). Methods and their sizes:

* ``base`` (frozen, no adapter), ``lora-r8`` (PEFT LoRA r=8: 6,144 parameters per 384 × 384 layer);
* ``surm-<structure>`` at ``budget="lora-8"`` (circulant b=24, Toeplitz b=171, Kronecker 78×78 ⊗ 5×5, LDR b=48);
* ``pmss`` at ``budget="lora-8"`` (k = 78);
* ``c3a-b24`` (PEFT C3A, block 24: 6,144 parameters, the same count as ``surm-circulant``);
* ``lokr-r16`` (PEFT LoKr w1 16×16, w2 24×24: 832 parameters) against ``surm-kronecker-16x16`` (the same
  factor shapes, so the same 832 parameters);
* ``surm-circulant-merged``: circulant after ``merge_and_unload`` (must run at the base model's speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def method_configs(targets: list[str]) -> dict[str, Callable[[], Any]]:
    """method name -> a factory of its PEFT config (None for the frozen base)."""
    import peft

    import structpeft

    def surm(structure: str, **kw: Any) -> Callable[[], Any]:
        return lambda: structpeft.SurmConfig(structure=structure, target_modules=targets, **kw)

    return {
        "base": lambda: None,
        "lora-r8": lambda: peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets),
        "surm-circulant": surm("circulant", budget="lora-8"),
        "surm-toeplitz": surm("toeplitz", budget="lora-8"),
        "surm-kronecker": surm("kronecker", budget="lora-8"),
        "surm-ldr": surm("ldr", budget="lora-8"),
        "pmss": lambda: structpeft.PmssConfig(target_modules=targets, budget="lora-8"),
        "c3a-b24": lambda: peft.C3AConfig(block_size=24, target_modules=targets),
        "lokr-r16": lambda: peft.LoKrConfig(r=16, target_modules=targets),
        "surm-kronecker-16x16": surm("kronecker", factor_shape=[16, 16]),
        "surm-circulant-merged": surm("circulant", budget="lora-8"),
    }


def build_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(**MINILM_SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).to(dtype).eval()


def build(method: str, base: nn.Module, targets: list[str]) -> nn.Module:
    """A model for ``method`` on a deep copy of ``base`` (its base weights frozen, adapter trainable)."""
    from peft import get_peft_model

    factory = method_configs(targets)[method]
    model = copy.deepcopy(base)
    cfg = factory()
    if cfg is None:
        model.requires_grad_(False)
        return model
    model = get_peft_model(model, cfg)
    if method.endswith("-merged"):
        model = model.merge_and_unload()
        model.requires_grad_(False)
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def make_step(model: nn.Module, ids: torch.Tensor, mode: str) -> Callable[[], None]:
    """A closure doing one train step (fwd + bwd + AdamW) or one inference forward."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def train() -> None:
        if opt is None:  # frozen model: the backward to the input embeddings costs the full backward
            emb = model.get_input_embeddings().weight
            emb.requires_grad_(True)
            _loss(model, ids).backward()
            emb.grad = None
            emb.requires_grad_(False)
            return
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return train if mode == "train" else infer


def time_interleaved(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in tqdm(range(reps), desc="interleaved repetitions", leave=False):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def peak_memory_mb(method: str, args: argparse.Namespace) -> float:
    """Peak memory of one train step of ``method`` in a fresh subprocess (RSS growth on CPU)."""
    cmd = [
        sys.executable, "-m", "structpeft.bench.speed", "--_memory-probe", method,
        "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device,
        "--targets", *args.targets,
    ]  # fmt: skip
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(method: str, args: argparse.Namespace) -> None:
    import resource

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(method, build_base(), args.targets).to(device)
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=device)
    step = make_step(model, ids, "train")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = build_base()
    methods = args.methods or list(method_configs(args.targets))
    models = {m: build(m, base, args.targets).to(device) for m in methods}
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=device)
    # outputs of the merged model equal the unmerged one's
    results: dict[str, Any] = {
        "setting": {
            "batch": args.batch, "seq": args.seq, "threads": args.threads, "device": str(device),
            "reps": args.reps, "warmup": args.warmup, "torch": torch.__version__, "targets": args.targets,
        },
        "methods": {},
    }  # fmt: skip
    for mode in args.modes:
        steps = {m: make_step(model, ids, mode) for m, model in models.items()}
        times = time_interleaved(steps, args.reps, args.warmup, sync)
        for m in methods:
            entry = results["methods"].setdefault(m, {"trainable": trainable(models[m])})
            entry[f"{mode}_ms"] = 1000 * statistics.median(times[m])
    if args.memory:
        for m in methods:
            results["methods"][m]["train_peak_mb"] = peak_memory_mb(m, args)
    return results


def table(results: dict[str, Any]) -> str:
    methods = results["methods"]
    modes = [k[: -len("_ms")] for k in next(iter(methods.values())) if k.endswith("_ms")]
    head = ["method", "trainable"]
    for mode in modes:
        head += [f"{mode} ms", f"{mode} / base", f"{mode} / LoRA r8"]
    if any("train_peak_mb" in e for e in methods.values()):
        head.append("train peak MB")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in methods.items():
        row = [name, f"{e['trainable']:,}"]
        for mode in modes:
            t = e[f"{mode}_ms"]
            base = methods.get("base", {}).get(f"{mode}_ms")
            lora = methods.get("lora-r8", {}).get(f"{mode}_ms")
            row += [f"{t:.1f}", f"{t / base:.2f}" if base else "-", f"{t / lora:.2f}" if lora else "-"]
        if "train_peak_mb" in e:
            row.append(f"{e['train_peak_mb']:.0f}")
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structpeft bench speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per method (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    p.add_argument("--targets", nargs="+", default=["query", "value"])
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess per method)")
    p.add_argument("--quick", action="store_true", help="CI smoke: batch 2 x 16 tokens, 2 reps")
    p.add_argument("--out", default=None, help="write results JSON and Markdown table into this folder")
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.memory_probe:
        _memory_probe(args.memory_probe, args)
        return 0
    if args.quick:
        args.batch, args.seq, args.reps, args.warmup = 2, 16, 2, 1
    results = run(args)
    text = table(results)
    print(f"setting: {json.dumps(results['setting'])}")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "speed.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "speed.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
