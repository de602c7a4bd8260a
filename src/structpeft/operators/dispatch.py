"""Per-layer choice between the structured product and a materialised dense ΔW, by measurement.

The FFT / reshape products win for large blocks (the default single-block circulant runs at LoRA's speed), but a
grid of many small blocks (e.g. circulant with b = 24 on a 384 × 384 layer, LoRA r=8's budget) costs more in
batched small complex products than one dense matmul. ``choose_compute`` times one forward + backward of both
paths on a (tokens × in) random batch, on the layer's device, and returns the faster ("fast" or "dense"). The
result is cached per process by (structure, shape, options, device) and recorded in the adapter's config
(``layer_options[module]["compute"]``), so a loaded adapter uses the same path. ``SurmConfig(compute="fast" |
"dense")`` forces either.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from .base import StructuredOperator

COMPUTE_MODES = ("auto", "fast", "dense")
_CACHE: dict[tuple, str] = {}


def _time(op: StructuredOperator, x: torch.Tensor, mode: str, reps: int) -> float:
    op.compute_mode = mode
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        op(x).sum().backward()
        sync()
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_compute(
    cls: type[StructuredOperator],
    out_features: int,
    in_features: int,
    options: dict,
    device: torch.device | str = "cpu",
    tokens: int = 512,
    reps: int = 3,
) -> str:
    """'fast' or 'dense', whichever runs forward + backward of ``tokens`` rows faster (cached per process)."""
    if cls.structure == "dense":
        return "fast"
    device = torch.device(device)
    key = (cls.structure, out_features, in_features, json.dumps(options, sort_keys=True), str(device))
    if key not in _CACHE:
        op = cls(out_features, in_features, **options).to(device)
        op.reset_parameters(False)
        x = torch.randn(tokens, in_features, device=device, requires_grad=True)
        fast, dense = _time(op, x, "fast", reps), _time(op, x, "dense", reps)
        _CACHE[key] = "dense" if dense < fast else "fast"
    return _CACHE[key]
