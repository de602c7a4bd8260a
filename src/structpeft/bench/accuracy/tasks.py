"""The accuracy sweep's plan: tasks, methods, seeds, and the ``structpeft finetune`` command of each run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError

DEFAULT_OUT = Path("docs/bench/accuracy")
DEFAULT_RUNS = Path("runs/bench-accuracy")
DEFAULT_SEEDS = (0, 1, 2)
BENCH_FILE = "bench.json"


@dataclass(frozen=True)
class Forgetting:
    """How forgetting is measured for a task (see the module docstring)."""

    kind: str  # "probe" (second-task probe accuracy) or "lm" (mean token loss on general text)
    data: str
    max_train: int = 0
    max_test: int = 0
    max_length: int = 128


@dataclass(frozen=True)
class Task:
    name: str
    model: str
    data: str
    args: tuple[str, ...]
    forgetting: Forgetting
    seconds_per_run: float  # measured on a quiet 2-core CPU (incl. start-up and forgetting), for the estimate
    description: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    task: Task
    method: Method
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task.name}/{self.method.name}/seed{self.seed}"


# Every method's classification head (newly initialised) trains at the same learning rate, written out in the
# command so that a run made under another head rule is never taken for a finished run of this plan.
HEAD_LR_ARGS = ("--head-lr", "5e-3")

TASKS: dict[str, Task] = {
    "snli": Task(
        "snli",
        "minilm",
        "snli",
        ("--max-train", "3000", "--max-test", "1000", "--max-length", "64", "--epochs", "1", *HEAD_LR_ARGS),
        Forgetting("probe", "bbc", max_train=300, max_test=300, max_length=128),
        seconds_per_run=100.0,
        description="MiniLM-L6 + SNLI (3,000 training pairs, 1,000 test pairs, max length 64, 1 epoch, batch 16)",
    ),
    "bbc": Task(
        "bbc",
        "minilm",
        "bbc",
        ("--max-train", "400", "--max-length", "128", "--epochs", "2", *HEAD_LR_ARGS),
        Forgetting("probe", "snli", max_train=1000, max_test=500, max_length=64),
        seconds_per_run=85.0,
        description="MiniLM-L6 + BBC News (400 training articles, all test articles: 425, 445 before the repeats "
        "were dropped; max length 128, 2 epochs, batch 16)",
    ),
    "gsm": Task(
        "gsm",
        "smollm2",
        "gsm_symbolic",
        ("--max-train", "480", "--max-test", "50", "--max-length", "256", "--max-steps", "60"),
        Forgetting("lm", "bbc", max_test=48, max_length=128),
        seconds_per_run=1000.0,
        description="SmolLM2-135M-Instruct + gsm_symbolic (reasoning-gym template instances in the style of "
        "GSM8K, not GSM8K itself; causal-LM loss on the chain of thought, 60 steps of batch 8, max length 256; "
        "exact match of the final number on 50 test problems, greedy decoding)",
    ),
}

# Quick mode (CI smoke): the real model and data, a few steps; forgetting on a small BBC probe for every task (SNLI
# needs a one-time fetch), which exercises the measurement only — quick-mode numbers mean nothing.
QUICK_ARGS = (
    "--max-train",
    "48",
    "--max-test",
    "48",
    "--max-steps",
    "3",
    "--batch-size",
    "8",
    "--max-new-tokens",
    "16",
)
# classification: short inputs; generation keeps the task's length (prompts + chains of thought need it)
QUICK_MAX_LENGTH = {"minilm": "64"}
QUICK_FORGETTING = {"max_train": 32, "max_test": 32, "max_length": 64}


def _m(name: str, family: str, *args: str) -> Method:
    return Method(name, family, tuple(args))


def minilm_methods() -> list[Method]:
    """The MiniLM sweep (query / value targets; 384 × 384 layers, LoRA r=8 = 6,144 parameters per layer)."""
    ms = [_m("head-only", "head-only", "--method", "head-only"), _m("full", "full", "--method", "full")]
    ms += [_m(f"lora-r{r}", "LoRA", "--method", "lora", "--r", str(r)) for r in (1, 2, 4, 8, 16)]
    # control: LoRA r=8 at the structured methods' default learning rate (2e-3 instead of LoRA's 1e-3)
    ms.append(_m("lora-r8-lr2e-3", "LoRA lr 2e-3", "--method", "lora", "--r", "8", "--lr", "2e-3"))
    surm = ("--method", "surm", "--structure")
    ms += [
        _m("surm-circulant-b384", "SURM circulant", *surm, "circulant", "--block-size", "384"),
        _m("surm-circulant-lora2", "SURM circulant", *surm, "circulant", "--budget", "lora-2"),
        # control, as lora-r8-lr2e-3 is for LoRA: the same circulant adapter at 2.5x its default learning rate
        _m(
            "surm-circulant-lora2-lr5e-3",
            "SURM circulant lr 5e-3",
            *surm,
            "circulant",
            "--budget",
            "lora-2",
            "--lr",
            "5e-3",
        ),
        # the forgetting control: the same adapter at LoRA's classification rate (1e-3, half its default)
        _m(
            "surm-circulant-lora2-lr1e-3",
            "SURM circulant lr 1e-3",
            *surm,
            "circulant",
            "--budget",
            "lora-2",
            "--lr",
            "1e-3",
        ),
        _m("surm-circulant-lora8", "SURM circulant", *surm, "circulant", "--budget", "lora-8"),
        _m("surm-toeplitz-lora2", "SURM Toeplitz", *surm, "toeplitz", "--budget", "lora-2"),
        _m("surm-kronecker-lora2", "SURM Kronecker", *surm, "kronecker", "--budget", "lora-2"),
    ]
    # LDR r=4 needs 2·r·384 = 3,072 parameters per 384 x 384 layer at least: LoRA r=4's budget, not r=2's
    ldr = ((1, 2), (2, 2), (4, 4))
    ms += [
        _m(f"surm-ldr-r{r}-lora{k}", "SURM LDR", *surm, "ldr", "--displacement-rank", str(r), "--budget", f"lora-{k}")
        for r, k in ldr
    ]
    ms.append(_m("surm-adapter-circulant", "SURM-Adapter", *surm, "circulant", "--placement", "adapter"))
    # targets control: circulant lora-2's 18,432 parameters (1/4 of LoRA r=8's) spent on other layers instead of
    # query / value: all four attention projections (768 per layer) or the two FFN layers (1,536 per layer); and
    # Kronecker, the best structure on query / value for SNLI, on all four (16 x 24 ⊗ 24 x 16, 768 per layer)
    attention = ("--target-modules", "query", "key", "value", "attention.output.dense")
    ffn = ("--target-modules", "intermediate.dense", *(f"layer.{i}.output.dense" for i in range(6)))
    other = "SURM, other targets"
    ms += [
        _m("surm-circulant-qkvo-b192", other, *surm, "circulant", "--block-size", "192", *attention),
        _m("surm-circulant-ffn-b384", other, *surm, "circulant", "--block-size", "384", *ffn),
        _m("surm-kronecker-qkvo-768", other, *surm, "kronecker", "--budget", "768", *attention),
        # a quarter of LoRA r=8's parameters on the same four projections (1,536 per layer, 36,864 in all): circulant
        # blocks of 96 and the Kronecker factors the budget rule picks (36 x 36 ⊗ 11 x 11 over a 396-padded layer)
        _m("surm-circulant-qkvo-b96", other, *surm, "circulant", "--block-size", "96", *attention),
        _m("surm-kronecker-qkvo-1536", other, *surm, "kronecker", "--budget", "1536", *attention),
        # ... and its reference: LoRA r=8 on the same four projections (twice the default's parameters), a LoRA r=8
        # candidate of the targets like the other LoRA r=8 rows
        _m("lora-r8-qkvo-lr2e-3", "LoRA, other targets", "--method", "lora", "--r", "8", "--lr", "2e-3", *attention),
        # learning-rate controls of the closest SNLI pair: the Kronecker row at half and twice its default rate
        # (1e-2), and the LoRA reference at 2.5x its rate, so that neither side alone is tuned on the test set
        _m(
            "surm-kronecker-qkvo-1536-lr5e-3", other, *surm, "kronecker", "--budget", "1536", "--lr", "5e-3", *attention
        ),
        _m(
            "surm-kronecker-qkvo-1536-lr2e-2", other, *surm, "kronecker", "--budget", "1536", "--lr", "2e-2", *attention
        ),
        _m("lora-r8-qkvo-lr5e-3", "LoRA, other targets", "--method", "lora", "--r", "8", "--lr", "5e-3", *attention),
    ]
    ms += [_m(f"pmss-deim-lora{r}", "PMSS", "--method", "pmss", "--budget", f"lora-{r}") for r in (2, 8)]
    ms += [
        _m(f"pmss-{s}-lora8", "PMSS selection", "--method", "pmss", "--budget", "lora-8", "--selection", s)
        for s in ("qdeim", "leverage", "norm", "random")
    ]
    ms += [
        _m("c3a-b24", "C3A", "--method", "c3a", "--block-size", "24"),
        _m("lokr-r8", "LoKr", "--method", "lokr", "--r", "8"),
        _m("vera-r256", "VeRA", "--method", "vera", "--r", "256"),
    ]
    return ms


def smollm2_methods() -> list[Method]:
    """The SmolLM2 comparison (q_proj / v_proj): LoRA r=8 (at its default rate and, as a control, at PMSS's),
    PMSS (at its default rate and, as the forgetting control, at LoRA's), SURM circulant, C3A."""
    return [
        _m("lora-r8", "LoRA", "--method", "lora", "--r", "8"),
        _m("lora-r8-lr1e-3", "LoRA lr 1e-3", "--method", "lora", "--r", "8", "--lr", "1e-3"),
        _m("pmss-deim-lora8", "PMSS", "--method", "pmss", "--budget", "lora-8"),
        _m("pmss-deim-lora8-lr3e-4", "PMSS lr 3e-4", "--method", "pmss", "--budget", "lora-8", "--lr", "3e-4"),
        _m("surm-circulant-lora8", "SURM circulant", "--method", "surm", "--structure", "circulant"),
        _m("c3a-lora8", "C3A", "--method", "c3a", "--budget", "lora-8"),
    ]


# families whose points are alternatives at one budget, not a curve over budgets: markers, no line, labelled
SCATTER_FAMILIES = ("PMSS selection", "SURM, other targets", "LoRA, other targets")
QUICK_METHODS = ("head-only", "lora-r8", "surm-circulant-lora2", "pmss-deim-lora2")
SUITES: dict[str, tuple[str, ...]] = {"minilm": ("bbc", "snli"), "smollm2": ("gsm",), "all": ("bbc", "snli", "gsm")}


def methods_for(task: Task) -> list[Method]:
    return smollm2_methods() if task.model == "smollm2" else minilm_methods()


# Execution order within a seed: the runs the targets compare first, so that a partial sweep answers
# them (reports list methods in the family order of the method lists whatever the execution order).
PRIORITY = (
    "lora-r8",
    "lora-r8-lr2e-3",
    "lora-r8-lr1e-3",
    "surm-circulant-lora2",
    "surm-kronecker-lora2",
    "surm-circulant-lora2-lr5e-3",
    "surm-toeplitz-lora2",
    "surm-circulant-b384",
    "pmss-deim-lora8",
    "pmss-deim-lora2",
    "head-only",
    "surm-circulant-lora8",
    "surm-ldr-r1-lora2",
    "surm-adapter-circulant",
    "c3a-b24",
    "lokr-r8",
    "lora-r2",
    "lora-r16",
)


def execution_order(runs: Sequence[Run]) -> list[Run]:
    """Seed-major; within a seed the methods of :data:`PRIORITY` first, then the rest in plan order."""
    rank = {m: i for i, m in enumerate(PRIORITY)}
    index = {r.id: i for i, r in enumerate(runs)}
    return sorted(runs, key=lambda r: (r.seed, rank.get(r.method.name, len(rank)), index[r.id]))


def _flag(args: Sequence[str], name: str) -> str:
    return args[list(args).index(name) + 1]


def plan(
    tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[str] | None = None, quick: bool = False
) -> list[Run]:
    """The runs of a sweep, seed-major (every method of every task for seed 0 first), in report order."""
    runs = []
    known: set[str] = set()
    for seed in seeds:
        for t in tasks:
            task = TASKS[t]
            if quick:
                task = Task(
                    task.name,
                    task.model,
                    task.data,
                    (*QUICK_ARGS, "--max-length", QUICK_MAX_LENGTH.get(task.model, _flag(task.args, "--max-length"))),
                    Forgetting(task.forgetting.kind, "bbc", **QUICK_FORGETTING),
                    seconds_per_run=30.0,
                    description=task.description + " [quick mode: 48 examples, 3 steps]",
                )
            for m in methods_for(task):
                known.add(m.name)
                if methods is not None and m.name not in methods:
                    continue
                runs.append(Run(task, m, seed))
    if methods is not None:
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown} for tasks {list(tasks)}; valid: {sorted(known)}")
    return runs


def run_dir(runs_root: Path, run: Run) -> Path:
    return runs_root / run.task.name / run.method.name / f"seed{run.seed}"


def finetune_argv(run: Run, out: Path) -> list[str]:
    return [
        "finetune",
        "--model",
        run.task.model,
        "--data",
        run.task.data,
        *run.task.args,
        *run.method.args,
        "--seed",
        str(run.seed),
        "--baseline",
        "none",
        "--no-epoch-eval",
        "--no-progress",
        "--out",
        str(out),
    ]


def same_command(recorded: Any, argv: list[str]) -> bool:
    """Whether a recorded fine-tune argv is ``argv`` up to the run folder (``--out``): a run recorded under
    another runs folder (another machine, ``--runs-dir``) is the same run."""

    def key(a: list[str]) -> list[str]:
        return [("<out>" if i and a[i - 1] == "--out" else v) for i, v in enumerate(a)]

    return isinstance(recorded, list) and key(recorded) == key(argv)
