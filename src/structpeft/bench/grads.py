"""``structpeft bench grads``: the "hybrid" path's parameter gradient against the fold's weight-gradient matmul.

For one adapted layer (out × in) and N rows, the fold (``compute="dense"``) pays gᵀx, an (out × in) matmul over the
N rows (N·out·in multiply-adds), and maps it to the structure's parameters; the hybrid (``compute="hybrid"``) skips
it and takes the parameter gradient straight from x (N × in) and g (N × out) by ``op.param_grads(x, g)``. This
times the two on the speed benchmark's layer shapes (MiniLM's 384 × 384 on 4,096 rows, SmolLM2's 576 × 576 on 512
rows) at LoRA r=8's budget and the benchmark's extra settings: median of interleaved repetitions, float32, the
threads given. It times the gradients alone; the whole training step of one layer on each path is in
``structpeft bench speed``'s "Compute paths" table.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from ..budget import budget_to_parameters
from ..operators import StructuredOperator, get_operator_class
from .speed import time_interleaved

# (label, out, in, rows, structure, options or None for LoRA r=8's budget)
CASES: tuple[tuple[str, int, int, int, str, dict[str, Any] | None], ...] = (
    ("minilm", 384, 384, 4096, "circulant", None),
    ("minilm", 384, 384, 4096, "kronecker", None),
    ("minilm", 384, 384, 4096, "kronecker", {"factor_shape": [16, 16]}),
    ("smollm2", 576, 576, 512, "circulant", None),
    ("smollm2", 576, 576, 512, "circulant", {"block_size": 32}),
    ("smollm2", 576, 576, 512, "kronecker", None),
    ("smollm2", 576, 576, 512, "kronecker", {"factor_shape": [24, 24]}),
)


def _time_case(op: StructuredOperator, x: torch.Tensor, g: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms of gᵀx and of ``op.param_grads(x, g)``, interleaved, after one warm-up round."""
    fns = {"gtx": lambda: g.T @ x, "param_grads": lambda: op.param_grads(x, g)}
    times = time_interleaved(fns, reps, warmup=1, sync=lambda: None)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def run(reps: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """One row per case: the operator's options, gᵀx and ``param_grads`` in ms (median of ``reps``)."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model, out_f, in_f, n, structure, options in CASES:
            cls = get_operator_class(structure)
            if options is None:
                options = cls.options_for_budget(out_f, in_f, budget_to_parameters("lora-8", out_f, in_f))
            op = cls(out_f, in_f, **options)
            x = torch.randn(n, in_f, generator=gen)
            g = torch.randn(n, out_f, generator=gen)
            ms = _time_case(op, x, g, reps)
            rows.append(
                {
                    "model": model,
                    "shape": f"{out_f}x{in_f}",
                    "rows": n,
                    "structure": structure,
                    "options": options,
                    "params": sum(p.numel() for p in op.parameters()),
                    "gtx_ms": ms["gtx"],
                    "param_grads_ms": ms["param_grads"],
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | layer | rows | structure | options | parameters | gᵀx ms (fold) | param_grads ms (hybrid) | ratio |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['rows']:,} | {r['structure']} | {opts} | {r['params']:,} | "
            f"{r['gtx_ms']:.2f} | {r['param_grads_ms']:.2f} | {r['param_grads_ms'] / r['gtx_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="structpeft bench grads", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per case, after one warm-up (default 30)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        p.error(f"--reps {args.reps} / --threads {args.threads}: both must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = run(args.reps)
    finally:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median of {args.reps} interleaved repetitions")
    print(markdown(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
