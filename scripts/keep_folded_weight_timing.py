"""Time one adapted layer's training step with ``keep_folded_weight`` False (the default) and True.

One ``nn.Linear(d, d)`` adapted at LoRA r=8's budget (``budget="lora-8"``) on each folded path, forward + backward
of ``tokens`` random rows with a random output gradient, all variants interleaved in one process, median of
``--reps`` after two warm-up rounds; printed as the overhead over the frozen layer. A timing script, not a test:
compare the two columns of one run, not runs with each other.

    python scripts/keep_folded_weight_timing.py --tokens 512 --features 576    # SmolLM2's q_proj, 4 x 128 tokens
    python scripts/keep_folded_weight_timing.py --tokens 4096 --features 384   # MiniLM's query, 32 x 128 tokens
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from peft import get_peft_model
from torch import nn

from structpeft import PmssConfig, SurmConfig

CASES = [
    ("toeplitz", "dense"),
    ("ldr", "dense"),
    ("circulant", "hybrid"),
    ("circulant", "dense"),
    ("kronecker", "dense"),
    ("pmss", "hybrid"),
    ("pmss", "dense"),
]


def adapted(method: str, compute: str, keep: bool, features: int) -> nn.Module:
    torch.manual_seed(0)
    common = {"target_modules": ["0"], "budget": "lora-8", "compute": compute, "keep_folded_weight": keep}
    config = (
        PmssConfig(init_weights=False, **common)
        if method == "pmss"
        else SurmConfig(structure=method, init_weights=False, **common)
    )
    return get_peft_model(nn.Sequential(nn.Linear(features, features)), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--features", type=int, default=576)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.features, requires_grad=True)
    g = torch.randn(args.tokens, args.features)
    frozen = nn.Linear(args.features, args.features).requires_grad_(False)
    steps: dict[object, Callable[[], None]] = {"base": lambda: frozen(x).backward(g)}
    for method, compute in CASES:
        for keep in (False, True):
            model = adapted(method, compute, keep, args.features)
            steps[(method, compute, keep)] = lambda m=model: m(x).backward(g)
    times: dict[object, list[float]] = {name: [] for name in steps}
    for rep in range(args.reps + 2):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}
    base = median["base"]
    print(f"{args.tokens} rows x {args.features}: frozen layer {base:.2f} ms (median of {args.reps}, interleaved)")
    for method, compute in CASES:
        rebuilt, kept = (median[(method, compute, keep)] - base for keep in (False, True))
        print(
            f"  {method:9s} {compute:6s} overhead rebuilt {rebuilt:+7.2f} ms ({100 * rebuilt / base:+6.1f}%), "
            f"kept {kept:+7.2f} ms ({100 * kept / base:+6.1f}%), kept / rebuilt {kept / rebuilt:.2f}"
        )


if __name__ == "__main__":
    main()
