"""Per-layer choice among the structured product, a folded dense ΔW and the hybrid of both, by measurement.

The three ways to add s·x ΔWᵀ to a frozen layer's output y = x Wᵀ + b (N rows x):

* ``"fast"``: the structured product (FFTs, reshapes) next to the base matmul, O(N · (p + q)·b log b) for
  block grids, never forming ΔW; autograd differentiates it (input and parameter gradients);
* ``"dense"``: ΔW materialised (O(out·in), cheap for every structure) and folded into the base weight,
  y = x (W + s·ΔW)ᵀ + b (see :mod:`structpeft.operators.fused`): the forward and the input gradient cost what the
  frozen layer costs, the adapter adds one matmul (the weight gradient gᵀx, N·out·in) per training step, mapped to
  the parameters through ``to_dense``'s backward, and nothing in cached inference. Where folding does not apply
  (dropout on the adapter input, half-precision base weights, Conv2d) "dense" means x·ΔWᵀ with the materialised ΔW;
* ``"hybrid"``: the same folded forward and input gradient, and the parameter gradients straight from (x, g) by
  the structure (``op.param_grads``: for circulant the block DFTs of x and g and a per-frequency sum over the
  rows, O(N·(p + q)·b·min(b, log b) + N·q·p·b); Kronecker four thin matmuls; PMSS (g C)ᵀ(x Rᵀ)), so neither gᵀx
  nor the fast product's forward is computed. ΔW-placed layers only; where folding does not apply it runs as "fast".

``choose_compute`` measures the *marginal* cost of each on the layer's shape: forward + backward of a random
(tokens × in) batch through each path, minus the frozen base layer alone, on the layer's device (the minimum of
``reps`` after one warm-up, all interleaved: the minimum is the estimate least disturbed by other jobs on a shared
machine), and returns the cheapest. The answer is cached per process by (structure, shape, options, device,
tokens, paths) and recorded in the adapter's config (``layer_options[module]["compute"]``), so a loaded adapter
uses the same path. ``SurmConfig(compute="fast" | "dense" | "hybrid")`` forces one. PMSS's skeleton operator is
timed the same way (``choose_compute_for``: its fast path reads W[J, :]x from the base output; the timing depends
on the shape and k_in, k_out, not on the weights). The rows timed are the config's ``compute_tokens`` (default
2,048; set it to the training batch's batch × sequence length: ``structpeft finetune`` and ``structpeft bench
speed`` do). ``structpeft bench speed`` checks the rule on its cases by timing the paths not chosen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import DenseDeltaMixin, StructuredOperator
from .fused import hybrid_linear

PATHS = ("fast", "dense", "hybrid")  # what "auto" chooses among
COMPUTE_MODES = ("auto", *PATHS)
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


def auto_paths(cls: type, folds: bool = True) -> tuple[str, ...]:
    """The paths ``compute="auto"`` times for operators of class ``cls``: "hybrid" only where the layer can fold
    (``folds``: a ΔW-placed operator) and ``cls`` has its own ``param_grads`` formula (the generic one runs the fast
    product's forward and parameter backward, which costs about what "fast" costs, on top of the fold)."""
    own = getattr(cls, "param_grads", None) is not DenseDeltaMixin.param_grads
    return PATHS if folds and own else tuple(p for p in PATHS if p != "hybrid")


def choose_compute(
    cls: type[StructuredOperator],
    out_features: int,
    in_features: int,
    options: dict,
    device: torch.device | str = "cpu",
    tokens: int = DEFAULT_COMPUTE_TOKENS,
    reps: int = 5,
    paths: tuple[str, ...] = PATHS,
    keep: bool = False,
) -> str:
    """The one of ``paths`` that adds least to a frozen layer's forward + backward of ``tokens`` rows (cached);
    ``keep``: the folded paths timed as they train with ``keep_folded_weight=True``."""
    if cls.structure == "dense":
        return "fast"

    def make() -> nn.Module:
        op = cls(out_features, in_features, **options)
        op.reset_parameters(False)
        return op

    key = (cls.structure, out_features, in_features, json.dumps(options, sort_keys=True))
    return choose_compute_for(key, make, out_features, in_features, device, tokens, reps, paths, keep)


def choose_compute_for(
    key: tuple,
    make_op: Callable[[], nn.Module],
    out_features: int,
    in_features: int,
    device: torch.device | str = "cpu",
    tokens: int = DEFAULT_COMPUTE_TOKENS,
    reps: int = 5,
    paths: tuple[str, ...] = PATHS,
    keep: bool = False,
) -> str:
    """:func:`choose_compute` for any operator with ``delta_weight`` and ``param_grads``: ``make_op()`` builds one
    (on the CPU, with non-zero parameters); the answer is cached under ``key``, the device, ``tokens``, ``paths``
    and ``keep``."""
    device = torch.device(device)
    key = (*key, str(device), tokens, tuple(paths), bool(keep))
    if key not in _CACHE:
        # the timing draws random tensors: keep the caller's RNG streams untouched, so that adapter initialisation
        # after get_peft_model is the same whether or not this shape was timed before in the process
        cuda_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            op = make_op().to(device)
            _CACHE[key] = _time_paths(op, out_features, in_features, device, tokens, reps, paths, keep)
    return _CACHE[key]


def _time_paths(
    op: nn.Module,
    out_features: int,
    in_features: int,
    device: torch.device,
    tokens: int,
    reps: int,
    paths: tuple[str, ...] = PATHS,
    keep: bool = False,
) -> str:
    """Time a frozen layer alone and with each of ``paths`` (the structured product added, ΔW folded in, ΔW
    folded in with the parameter gradients through the structure; the folds held for the backward if ``keep``):
    the cheapest path."""
    w = torch.randn(out_features, in_features, device=device) * in_features**-0.5
    x = torch.randn(tokens, in_features, device=device, requires_grad=True)
    # a dense output gradient, as training's: ``y.sum().backward()`` would send an expanded (stride-0) tensor of
    # ones, on which reshapes and matmuls in the backward cost other than on a real gradient
    g = torch.randn(tokens, out_features, device=device)
    op.compute_mode = "fast"  # type: ignore[assignment]  # a plain attribute, typed by nn.Module.__getattr__
    from_base = getattr(op, "forward_from_base", None)

    def base() -> None:
        F.linear(x, w).backward(g)

    add_from_base = getattr(op, "add_from_base", None)

    def fast() -> None:
        y = F.linear(x, w)
        if add_from_base is not None:
            y = add_from_base(y, 0.5)
        else:  # as the PEFT layer does it: the structured output times the scale, added to the base output
            y = y + (from_base(x, y) if from_base is not None else op(x)) * 0.5
        y.backward(g)

    def dense() -> None:  # as a frozen layer trains it: the fold rebuilt in the backward (or kept), gᵀx through
        hybrid_linear(x, w, None, [(op, 0.5)], structured=[False], keep=keep).backward(g)

    def hybrid() -> None:
        hybrid_linear(x, w, None, [(op, 0.5)], keep=keep).backward(g)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    candidates = {"fast": fast, "dense": dense, "hybrid": hybrid}
    t = _min_times({"base": base, **{name: candidates[name] for name in paths}}, reps, sync)
    return min(paths, key=lambda name: t[name])  # the least marginal cost over the same base time
