"""Matrix-approximation benchmark: how well each structure fits a target matrix, versus its parameter count.

The SURM paper's approximation experiment. For each target matrix T (out × in) and each method M with a parameter
budget P, the benchmark finds S in M's family with at most P parameters that (approximately) minimises
||T − S||_F and reports the relative error ||T − S||_F / ||T||_F.

Targets (seeded):

* ``gaussian``: i.i.d. N(0, 1/n) entries, n × n (full rank, flat spectrum: the Marchenko–Pastur law);
* ``lowrank``: A·B with A (n × k), B (k × n) Gaussian, k = ``--rank`` (16), plus Gaussian noise of relative
  Frobenius norm ``--noise`` (0.01);
* ``query``: MiniLM-L6's layer-``--layer`` attention query weight (384 × 384, real pretrained weights);
* ``ffn_out``: the same layer's FFN ``output.dense`` weight (384 × 1536), its first ``--ffn-cols`` (384) columns.

The real weights are read from the local checkpoint of :func:`structpeft.models.resolve_model` (``--model``);
if it is not installed those targets are skipped with a printed note that is also recorded in the output.

Budgets are given as LoRA-equivalent ranks ρ (``--budgets``, default 0.5 1 2 4 8 16 32): P = ρ·(out + in), the
parameters of a rank-ρ LoRA adapter. Every structure uses its largest configuration with at most P parameters; for
the block-grid structures (circulant, Toeplitz, LDR) the block size is restricted to divisors of out and in
(:func:`block_size_for`: the operators' ``options_for_budget`` may pick a padded grid, e.g. Toeplitz b = 63 on a
64 × 64 matrix, whose cropped entries waste parameters); the exact count is recorded.

Methods: ``lora``, ``circulant``, ``toeplitz-f1``, ``toeplitz-f2``, ``kronecker``, ``ldr-r{1,2,4}`` and ``pmss-cur``;
how each is fitted (closed-form projections, Adam from warm starts): :mod:`structpeft.bench.fits`.

Outputs in ``--out`` (default ``docs/bench``): ``approx.json`` (every point, the settings, versions, skipped
targets and the wall time), ``approx.md`` (the table at LoRA-equivalent ranks 1, 2, 4, 8 plus per-target details)
and ``approx.png`` (error vs parameters, one panel per target). ``--quick`` (n = 64, 60 steps, real weights
cropped to 64 × 64) is a smoke test of a few seconds. The full default run took 494 s (about 8 minutes) on a 2-core
CPU shared with other jobs, with one thread; the Adam fits are almost all of it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..operators import get_operator_class
from ..operators.base import largest_block_size_within
from ..operators.kronecker import KroneckerOperator
from .fits import (
    circulant_projection,
    fit_adam,
    kronecker_projection,
    kronecker_shape_errors,
    ldr_warm_start,
    lora_projection,
    normalise,
    relative_error,
    skeleton_projection,
    toeplitz2_warm_start,
    toeplitz_projection,
)

__all__ = [
    "METHODS",
    "TARGETS",
    "block_size_for",
    "main",
    "make_targets",
    "run",
]

TARGETS = ("gaussian", "lowrank", "query", "ffn_out")
REAL_TARGETS = ("query", "ffn_out")
DEFAULT_BUDGETS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
TABLE_RANKS = (1.0, 2.0, 4.0, 8.0)
FULL_RUN_NOTE = "about 8 minutes (494 s measured, 400 Adam steps) on a 2-core CPU shared with other jobs, one thread"


# ------------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A target matrix (``matrix`` None when skipped, with the reason in ``note``)."""

    name: str
    description: str
    matrix: torch.Tensor | None
    note: str = ""


def _load_real_weights(model: str, layer: int) -> dict[str, torch.Tensor]:
    """The layer's attention query and FFN output.dense weights from a local BERT-style checkpoint."""
    from ..models import resolve_model

    directory = resolve_model(model)
    names = {
        "query": f"encoder.layer.{layer}.attention.self.query.weight",
        "ffn_out": f"encoder.layer.{layer}.output.dense.weight",
    }
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    found: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for fname in files:
            with safe_open(os.path.join(directory, fname), framework="pt") as fh:
                keys = set(fh.keys())
                for key, name in names.items():
                    for candidate in (name, "bert." + name):
                        if candidate in keys and key not in found:
                            found[key] = fh.get_tensor(candidate).float()
    else:
        state = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        for key, name in names.items():
            for candidate in (name, "bert." + name):
                if candidate in state and key not in found:
                    found[key] = state[candidate].float()
    missing = [names[k] for k in names if k not in found]
    if missing:
        raise ConfigError(f"model {model!r} has no weights {', '.join(missing)} (expected a BERT encoder)")
    return found


def make_targets(
    names: Sequence[str],
    *,
    n: int,
    rank: int,
    noise: float,
    seed: int,
    model: str = "minilm",
    layer: int = 0,
    real_rows: int | None = None,
    ffn_cols: int | None = 384,
) -> list[Target]:
    """Build the requested targets (see the module docstring). ``real_rows`` crops the real weights to their first
    rows and columns (None: full 384 rows); ``ffn_cols`` keeps that many columns of ``ffn_out`` (None: all 1536)."""
    gen = torch.Generator().manual_seed(seed)
    targets: list[Target] = []
    real: dict[str, torch.Tensor] | None = None
    real_note = ""
    if any(name in REAL_TARGETS for name in names):
        try:
            real = _load_real_weights(model, layer)
        except Exception as exc:  # a missing optional model must not fail the benchmark
            real_note = f"skipped: real weights of model {model!r} unavailable ({type(exc).__name__}: {exc})"
            print(f"note: {real_note}", file=sys.stderr)
    for name in names:
        if name == "gaussian":
            mat = torch.randn(n, n, generator=gen) / math.sqrt(n)
            targets.append(Target(name, f"i.i.d. N(0, 1/n), {n}x{n}", mat))
        elif name == "lowrank":
            a = torch.randn(n, rank, generator=gen)
            b = torch.randn(rank, n, generator=gen)
            low = a @ b
            low = low / torch.linalg.matrix_norm(low)
            eps = torch.randn(n, n, generator=gen)
            mat = low + noise * eps / torch.linalg.matrix_norm(eps)
            targets.append(Target(name, f"rank {rank} + {noise:g} relative Gaussian noise, {n}x{n}", mat))
        elif name in REAL_TARGETS:
            if real is None:
                targets.append(Target(name, f"{model} layer {layer} {name}", None, real_note))
                continue
            mat = real[name]
            rows = mat.shape[0] if real_rows is None else min(real_rows, mat.shape[0])
            if name == "query":
                cols = rows if real_rows is not None else mat.shape[1]
            else:
                cols = mat.shape[1] if ffn_cols is None else min(ffn_cols, mat.shape[1])
                if real_rows is not None:
                    cols = min(cols, real_rows)
            mat = mat[:rows, :cols].contiguous()
            what = "attention.self.query" if name == "query" else "output.dense (FFN out)"
            full = tuple(real[name].shape)
            crop = "" if tuple(mat.shape) == full else f" [:{rows}, :{cols}] of {full[0]}x{full[1]}"
            targets.append(Target(name, f"{model} layer {layer} {what}{crop}, {rows}x{cols}", mat))
        else:  # pragma: no cover - argparse restricts the names
            raise ConfigError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    return targets


# ------------------------------------------------------------------------------------------------- methods
@dataclass
class Settings:
    """What one run fits (see :func:`run`)."""

    steps: int = 400
    lr: float = 0.03
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    """One fitted (target, method, budget) point."""

    params: int
    dense: torch.Tensor
    fit: str
    options: dict[str, Any]
    init_error: float | None = None
    best_step: int | None = None


Fitter = Callable[[torch.Tensor, int, Settings, str], Point]


def block_size_for(structure: str, shape: tuple[int, ...], budget: int, **fixed: Any) -> int:
    """The block size of a block-grid structure for an approximation budget: the largest parameter count within
    ``budget`` among block sizes b that divide both out and in (no zero padding: in a padded grid some parameters
    only touch cropped entries), else the largest count of any b: the operators' budget rule with every exact
    tiling preferred, not only those within its 1% tolerance."""
    cls = get_operator_class(structure)
    out_f, in_f = shape
    return largest_block_size_within(
        out_f, in_f, budget, lambda b: cls.num_parameters(out_f, in_f, block_size=b, **fixed), exact_tolerance=1.0
    )


def _lora(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    out_f, in_f = target.shape
    rank = min(budget // (out_f + in_f), min(out_f, in_f))
    if rank < 1:
        raise ConfigError(f"budget {budget} is below one LoRA rank ({out_f + in_f} parameters)")
    return Point(rank * (out_f + in_f), lora_projection(target, rank), "closed form (truncated SVD)", {"r": rank})


def _pmss(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    from ..budget import pmss_k_for_budget

    k, _ = pmss_k_for_budget(budget, *target.shape)
    return Point(k * k, skeleton_projection(target, k), "closed form (DEIM skeleton of T, U = C+ T R+)", {"k": k})


def _circulant(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    cls = get_operator_class("circulant")
    op = circulant_projection(target, block_size_for("circulant", target.shape, budget))
    with torch.no_grad():
        dense = op.to_dense()
    return Point(cls.num_parameters(*target.shape, **op.options), dense, "closed form (diagonal means)", op.options)


def _toeplitz1(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    cls = get_operator_class("toeplitz")
    op = toeplitz_projection(target, block_size_for("toeplitz", target.shape, budget, num_factors=1))
    with torch.no_grad():
        dense = op.to_dense()
    return Point(cls.num_parameters(*target.shape, **op.options), dense, "closed form (diagonal means)", op.options)


def _toeplitz2(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    cls = get_operator_class("toeplitz")
    unit, scale = normalise(target)
    op = toeplitz2_warm_start(unit, block_size_for("toeplitz", target.shape, budget, num_factors=2))
    res = fit_adam(op, unit, steps=settings.steps, lr=settings.lr, progress=settings.progress, desc=desc)
    fit = f"Adam {settings.steps} steps from the 1-factor projection (local optimum)"
    return Point(
        cls.num_parameters(*target.shape, **op.options),
        res.dense * scale,
        fit,
        op.options,
        res.init_error,
        res.best_step,
    )


def _ldr(rank: int) -> Fitter:
    def fitter(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
        cls = get_operator_class("ldr")
        b = block_size_for("ldr", target.shape, budget, displacement_rank=rank)
        gen = torch.Generator().manual_seed(settings.seed + 1000 * rank + b)
        unit, scale = normalise(target)
        op = ldr_warm_start(unit, b, rank, gen)
        res = fit_adam(op, unit, steps=settings.steps, lr=settings.lr, progress=settings.progress, desc=desc)
        fit = f"Adam {settings.steps} steps from the circulant projection (local optimum)"
        return Point(
            cls.num_parameters(*target.shape, **op.options),
            res.dense * scale,
            fit,
            op.options,
            res.init_error,
            res.best_step,
        )

    return fitter


def _kronecker(target: torch.Tensor, budget: int, settings: Settings, desc: str) -> Point:
    cache = settings.extra.setdefault("kron_cache", {})
    key = id(target)
    if key not in cache or cache[key][0] is not target:  # the tensor is kept, so its id cannot be reused
        cache[key] = (target, kronecker_shape_errors(target))
    errors = cache[key][1]
    within = [(err, -params, shape) for shape, (params, err) in errors.items() if params <= budget]
    if not within:
        smallest = min(params for params, _ in errors.values())
        raise ConfigError(f"budget {budget} is below the smallest exact Kronecker factorisation ({smallest})")
    _, _, shape = min(within)
    op = kronecker_projection(target, shape)
    with torch.no_grad():
        dense = op.to_dense()
    out_f, in_f = target.shape
    count = KroneckerOperator.num_parameters(out_f, in_f, factor_shape=shape)
    return Point(count, dense, "closed form (rank 1 of the rearrangement; best exact factor shape)", op.options)


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    fitter: Fitter
    closed_form: bool


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "lora", _lora, True),
        Method("circulant", "circulant", _circulant, True),
        Method("toeplitz-f1", "toeplitz", _toeplitz1, True),
        Method("toeplitz-f2", "toeplitz", _toeplitz2, False),
        Method("kronecker", "kronecker", _kronecker, True),
        Method("ldr-r1", "ldr", _ldr(1), False),
        Method("ldr-r2", "ldr", _ldr(2), False),
        Method("ldr-r4", "ldr", _ldr(4), False),
        Method("pmss-cur", "pmss", _pmss, True),
    )
}


# ---------------------------------------------------------------------------------------------------- run
def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("structpeft", "transformers", "safetensors", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def run(
    targets: Sequence[Target],
    methods: Sequence[str],
    budgets: Sequence[float],
    settings: Settings,
) -> dict[str, Any]:
    """Fit every (target, method, budget) and return the JSON-ready results (without the settings block).

    A budget ρ means P = floor(ρ·(out + in)) parameters; a method whose smallest configuration exceeds P is
    recorded under ``"skipped_points"``.
    """
    from tqdm.auto import tqdm

    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    jobs = [(t, m, b) for t in targets if t.matrix is not None for m in methods for b in budgets]
    bar = tqdm(jobs, desc="approx", disable=not settings.progress, file=sys.stderr)
    for target, method_name, rho in bar:
        mat = target.matrix
        assert mat is not None
        method = METHODS[method_name]
        out_f, in_f = mat.shape
        budget = int(math.floor(rho * (out_f + in_f)))
        desc = f"{target.name}/{method_name}/r{rho:g}"
        bar.set_postfix_str(desc)
        start = time.perf_counter()
        try:
            point = method.fitter(mat, budget, settings, desc)
        except ConfigError as exc:
            skipped.append(
                {"target": target.name, "method": method_name, "lora_rank": rho, "budget": budget, "reason": str(exc)}
            )
            continue
        if point.params > budget:  # pragma: no cover - a bug in a fitter
            raise AssertionError(f"{desc}: {point.params} parameters exceed the budget {budget}")
        entry = {
            "target": target.name,
            "method": method_name,
            "family": method.family,
            "lora_rank": rho,
            "budget": budget,
            "params": point.params,
            "params_over_n": point.params / max(out_f, in_f),
            "options": point.options,
            "rel_error": relative_error(mat, point.dense),
            "fit": point.fit,
            "closed_form": method.closed_form,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if point.init_error is not None:
            entry["warm_start_rel_error"] = point.init_error
            entry["best_step"] = point.best_step
        points.append(entry)
    return {"points": points, "skipped_points": skipped}


# --------------------------------------------------------------------------------------------------- output
def _cell(points: list[dict[str, Any]], target: str, method: str, rho: float) -> str:
    for p in points:
        if p["target"] == target and p["method"] == method and p["lora_rank"] == rho:
            return f"{p['rel_error']:.3f}"
    return "–"


def table(results: dict[str, Any], ranks: Sequence[float] = TABLE_RANKS) -> str:
    """Markdown table: rows methods, columns (target, LoRA-equivalent rank ρ), cells relative Frobenius error."""
    points = results["points"]
    targets = [t["name"] for t in results["targets"] if t["shape"] is not None]
    ranks = [r for r in ranks if r in results["settings"]["budgets"]]
    header = ["method"] + [f"{t} ρ={r:g}" for t in targets for r in ranks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in results["settings"]["methods"]:
        cells = [_cell(points, t, method, r) for t in targets for r in ranks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: dict[str, Any]) -> str:
    """Per target: every method and budget with its exact parameter count and options."""
    parts = []
    budgets = results["settings"]["budgets"]
    for t in results["targets"]:
        if t["shape"] is None:
            parts.append(f"### {t['name']}\n\n{t['note']}\n")
            continue
        header = ["method"] + [f"ρ={r:g} ({int(math.floor(r * sum(t['shape'])))})" for r in budgets]
        lines = [
            f"### {t['name']}: {t['description']}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for method in results["settings"]["methods"]:
            cells = []
            for r in budgets:
                match = [
                    p
                    for p in results["points"]
                    if p["target"] == t["name"] and p["method"] == method and p["lora_rank"] == r
                ]
                cells.append(f"{match[0]['rel_error']:.3f} ({match[0]['params']:,})" if match else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    skipped = [t for t in results["targets"] if t["shape"] is None]
    text = [
        "# Matrix approximation: relative error ||T − S||_F / ||T||_F vs trainable parameters",
        "",
        "Generated by `structpeft bench approx"
        + (" --quick" if s["quick"] else "")
        + f"` (seed {s['seed']}, {s['steps']} Adam steps, wall time {results['wall_time_s']:.0f} s).",
        "Columns: LoRA-equivalent budget ρ, i.e. at most ρ·(out + in) parameters (a rank-ρ LoRA); each structure "
        "uses its largest configuration within the budget (exact counts below). Lower is better; `–`: the "
        "structure has no configuration that small. `pmss-cur` takes its skeleton from the target itself "
        "(optimistic; its count is the k² entries of U only). `toeplitz-f2` and `ldr-*` are Adam fits (local "
        "optima); the others are exact optima (Kronecker: over exact factor shapes).",
        "",
        table(results),
        "",
    ]
    if skipped:
        text += [f"Skipped targets: {', '.join(t['name'] + ' (' + t['note'] + ')' for t in skipped)}", ""]
    text += ["## Details: error (parameters) at every budget", "", details(results)]
    return "\n".join(text)


STYLES = {
    "lora": ("black", "o", "-"),
    "circulant": ("tab:blue", "s", "-"),
    "toeplitz-f1": ("tab:orange", "^", "-"),
    "toeplitz-f2": ("tab:orange", "v", "--"),
    "kronecker": ("tab:green", "D", "-"),
    "ldr-r1": ("tab:red", "<", "-"),
    "ldr-r2": ("tab:red", ">", "--"),
    "ldr-r4": ("tab:red", "P", ":"),
    "pmss-cur": ("tab:gray", "x", "-."),
}


def plot(results: dict[str, Any], path: str) -> None:
    """One panel per fitted target: relative error vs parameters (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in results["targets"] if t["shape"] is not None]
    cols = 2 if len(targets) > 1 else 1
    rows = max(1, math.ceil(len(targets) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    for ax, t in zip(axes.flat, targets, strict=False):
        for method in results["settings"]["methods"]:
            pts = sorted(
                (p["params"], p["rel_error"])
                for p in results["points"]
                if p["target"] == t["name"] and p["method"] == method
            )
            if not pts:
                continue
            color, marker, ls = STYLES.get(method, ("tab:purple", ".", "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ls=ls, ms=5, label=method)
        ax.set_xscale("log")
        ax.set_ylim(top=min(1.01, ax.get_ylim()[1]))
        ax.set_title(f"{t['name']}: {t['description']}", fontsize=9)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("||T − S||_F / ||T||_F")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    if targets:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), fontsize=9, frameon=False)
    fig.suptitle("Approximation error vs parameters (lower is better; x: log scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ cli
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: expected a positive number (LoRA rank)") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: expected a positive number (LoRA rank)")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= {minimum}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="structpeft bench approx",
        description="Fit every structure (and LoRA / a PMSS skeleton at equal parameters) to target matrices and "
        "report the relative Frobenius error vs parameters. The full default run takes "
        f"{FULL_RUN_NOTE}; --quick takes a few seconds.",
        epilog=__doc__.split("Methods and how they are fitted:")[0].split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        metavar="TARGET",
        help=f"targets, of {', '.join(TARGETS)} (default: all)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods, of {', '.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        type=_positive_float,
        default=None,
        metavar="RHO",
        help="LoRA-equivalent ranks ρ: budgets of ρ·(out+in) parameters (default: 0.5 1 2 4 8 16 32)",
    )
    p.add_argument("--n", type=_int_at_least(4), default=None, help="size of the synthetic targets (default 384)")
    p.add_argument("--rank", type=_int_at_least(1), default=16, help="rank of the low-rank target (default 16)")
    p.add_argument("--noise", type=float, default=0.01, help="relative noise of the low-rank target (default 0.01)")
    p.add_argument("--model", default="minilm", help="model with the real weights (default minilm)")
    p.add_argument("--layer", type=_int_at_least(0), default=0, help="encoder layer of the real weights (default 0)")
    p.add_argument(
        "--ffn-cols",
        type=_int_at_least(1),
        default=384,
        help="columns of the 384x1536 FFN output weight to keep (default 384; 1536 = all, slower)",
    )
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="Adam steps per gradient fit (default 400)")
    p.add_argument("--lr", type=_positive_float, default=0.03, help="peak Adam learning rate (default 0.03)")
    p.add_argument("--seed", type=int, default=0, help="seed of the targets and initialisations (default 0)")
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=os.path.join("docs", "bench"), help="output directory (default docs/bench)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: n=64, 60 steps, budgets 0.5 1 2 4 8, real weights cropped to 64x64",
    )
    p.add_argument("--no-plot", action="store_true", help="skip approx.png")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); returns 0."""
    import json

    args = parser().parse_args(argv)
    if args.noise < 0 or not math.isfinite(args.noise):
        parser().error(f"argument --noise: invalid value {args.noise!r}: expected a number >= 0")
    n = args.n if args.n is not None else (64 if args.quick else 384)
    steps = args.steps if args.steps is not None else (60 if args.quick else 400)
    budgets = (
        args.budgets
        if args.budgets is not None
        else ([0.5, 1.0, 2.0, 4.0, 8.0] if args.quick else list(DEFAULT_BUDGETS))
    )
    budgets = sorted(set(budgets))
    if args.rank >= n:
        parser().error(f"argument --rank: {args.rank} must be smaller than n={n}")
    methods = list(dict.fromkeys(args.methods))
    target_names = list(dict.fromkeys(args.targets))

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        torch.manual_seed(args.seed)
        targets = make_targets(
            target_names,
            n=n,
            rank=args.rank,
            noise=args.noise,
            seed=args.seed,
            model=args.model,
            layer=args.layer,
            real_rows=n if args.quick else None,
            ffn_cols=n if args.quick else args.ffn_cols,
        )
        settings = Settings(steps=steps, lr=args.lr, seed=args.seed, progress=not args.no_progress)
        results = run(targets, methods, budgets, settings)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    results = {
        "benchmark": "approx",
        "settings": {
            "quick": args.quick,
            "n": n,
            "lowrank_rank": args.rank,
            "lowrank_noise": args.noise,
            "model": args.model,
            "layer": args.layer,
            "ffn_cols": n if args.quick else args.ffn_cols,
            "budgets": budgets,
            "budget_rule": "at most floor(rho * (out + in)) parameters, the count of a rank-rho LoRA adapter",
            "methods": methods,
            "steps": steps,
            "lr": args.lr,
            "lr_schedule": "linear warm-up 5% of the steps, cosine decay to 1% of the peak; best iterate kept",
            "seed": args.seed,
            "threads": args.threads,
        },
        "targets": [
            {
                "name": t.name,
                "description": t.description,
                "shape": list(t.matrix.shape) if t.matrix is not None else None,
                "frobenius_norm": float(torch.linalg.matrix_norm(t.matrix.double())) if t.matrix is not None else None,
                "note": t.note,
            }
            for t in targets
        ],
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "wall_time_s": round(wall, 1),
        **results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "approx.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    with open(os.path.join(args.out, "approx.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(results))
    if not args.no_plot:
        plot(results, os.path.join(args.out, "approx.png"))
    for t in targets:
        if t.matrix is None:
            print(f"note: target {t.name} {t.note}")
    print(table(results))
    print(f"wall time {wall:.1f} s; wrote approx.json, approx.md{'' if args.no_plot else ', approx.png'} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
