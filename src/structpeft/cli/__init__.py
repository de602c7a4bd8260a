"""The ``structpeft`` command line.

::

    structpeft finetune                      # demo: MiniLM-L6 + BBC News, SURM circulant (lora-8 budget)
    structpeft finetune --model minilm --data snli --method surm --structure kronecker --budget lora-8 \\
        --epochs 2 --seed 0 --out runs/snli-kron
    structpeft finetune --model smollm2 --data gsm_symbolic --method lora --max-steps 300
    structpeft finetune --model path/to/hf/model --data my.csv --text-column text --label-column label \\
        --method lora --r 8
    structpeft evaluate runs/snli-kron       # reload the saved adapter and score it again
    structpeft bench speed --quick           # speed of every method at LoRA r=8's budget, in one run
    structpeft bench accuracy --quick        # fine-tuning sweep (methods x budgets x seeds), resumable
    structpeft bench approx                  # approximation error of each structure vs parameters
    structpeft bench grads                   # the hybrid path's parameter gradient against the fold's gᵀx

Exit codes: 0 success; 1 training failed (NaN loss); 2 bad input (one ``structpeft: error: ...`` line on
stderr, nothing written); 130 interrupted. Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import argparse
import sys

from ._common import PROG, CliError, TrainingFailedError, one_line, set_offline_env

__all__ = ["build_parser", "main"]


# benchmark name -> module structpeft.bench.<name>, each with ``main(argv: list[str]) -> int``
BENCHMARKS = ("speed", "accuracy", "approx", "grads")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so that ``main`` returns instead of exiting)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, finetune

    parser = _Parser(
        prog=PROG,
        description="Structured parameter-efficient fine-tuning (SURM, PMSS) and PEFT baselines, offline.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"structpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model and save the adapter, metrics and training curve",
        description=finetune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_arguments(p)
    p.set_defaults(func=finetune.run)
    p = sub.add_parser(
        "evaluate",
        help="reload a saved run and score it on its test split",
        description=evaluate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)
    p = sub.add_parser(
        "bench",
        help="benchmarks: 'speed' (train step and inference of every method at LoRA r=8's budget), "
        "'accuracy' (fine-tuning sweep of every method, budgets and seeds), 'approx' (matrix approximation "
        "error of each structure vs parameters), 'grads' (the hybrid path's parameter gradient against gᵀx)",
        description="Run a benchmark; arguments after the benchmark's name go to it (e.g. 'bench speed --help').",
    )
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_bench)
    return parser


def _run_bench(args: argparse.Namespace, _argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"structpeft.bench.{args.benchmark}")
    return int(module.main(args.bench_args) or 0)


def _fail(message: object, code: int) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 training failed, 2 bad input)."""
    set_offline_env()
    import warnings

    from ..errors import StructPeftError

    # Deprecation chatter of the libraries underneath is not actionable for a CLI user.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|accelerate|torch)(\.|$)")

    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
    except _UsageError as exc:
        return _fail(exc, 2)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else _fail(exc.code, 2)
    try:
        return int(args.func(args, args_list) or 0)
    except TrainingFailedError as exc:
        return _fail(exc, 1)
    except (CliError, StructPeftError) as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was saved", 130)
