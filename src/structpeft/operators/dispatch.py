"""Per-layer choice between the structured product and a materialised dense ΔW, by measurement.

The two ways to add s·x ΔWᵀ to a frozen layer's output y = x Wᵀ + b:

* ``"fast"``: the structured product (FFTs, reshapes) next to the base matmul, O(tokens · (p + q)·b log b) for
  block grids, never forming ΔW;
* ``"dense"``: ΔW materialised (O(out·in), cheap for every structure) and folded into the base weight,
  y = x (W + s·ΔW)ᵀ + b (see :mod:`structpeft.operators.fused`): the forward and the input gradient cost what the
  frozen layer costs, the adapter adds one matmul (the weight gradient gᵀx) per training step and nothing in
  cached inference. Where folding does not apply (dropout on the adapter input, half-precision base weights,
  Conv2d) "dense" means x·ΔWᵀ with the materialised ΔW.

``choose_compute`` measures the *marginal* cost of each on the layer's shape: forward + backward of a random
(tokens × in) batch through base + fast product, and through the folded weight, each minus the frozen base layer
alone, on the layer's device (the minimum of ``reps`` after one warm-up, the three interleaved: the minimum is
the estimate least disturbed by other jobs on a shared machine), and returns the
cheaper. On this project's 2-core CPU, at LoRA r=8's budget on 384 × 384 layers, the fold won for every
structure (one 384 × 4096 × 384 weight-gradient matmul against many small batched FFTs). The answer is cached
per process by (structure, shape, options, device, tokens) and recorded in the adapter's config
(``layer_options[module]["compute"]``), so a loaded adapter uses the same path. ``SurmConfig(compute="fast" |
"dense")`` forces either. PMSS's skeleton operator is timed the same way (``choose_compute_for``: its fast path
reads W[J, :]x from the base output; the timing depends on the shape and k_in, k_out, not on the weights).
The rows timed are the config's ``compute_tokens`` (default 2,048; set it to the training batch's batch × sequence
length: ``structpeft finetune`` and ``structpeft bench speed`` do). ``structpeft bench speed`` checks the rule on
its cases by timing the path not chosen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredOperator
from .fused import folded_linear

COMPUTE_MODES = ("auto", "fast", "dense")
DEFAULT_COMPUTE_TOKENS = 2048  # rows timed when the config does not say (compute_tokens)
_CACHE: dict[tuple, str] = {}


def _min_times(fns: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None]) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps + 1):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def choose_compute(
    cls: type[StructuredOperator],
    out_features: int,
    in_features: int,
    options: dict,
    device: torch.device | str = "cpu",
    tokens: int = DEFAULT_COMPUTE_TOKENS,
    reps: int = 5,
) -> str:
    """'fast' or 'dense', whichever adds less to a frozen layer's forward + backward of ``tokens`` rows (cached)."""
    if cls.structure == "dense":
        return "fast"

    def make() -> nn.Module:
        op = cls(out_features, in_features, **options)
        op.reset_parameters(False)
        return op

    key = (cls.structure, out_features, in_features, json.dumps(options, sort_keys=True))
    return choose_compute_for(key, make, out_features, in_features, device, tokens, reps)


def choose_compute_for(
    key: tuple,
    make_op: Callable[[], nn.Module],
    out_features: int,
    in_features: int,
    device: torch.device | str = "cpu",
    tokens: int = DEFAULT_COMPUTE_TOKENS,
    reps: int = 5,
) -> str:
    """:func:`choose_compute` for any operator with ``delta_weight``: ``make_op()`` builds one (on the CPU, with
    non-zero parameters); the answer is cached under ``key``, the device and ``tokens``."""
    device = torch.device(device)
    key = (*key, str(device), tokens)
    if key not in _CACHE:
        # the timing draws random tensors: keep the caller's RNG streams untouched, so that adapter initialisation
        # after get_peft_model is the same whether or not this shape was timed before in the process
        cuda_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            _CACHE[key] = _time_paths(make_op().to(device), out_features, in_features, device, tokens, reps)
    return _CACHE[key]


def _time_paths(
    op: nn.Module,
    out_features: int,
    in_features: int,
    device: torch.device,
    tokens: int,
    reps: int,
) -> str:
    """Time a frozen layer alone, with the structured product added, and with ΔW folded in: the cheaper path."""
    w = torch.randn(out_features, in_features, device=device) * in_features**-0.5
    x = torch.randn(tokens, in_features, device=device, requires_grad=True)
    op.compute_mode = "fast"
    from_base = getattr(op, "forward_from_base", None)

    def base() -> None:
        F.linear(x, w).sum().backward()

    add_from_base = getattr(op, "add_from_base", None)

    def fast() -> None:
        y = F.linear(x, w)
        if add_from_base is not None:
            y = add_from_base(y, 1.0)
        else:
            y = y + (from_base(x, y) if from_base is not None else op(x))
        y.sum().backward()

    def dense() -> None:
        folded_linear(x, w, None, [(op, 1.0)]).sum().backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = _min_times({"base": base, "fast": fast, "dense": dense}, reps, sync)
    return "dense" if t["dense"] - t["base"] < t["fast"] - t["base"] else "fast"
