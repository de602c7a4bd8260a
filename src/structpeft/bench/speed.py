"""Speed benchmark: train-step and inference time of every method at LoRA r=8's parameter budget, in ONE run.

All models are built first, then timed with interleaved repetitions (rep 1 of every method, rep 2 of every
method, ...) so that machine noise hits every method alike; the median of ``reps`` timings after ``warmup``
untimed ones is reported, as a ratio to the frozen base model and to PEFT LoRA r=8, and as the adapter
*overhead* (t − t_base) / t_base relative to LoRA r=8's overhead (the meaningful number for "as cheap as LoRA" and
"2× faster than C3A": the frozen model's own cost is the same for every method). Peak memory of one train step is
measured per method in a fresh subprocess: the process's peak memory during the step, model and adapter included
(CPU: the peak resident set, Linux's ``VmHWM`` reset just before the step; ``ru_maxrss`` cannot be used, it keeps
the peak of the parent that started the subprocess; CUDA: max allocated). ``--memory-only`` re-measures it for
an existing result file.

Noise. An adapter adds a few per cent to a whole-model step, the size of a busy machine's jitter, so two more
numbers come with every overhead: a *paired* estimate (the median over repetitions of t_method,i − t_base,i, the
two timed back to back in repetition i) with a bootstrap 90 % interval of its ratio to LoRA r=8's, and a
*per-layer* measurement, which isolates the adapter: the first adapted module (e.g. ``encoder.layer.0.attention.
self.query``: PEFT's wrapper with the frozen layer inside) alone, forward + backward of the case's batch·seq
tokens (``layer_train``) or a forward (``layer_infer``), against the frozen layer, ``layer_reps`` interleaved
repetitions. A target is judged on the model step; the interval and the layer numbers say how firm that is.

Compute-path check. For each structpeft method the layer section also times the paths ``compute="auto"`` did
*not* choose (:mod:`structpeft.operators.dispatch`: the structured product "fast", the dense ΔW folded into the
base weight "dense", or folded with the parameter gradients through the structure "hybrid"), each forced on a copy
of the same adapted layer, in the same interleaved repetitions (``layer_<case>_paths_ms``; the fastest of them is
``layer_<case>_other_ms``), so the report shows whether the measured rule picked the fastest path for the case's
token count (the rule times ``compute_tokens`` rows, set here to the train case's batch × seq).

Models (random weights: speed does not depend on the values, so no checkpoint is needed):

* ``--model minilm`` (default): a BERT encoder of MiniLM-L6's shape (6 layers, hidden 384, 12 heads, FFN 1536),
  query and value adapted; cases ``train`` (fwd + bwd + AdamW) and ``infer`` (forward in inference mode), batch
  32 × 128 tokens.
* ``--model smollm2``: a LLaMA decoder of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, FFN
  1536, vocabulary 49,152; ``LlamaModel``, without the LM head), q_proj and v_proj adapted; cases ``train``
  (batch 4 × 128), ``long`` (inference, 1 × 1024 tokens) and ``decode`` (inference, batch 1, one new token after
  a 128-token KV cache).

Methods and their sizes (MiniLM; SmolLM2 analogous, see ``method_configs``):

* ``base`` (frozen, no adapter), ``lora-r8`` (PEFT LoRA r=8: 6,144 parameters per 384 × 384 layer);
* ``surm-<structure>`` at ``budget="lora-8"`` (circulant b=24, Toeplitz b=96, Kronecker 78×78 ⊗ 5×5, LDR b=48),
  ``compute="auto"`` (the measured per-layer rule of :mod:`structpeft.operators.dispatch`);
* ``pmss`` at ``budget="lora-8"`` (k = 78); ``pmss-fold-inference`` the same with ``fold_inference=True`` (the
  same training step; in inference, layers that train on the gather path run one matmul with the cached W + ΔW);
* ``c3a-b24`` (PEFT C3A, block 24: 6,144 parameters, the same count as ``surm-circulant``; SmolLM2: ``c3a-b32``
  against ``surm-circulant-b32``, C3A's block must divide both 576 and 192);
* ``lokr-r16`` (PEFT LoKr r=16: w1 16×16, w2 24×24, 832 parameters) against ``surm-kronecker-16x16`` (the same
  factor shapes; SmolLM2: ``surm-kronecker-24x24``, L 24 × 24 on every layer, where LoKr factors the 192 × 576
  v_proj as 12 × 24 ⊗ 16 × 24: 57,600 trainable parameters against LoKr's 54,720, 5 % more for SURM);
* ``surm-circulant-keep``: ``surm-circulant`` with ``keep_folded_weight=True`` (a folded layer holds W + s·ΔW
  from the forward to the backward instead of building it again there; ``compute="auto"`` times the paths so);
* ``surm-circulant-merged``: a random (non-zero) circulant adapter after ``merge_and_unload``; its outputs are
  checked against the unmerged model (``merged_max_abs_diff``);
* ``surm-circulant-compiled``: ``torch.compile`` (inductor) of the ``surm-circulant`` model (compile time is
  spent in the warm-up, not timed; ``--no-compile`` leaves it out).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..operators.dispatch import DEFAULT_COMPUTE_TOKENS, PATHS, auto_paths

MINILM_SHAPE: dict[str, Any] = dict(
    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
)
SMOLLM2_SHAPE: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Case:
    """One timed workload: ``kind`` "train" (fwd + bwd + AdamW), "infer" (a forward) or "decode" (one token with a
    ``seq``-token KV cache), on ``batch`` × ``seq`` tokens."""

    kind: str
    batch: int
    seq: int


@dataclass(frozen=True)
class ModelSpec:
    description: str
    targets: list[str]
    cases: dict[str, Case]
    circulant_vs_c3a: tuple[str, str]
    kronecker_vs_lokr: tuple[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(
        description="BERT encoder of MiniLM-L6's shape (6 layers, hidden 384, FFN 1536, 12 heads), random weights",
        targets=["query", "value"],
        cases={"train": Case("train", 32, 128), "infer": Case("infer", 32, 128)},
        circulant_vs_c3a=("surm-circulant", "c3a-b24"),
        kronecker_vs_lokr=("surm-kronecker-16x16", "lokr-r16"),
    ),
    "smollm2": ModelSpec(
        description="LLaMA decoder of SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9 heads / 3 KV heads, "
        "vocabulary 49,152; LlamaModel without the LM head), random weights",
        targets=["q_proj", "v_proj"],
        cases={"train": Case("train", 4, 128), "long": Case("infer", 1, 1024), "decode": Case("decode", 1, 128)},
        circulant_vs_c3a=("surm-circulant-b32", "c3a-b32"),
        kronecker_vs_lokr=("surm-kronecker-24x24", "lokr-r16"),
    ),
}


def method_configs(model: str, targets: list[str]) -> dict[str, Callable[[], Any]]:
    """method name -> a factory of its PEFT config (None for the frozen base)."""
    import peft

    import structpeft

    def surm(structure: str, **kw: Any) -> Callable[[], Any]:
        return lambda: structpeft.SurmConfig(structure=structure, target_modules=targets, **kw)

    methods: dict[str, Callable[[], Any]] = {
        "base": lambda: None,
        "lora-r8": lambda: peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets),
        "surm-circulant": surm("circulant", budget="lora-8"),
        "surm-toeplitz": surm("toeplitz", budget="lora-8"),
        "surm-kronecker": surm("kronecker", budget="lora-8"),
        "surm-ldr": surm("ldr", budget="lora-8"),
        "pmss": lambda: structpeft.PmssConfig(target_modules=targets, budget="lora-8"),
    }
    if model == "smollm2":
        methods["c3a-b32"] = lambda: peft.C3AConfig(block_size=32, target_modules=targets)
        methods["surm-circulant-b32"] = surm("circulant", block_size=32)
        methods["lokr-r16"] = lambda: peft.LoKrConfig(r=16, target_modules=targets)
        methods["surm-kronecker-24x24"] = surm("kronecker", factor_shape=[24, 24])
    else:
        methods["c3a-b24"] = lambda: peft.C3AConfig(block_size=24, target_modules=targets)
        methods["lokr-r16"] = lambda: peft.LoKrConfig(r=16, target_modules=targets)
        methods["surm-kronecker-16x16"] = surm("kronecker", factor_shape=[16, 16])
    # PMSS trains on the gather path at these shapes; this one folds in inference (same training step)
    methods["pmss-fold-inference"] = lambda: structpeft.PmssConfig(
        target_modules=targets, budget="lora-8", fold_inference=True
    )
    # the same circulant adapter holding its folded weight W + s·ΔW from the forward to the backward
    methods["surm-circulant-keep"] = surm("circulant", budget="lora-8", keep_folded_weight=True)
    methods["surm-circulant-merged"] = surm("circulant", budget="lora-8", init_weights=False)
    methods["surm-circulant-compiled"] = methods["surm-circulant"]
    return methods


def build_base(model: str = "minilm", seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if model == "smollm2":
        from transformers import LlamaConfig, LlamaModel

        llama = LlamaModel(LlamaConfig(**SMOLLM2_SHAPE))
        return llama.to(dtype).eval()  # type: ignore[arg-type, unused-ignore]  # transformers: .to typed by @wraps
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**MINILM_SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).to(dtype).eval()  # type: ignore[arg-type, unused-ignore]  # transformers: .to typed by @wraps


def compute_tokens(cases: dict[str, Case]) -> int | None:
    """The rows compute="auto" times each layer on: the first train case's batch × seq (None: the default)."""
    return next((c.batch * c.seq for c in cases.values() if c.kind == "train"), None)


def build(
    method: str,
    base: nn.Module,
    model: str,
    targets: list[str],
    info: dict | None = None,
    tokens: int | None = None,
) -> nn.Module:
    """A model for ``method`` on a deep copy of ``base`` (its base weights frozen, adapter trainable), on ``base``'s
    device (``compute="auto"`` times the compute paths there: build on the device the model will run on).

    For ``*-merged`` the merged model's output is compared with the unmerged one's on a small batch and the
    largest absolute difference is written to ``info["merged_max_abs_diff"]``.
    """
    from peft import get_peft_model

    factory = method_configs(model, targets)[method]
    net = copy.deepcopy(base)
    cfg = factory()
    if cfg is None:
        net.requires_grad_(False)
        return net
    if tokens is not None and hasattr(cfg, "compute_tokens"):
        cfg.compute_tokens = tokens  # time compute="auto" on the train case's token count
    net = get_peft_model(net, cfg)
    chosen = {c for rec in getattr(cfg, "layer_options", {}).values() for c in rec.get("compute", {}).values()}
    if chosen and info is not None:
        info["compute"] = sorted(chosen)  # the per-layer fast / dense choices of compute="auto"
    if method.endswith("-merged"):
        probe = torch.randint(0, 1000, (2, 16)).to(next(base.parameters()).device)
        with torch.inference_mode():
            before = net(input_ids=probe).last_hidden_state
        net = net.merge_and_unload()
        net.requires_grad_(False)
        with torch.inference_mode():
            after = net(input_ids=probe).last_hidden_state
        if info is not None:
            info["merged_max_abs_diff"] = float((after - before).abs().max())
            info["merged_output_scale"] = float(before.abs().max())
    if method.endswith("-compiled"):
        net = cast(nn.Module, torch.compile(net))  # an OptimizedModule: torch.compile of a module is a module
    return net


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _input_embeddings(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)
    return inner.get_input_embeddings()  # type: ignore[operator]  # Module.__getattr__ is typed Tensor | Module


def make_step(model: nn.Module, case: Case, device: torch.device) -> Callable[[], None]:
    """A closure doing one train step (fwd + bwd + AdamW), one inference forward or one decode step."""
    ids = torch.randint(0, 1000, (case.batch, case.seq), device=device)
    if case.kind == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def loss() -> torch.Tensor:
            return model(input_ids=ids).last_hidden_state.float().pow(2).mean()

        def train() -> None:
            if opt is None:  # frozen model: the backward to the input embeddings costs the full backward
                emb = _input_embeddings(model).weight
                emb.requires_grad_(True)
                loss().backward()
                emb.grad = None
                emb.requires_grad_(False)
                return
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return train
    if case.kind == "infer":

        def infer() -> None:
            with torch.inference_mode():
                model(input_ids=ids)

        return infer
    with torch.inference_mode():  # decode: one new token after a seq-token KV cache (cropped back every step)
        cache = model(input_ids=ids, use_cache=True).past_key_values
    token = torch.randint(0, 1000, (case.batch, 1), device=device)

    def decode() -> None:
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the token just added (a negative count means the same in transformers 4.x and 5.x)

    return decode


def adapted_layer(model: nn.Module, target: str) -> nn.Module:
    """The first module whose name ends with ``target`` (PEFT's wrapper of it, or the plain layer of a base /
    merged model); :class:`ValueError` naming the target if there is none."""
    inner = getattr(model, "_orig_mod", model)
    for name, module in inner.named_modules():
        if name == target or name.endswith("." + target):
            return module
    raise ValueError(f"no module named like {target!r} in the model")


def other_path_layers(layer: nn.Module) -> tuple[str, list[tuple[nn.Module, str]]] | None:
    """The compute path(s) an adapted ``layer``'s operators were given, and one copy of the layer per path they
    were *not* given among those ``compute="auto"`` offers them (:func:`~structpeft.operators.dispatch.auto_paths`),
    its operators switched to that path; None for a layer without structpeft operators."""
    ops = [name for name, mod in layer.named_modules() if getattr(mod, "compute_mode", None) in PATHS]
    if not ops:
        return None
    modules = dict(layer.named_modules())
    chosen = sorted({modules[name].compute_mode for name in ops})
    operators = getattr(layer, "operators", {})
    folds = bool(operators) and not any(
        layer.is_adapter_placement(a)  # type: ignore[operator]  # Module.__getattr__ is typed Tensor | Module
        for a in operators
    )
    offered = [set(auto_paths(type(modules[name]), folds)) for name in ops]
    others = []
    for mode in (p for p in PATHS if all(p in paths for paths in offered)):
        if chosen == [mode]:
            continue
        other = copy.deepcopy(layer)
        copies = dict(other.named_modules())
        for name in ops:
            copies[name].compute_mode = mode
        others.append((other, mode))
    return "+".join(chosen), others


def make_layer_step(layer: nn.Module, case: Case, device: torch.device) -> Callable[[], None]:
    """One adapted layer alone on the case's batch·seq tokens: forward + backward (train) or a forward (infer)."""
    base = getattr(layer, "base_layer", layer)
    while hasattr(base, "base_layer"):
        base = base.base_layer
    n_in = base.in_features if isinstance(base, nn.Linear) else cast(torch.Tensor, base.weight).shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch * case.seq, n_in, generator=gen).to(device)
    params = [p for p in layer.parameters() if p.requires_grad]
    if case.kind == "train":
        x.requires_grad_(True)
        cotangent = None

        def train() -> None:
            nonlocal cotangent
            y = layer(x)
            if cotangent is None:
                cotangent = torch.randn(y.shape, generator=gen).to(y)
            y.backward(cotangent)
            x.grad = None
            for p in params:
                p.grad = None

        return train

    def infer() -> None:
        with torch.inference_mode():
            layer(x)

    return infer


def time_interleaved(
    steps: Mapping[str, Callable[[], object]], reps: int, warmup: int, sync: Callable[[], None]
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


def peak_memory_mb(method: str, case_name: str, args: argparse.Namespace) -> float:
    """Peak memory of one step of ``case_name`` for ``method`` in a fresh subprocess."""
    cmd = [
        sys.executable, "-m", "structpeft.bench.speed", "--_memory-probe", method, "--model", args.model,
        "--cases", case_name, "--device", args.device, "--threads", str(args.threads), "--targets", *args.targets,
    ]  # fmt: skip
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def measure_memory(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Peak memory of every method's train step: the median of ``--memory-reps`` probes, each a fresh process
    (``<case>_peak_mb``, the probes in ``<case>_peak_mb_reps``; NaN where it cannot be measured). The probes run
    round-robin over the methods, so a drift of the machine's memory state hits every method alike."""
    train = [n for n, c in results["setting"]["cases"].items() if c["kind"] == "train"]
    reps = max(1, getattr(args, "memory_reps", 1))
    todo = [(m, n) for _ in range(reps) for m in results["methods"] for n in train]
    probes: dict[tuple[str, str], list[float]] = {}
    for m, n in tqdm(todo, desc="peak memory", unit="probe", file=sys.stdout, disable=len(todo) < 2):
        probes.setdefault((m, n), []).append(peak_memory_mb(m, n, args))
    for (m, n), values in probes.items():
        results["methods"][m][f"{n}_peak_mb"] = statistics.median(values)
        results["methods"][m][f"{n}_peak_mb_reps"] = [round(v, 1) for v in values]
    results["setting"]["memory"] = (
        f"process peak during one train step, model included (CUDA: max allocated; CPU: peak RSS, VmHWM); "
        f"median of {reps} probe(s) per method"
    )


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ≥ 4.0: ``5`` to ``/proc/self/clear_refs``); False where the
    kernel has no such file (then no CPU peak can be measured: ``ru_maxrss`` holds the parent's peak too)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """The peak resident set since the last :func:`_reset_peak_rss` (``VmHWM`` of ``/proc/self/status``), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no VmHWM line")


def _memory_probe(method: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = resolve_cases(args)
    case = next(iter(cases.values()))
    tokens = compute_tokens(cases)
    model = build(method, build_base(args.model).to(device), args.model, args.targets, tokens=tokens)
    step = make_step(model, case, device)
    if method.endswith("-compiled"):
        step()  # compile outside the measurement
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        print(torch.cuda.max_memory_allocated() / 2**20)
    elif _reset_peak_rss():
        step()
        print(_peak_rss_mb())
    else:
        print("nan")  # no way to read this process's own peak here


def resolve_cases(args: argparse.Namespace) -> dict[str, Case]:
    spec = MODELS[args.model]
    names = args.cases or list(spec.cases)
    cases = {}
    for name in names:
        c = spec.cases[name]
        if c.kind != "decode":  # --batch / --seq override the batched cases
            c = Case(c.kind, args.batch or c.batch, args.seq or c.seq)
        cases[name] = c
    return cases


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (other jobs on the machine make every timing noisier); None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = MODELS[args.model]
    cases = resolve_cases(args)
    # on the device before the adapters are added: compute="auto" times the paths where the layers are
    base = build_base(args.model).to(device)
    methods = args.methods or default_methods(args)
    info: dict[str, dict] = {m: {} for m in methods}
    tokens = compute_tokens(cases)
    models = {m: build(m, base, args.model, args.targets, info[m], tokens) for m in methods}
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    results: dict[str, Any] = {
        "setting": {
            "model": args.model, "model_description": spec.description, "targets": args.targets,
            "cases": {name: vars(c) for name, c in cases.items()}, "threads": args.threads, "device": str(device),
            "hardware": hardware, "cpu_count": os.cpu_count(), "reps": args.reps, "warmup": args.warmup,
            "torch": torch.__version__, "load_average_start": _load_average(),
            "compute_tokens": tokens or DEFAULT_COMPUTE_TOKENS,
            "command": "structpeft bench speed " + " ".join(getattr(args, "argv", []) or []),
        },
        "methods": {m: {"trainable": trainable(models[m]), **info[m]} for m in methods},
    }  # fmt: skip
    for name, case in cases.items():
        steps = {m: make_step(model, case, device) for m, model in models.items()}
        times = time_interleaved(steps, args.reps, args.warmup, sync)
        for m in methods:
            results["methods"][m][f"{name}_ms"] = 1000 * statistics.median(times[m])
            results["methods"][m][f"{name}_reps_ms"] = [round(1000 * t, 3) for t in times[m]]
    if args.layer_reps:
        # the first adapted layer alone (compiled models are left out: their layer is the eager one)
        layer_methods = [m for m in methods if not m.endswith("-compiled")]
        target = args.targets[0]
        for name, case in cases.items():
            if case.kind == "decode":
                continue
            layers = {m: adapted_layer(models[m], target) for m in layer_methods}
            steps = {m: make_layer_step(layers[m], case, device) for m in layer_methods}
            paths: dict[str, tuple[str, list[str]]] = {}
            for m in layer_methods:
                alt = other_path_layers(layers[m])
                if alt is not None:  # structpeft layers: the paths compute="auto" did not choose, on copies
                    paths[m] = (alt[0], [mode for _, mode in alt[1]])
                    for other_layer, mode in alt[1]:
                        steps[f"{m} ({mode})"] = make_layer_step(other_layer, case, device)
            times = time_interleaved(steps, args.layer_reps, max(args.warmup, 1), sync)
            for m in layer_methods:
                entry = results["methods"][m]
                entry[f"layer_{name}_ms"] = 1000 * statistics.median(times[m])
                entry[f"layer_{name}_reps_ms"] = [round(1000 * t, 4) for t in times[m]]
                if m in paths and paths[m][1]:
                    chosen, modes = paths[m]
                    medians = {mode: 1000 * statistics.median(times[f"{m} ({mode})"]) for mode in modes}
                    best = min(modes, key=medians.__getitem__)  # the fastest path not chosen
                    entry[f"layer_{name}_compute"] = chosen
                    entry[f"layer_{name}_other_compute"] = best
                    entry[f"layer_{name}_other_ms"] = medians[best]
                    entry[f"layer_{name}_other_reps_ms"] = [round(1000 * t, 4) for t in times[f"{m} ({best})"]]
                    entry[f"layer_{name}_paths_ms"] = {chosen: entry[f"layer_{name}_ms"], **medians}
        results["setting"]["layer"] = {"target": target, "reps": args.layer_reps}
    if args.memory:
        measure_memory(results, args)
    results["targets"] = check_targets(results, spec)
    return results


def default_methods(args: argparse.Namespace) -> list[str]:
    methods = list(method_configs(args.model, args.targets))
    if not args.compile:
        methods.remove("surm-circulant-compiled")
    return methods


# ------------------------------------------------------------------------------------------------- report
def overhead(results: dict[str, Any], method: str, case: str, variant: str = "") -> float | None:
    """The relative overhead (t_method − t_base) / t_base for ``case``: paired, the median over repetitions of
    t_method,i − t_base,i (timed back to back) over the base's median, where per-repetition times were kept;
    else from the two medians; None if a time is missing. ``variant="_other"``: the method's other compute path
    (``{case}_other_ms``, timed in the same repetitions)."""
    methods = results["methods"]
    m, b = methods.get(method, {}), methods.get("base", {})
    t, base = m.get(f"{case}{variant}_ms"), b.get(f"{case}_ms")
    if t is None or not base:
        return None
    reps_m, reps_b = m.get(f"{case}{variant}_reps_ms"), b.get(f"{case}_reps_ms")
    if reps_m and reps_b and len(reps_m) == len(reps_b):
        return statistics.median(x - y for x, y in zip(reps_m, reps_b, strict=True)) / base
    return (t - base) / base


def overhead_ratio_interval(
    results: dict[str, Any], method: str, reference: str, case: str, level: float = 0.9, draws: int = 2000
) -> tuple[float, float] | None:
    """Bootstrap interval (``level``) of overhead(method) / overhead(reference): repetitions are resampled
    together (method, reference and base of one repetition stay paired); None without per-repetition times.

    A draw where the reference's overhead is <= 0 has no finite ratio: it counts as +inf (or -inf where the
    method's overhead is negative), so an end of the interval is infinite where such draws pass its percentile
    (they used to be dropped, which narrowed the interval to the draws where the reference was visible)."""
    import random

    methods = results["methods"]
    reps = [methods.get(n, {}).get(f"{case}_reps_ms") for n in (method, reference, "base")]
    if not all(reps) or len({len(r) for r in reps}) != 1 or len(reps[0]) < 3:
        return None
    rm, rr, rb = reps
    n = len(rb)
    rng = random.Random(0)
    ratios = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        a = statistics.median(rm[i] - rb[i] for i in idx)
        b = statistics.median(rr[i] - rb[i] for i in idx)
        ratios.append(a / b if b > 0 else math.copysign(math.inf, a))
    if sum(math.isinf(r) for r in ratios) > draws // 2:
        return None  # the reference's overhead is not distinguishable from zero
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * len(ratios))]
    hi = ratios[min(len(ratios) - 1, int((1 + level) / 2 * len(ratios)))]
    return lo, hi


def _ratio_text(results: dict[str, Any], method: str, reference: str, case: str, ov: float, ref: float) -> str:
    """``ov`` / ``ref``: the overheads of ``method`` and ``reference`` for ``case`` (see :func:`overhead`)."""
    text = f"{ov / ref:.2f}x {reference}'s overhead ({100 * ov:+.1f}% vs {100 * ref:+.1f}%"
    ci = overhead_ratio_interval(results, method, reference, case)
    return text + (f"; 90% interval {_end(ci[0])} to {_end(ci[1])})" if ci else ")")


def _end(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else ("+inf" if x > 0 else "-inf")


def check_targets(results: dict[str, Any], spec: ModelSpec) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured number and met / missed (only those the run measured):
    judged on the model step; the same comparisons for the adapted layer alone follow, marked "(one layer)"."""
    methods = results["methods"]
    cases = results["setting"]["cases"]
    train = next((n for n, c in cases.items() if c["kind"] == "train"), None)
    infer = next((n for n, c in cases.items() if c["kind"] != "train"), None)
    out: list[dict[str, Any]] = []
    ours = [m for m in methods if (m.startswith("surm-") or m == "pmss") and "merged" not in m]
    levels = [(train, "")] if train else []
    if train and f"layer_{train}_ms" in methods.get("base", {}):
        levels.append((f"layer_{train}", " (one layer)"))
    for case, label in levels:
        lora_ov = overhead(results, "lora-r8", case)
        if not lora_ov or lora_ov <= 0:
            continue
        for m in ours:
            ov = overhead(results, m, case)
            if ov is not None:  # the method's {case}_ms was measured (the base's is: lora_ov is not None)
                out.append(
                    {
                        "target": f"{m}: {train} overhead <= LoRA r8's{label}",
                        "value": _ratio_text(results, m, "lora-r8", case, ov, lora_ov),
                        "met": ov <= lora_ov,
                    }
                )
    for case, label in levels:
        for ours_m, theirs in (spec.circulant_vs_c3a, spec.kronecker_vs_lokr):
            if not (f"{case}_ms" in methods.get(ours_m, {}) and f"{case}_ms" in methods.get(theirs, {})):
                continue
            a, b = overhead(results, ours_m, case), overhead(results, theirs, case)
            if a is None or b is None:
                continue  # no base time: the overheads were not measured
            step = methods[theirs][f"{case}_ms"] / methods[ours_m][f"{case}_ms"]
            ratio = b / a if a > 0 else float("inf")
            out.append(
                {
                    "target": f"{ours_m} >= 2x faster than {theirs} (overhead over base, {train}){label}",
                    "value": f"{ratio:.2f}x less overhead ({100 * a:+.1f}% vs {100 * b:+.1f}%); whole step {step:.2f}x",
                    "met": ratio >= 2.0,
                }
            )
    if train:
        case = f"layer_{train}"
        for m in ours:
            chosen, other = overhead(results, m, case), overhead(results, m, case, "_other")
            if chosen is None or other is None:
                continue
            e = methods[m]
            out.append(
                {
                    "target": f"{m}: compute='auto' chose the faster path ({train}, one layer; 5% tolerance)",
                    "value": f"{e[f'{case}_compute']} {100 * chosen:+.1f}% over the frozen layer, "
                    f"{e[f'{case}_other_compute']} {100 * other:+.1f}%",
                    "met": chosen <= other + 0.05 * abs(other),
                }
            )
    key = f"{train}_peak_mb" if train else None
    if key and key in methods.get("lora-r8", {}) and math.isfinite(methods["lora-r8"][key]):
        lora_mb = methods["lora-r8"][key]
        for m in ours:
            if key in methods[m] and math.isfinite(methods[m][key]):
                mb = methods[m][key]
                out.append(
                    {
                        "target": f"{m}: peak memory <= LoRA r8's",
                        "value": f"{mb:.0f} MB vs {lora_mb:.0f} MB",
                        "met": mb <= lora_mb * 1.02,  # 2 %: RSS granularity and allocator noise
                    }
                )
    merged = "surm-circulant-merged"
    if merged in methods and "base" in methods:
        for case in [c for c in (infer, train) if c]:
            ov = overhead(results, merged, case)
            if ov is None:
                continue
            r = 1 + ov
            out.append({"target": f"merged {case} ratio 1.00 (+-0.03)", "value": f"{r:.2f}", "met": abs(r - 1) <= 0.03})
        if "merged_max_abs_diff" in methods[merged]:
            d, s = methods[merged]["merged_max_abs_diff"], methods[merged]["merged_output_scale"]
            out.append(
                {
                    "target": "merged outputs equal the unmerged model's (float32 rounding)",
                    "value": f"max |diff| {d:.1e} (outputs up to {s:.1f})",
                    "met": d <= 1e-4 * max(s, 1.0),
                }
            )
    return out


def table(results: dict[str, Any]) -> str:
    """The model-step table (every case: ms, ratios to the base and to LoRA r8, overhead / LoRA's, peak memory),
    then the one-layer table where it was measured."""
    methods = results["methods"]
    cases = list(results["setting"]["cases"])

    def block(keys: list[str], heads: list[str], peaks: list[str]) -> list[str]:
        head = ["method", "trainable"]
        for h in heads:
            head += [f"{h} ms", f"{h} / base", f"{h} / LoRA r8", f"{h} overhead / LoRA's"]
        head += [f"{k[: -len('_peak_mb')]} peak MB" for k in peaks]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, e in methods.items():
            if not any(f"{k}_ms" in e for k in keys):
                continue
            row = [name, f"{e['trainable']:,}"]
            for k in keys:
                t = e.get(f"{k}_ms")
                base = methods.get("base", {}).get(f"{k}_ms")
                lora = methods.get("lora-r8", {}).get(f"{k}_ms")
                if t is None:
                    row += ["-"] * 4
                    continue
                ov, lora_ov = overhead(results, name, k), overhead(results, "lora-r8", k)
                rel = f"{ov / lora_ov:.2f}" if ov is not None and lora_ov and name != "base" else "-"
                digits = 2 if k.startswith("layer_") else 1
                row += [f"{t:.{digits}f}", f"{t / base:.3f}" if base else "-", f"{t / lora:.3f}" if lora else "-", rel]
            row += [f"{e[k]:.0f}" if k in e and math.isfinite(e[k]) else "-" for k in peaks]
            rows.append("| " + " | ".join(row) + " |")
        return rows

    peaks = [k for k in next(iter(methods.values())) if k.endswith("_peak_mb")]
    rows = block(cases, cases, peaks)
    layer_cases = [c for c in cases if f"layer_{c}_ms" in methods.get("base", {})]
    if layer_cases:
        layer = results["setting"].get("layer", {})
        rows += [
            "",
            f"One adapted layer alone (`{layer.get('target', '?')}` of the first block, its frozen layer inside; "
            f"the case's batch x seq tokens; median of {layer.get('reps', '?')} interleaved repetitions):",
            "",
        ]
        rows += block([f"layer_{c}" for c in layer_cases], [f"layer {c}" for c in layer_cases], [])
        rows += _paths_table(results, layer_cases)
    return "\n".join(rows)


def _paths_table(results: dict[str, Any], cases: list[str]) -> list[str]:
    """The compute-path check: per structpeft method and layer case, the chosen and the other path's overhead
    over the frozen layer (empty where it was not measured)."""
    methods = results["methods"]
    measured = [m for m, e in methods.items() if any(f"layer_{c}_other_ms" in e for c in cases)]
    if not measured:
        return []
    head = ["method"]
    for c in cases:
        head += [f"layer {c}: chosen", "overhead", "other path", "overhead"]
    tokens = results["setting"].get("compute_tokens", DEFAULT_COMPUTE_TOKENS)
    rows = [
        "",
        f'Compute paths (`compute="auto"` times each path on {tokens:,} random rows and keeps the fastest; the others '
        "are forced here on copies of the same layer, in the same interleaved repetitions, and the fastest of them "
        "is shown; overhead over the frozen layer):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m in measured:
        row = [m]
        for c in cases:
            e, case = methods[m], f"layer_{c}"
            chosen, other = overhead(results, m, case), overhead(results, m, case, "_other")
            if chosen is None or other is None:
                row += ["-"] * 4
                continue
            row += [e[f"{case}_compute"], f"{100 * chosen:+.1f}%", e[f"{case}_other_compute"], f"{100 * other:+.1f}%"]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def targets_text(results: dict[str, Any]) -> str:
    return "\n".join(
        f"* {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['value']}" for t in results.get("targets", [])
    )


def plot(results: dict[str, Any], path: str) -> bool:
    """Bar charts (PNG) of every case's time / base per method, and, where measured, of the one-layer times /
    the frozen layer's; dotted lines: LoRA r8. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = results["methods"]
    cases = list(results["setting"]["cases"])
    panels = [("model step", cases, "time / frozen base model")]
    layer_cases = [f"layer_{c}" for c in cases if f"layer_{c}_ms" in methods.get("base", {})]
    if layer_cases:
        panels.append(("one adapted layer", layer_cases, "time / frozen layer"))
    names = list(methods)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.7 * len(names)), 4.2 * len(panels)), squeeze=False)
    for ax, (title, keys, ylabel) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / len(keys)
        lo = 1.0
        for i, key in enumerate(keys):
            base = methods["base"][f"{key}_ms"] if "base" in methods else 1.0
            vals = [methods[m][f"{key}_ms"] / base if f"{key}_ms" in methods[m] else 0.0 for m in names]
            lo = min([lo, *(v for v in vals if v > 0)])
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, vals, width, label=key.removeprefix("layer_"))
            if "lora-r8" in methods:
                ax.axhline(methods["lora-r8"][f"{key}_ms"] / base, color=f"C{i}", ls=":", lw=1)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        s = results["setting"]
        ax.set_title(f"{s['model']}, {title}: {s['hardware']}, {s['threads']} threads (dotted: LoRA r8)", fontsize=9)
        ax.set_ylim(max(0.0, lo - 0.1), None)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structpeft bench speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=sorted(MODELS))
    p.add_argument("--cases", nargs="+", default=None, help="subset of the model's cases (default: all)")
    p.add_argument("--batch", type=int, default=None, help="batch of the batched cases (default: the model's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence of the batched cases")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per method (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--layer-reps",
        type=int,
        default=30,
        help="repetitions of the one-adapted-layer timing (0: leave it out; default 30, quick: 2)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (stated in the results)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    p.add_argument("--targets", nargs="+", default=None, help="target modules (default: the model's)")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peak memory of the train step, one subprocess per method (default: on, off with --quick)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include surm-circulant-compiled (torch.compile; default: on, off with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: batch 2 x 16 tokens, 2 reps")
    p.add_argument("--out", default=None, help="write speed.json, speed.md and speed.png into this folder")
    p.add_argument(
        "--memory-reps",
        type=int,
        default=1,
        help="fresh-process probes per method for the peak memory (median reported; default 1)",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="re-measure only the peak memory of the result file in --out (its methods, cases and targets) and "
        "rewrite its reports; the timings stay as they were",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the reports (targets, table, plot) of the result file in --out without measuring anything",
    )
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    spec = MODELS[args.model]
    args.targets = args.targets or spec.targets
    if args.memory_probe:
        _memory_probe(args.memory_probe, args)
        return 0
    if args.memory_only or args.report_only:
        return _rewrite(args)
    if args.quick:
        args.batch, args.seq, args.reps, args.warmup = 2, 16, min(args.reps, 2), 1
        args.layer_reps = min(args.layer_reps, 2)
    args.memory = (not args.quick) if args.memory is None else args.memory
    args.compile = (not args.quick) if args.compile is None else args.compile
    results = run(args)
    results["setting"]["load_average_end"] = _load_average()
    _write(results, args)
    return 0


def _stem(model: str) -> str:
    return "speed" if model == "minilm" else f"speed-{model}"


def _write(results: dict[str, Any], args: argparse.Namespace) -> None:
    text = table(results) + "\n\n" + targets_text(results)
    print(f"setting: {json.dumps(results['setting'])}")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = _stem(args.model)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(text + "\n")
        plot(results, os.path.join(args.out, f"{stem}.png"))


def _rewrite(args: argparse.Namespace) -> int:
    """``--report-only``: an existing result file's targets and reports written again by this version's code.
    ``--memory-only``: first its methods' peak memory, measured again with its cases, targets, threads and device;
    the timings and the rest of the setting are kept, and the setting records when and with which command the
    memory was measured."""
    flag = "--memory-only" if args.memory_only else "--report-only"
    path = os.path.join(args.out or "", f"{_stem(args.model)}.json")
    if not args.out or not os.path.isfile(path):
        print(f"structpeft bench speed: error: {flag} needs --out with an earlier result, {path} is missing")
        return 2
    with open(path) as f:
        results = json.load(f)
    if args.memory_only:
        _remeasure_memory(results, args)
    results["targets"] = check_targets(results, MODELS[args.model])
    _write(results, args)
    return 0


def _remeasure_memory(results: dict[str, Any], args: argparse.Namespace) -> None:
    st = results["setting"]
    train = [c for c in st["cases"].values() if c["kind"] == "train"]
    args.targets, args.threads, args.device = st["targets"], st["threads"], st["device"]
    if train:
        args.batch, args.seq = train[0]["batch"], train[0]["seq"]
    measure_memory(results, args)
    st["memory_measured"] = {
        "command": "structpeft bench speed " + " ".join(args.argv),
        "hardware": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
